"""edgesplit edge client: runs the model head with ONNX Runtime and numpy, never PyTorch."""
