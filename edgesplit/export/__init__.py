"""edgesplit exporter: cuts a causal LM into an ONNX client head and a PyTorch server tail."""
