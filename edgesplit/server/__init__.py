"""The cloud server: runs the PyTorch tail, returns activation gradients and aggregates client adapters."""
