"""edgesplit: split learning for federated fine-tuning of LLMs on edge devices.

One package, four parts, each importable on its own so that a device never loads PyTorch:
`edgesplit.client` (the edge client: ONNX Runtime and numpy), `edgesplit.server` (the PyTorch tail, rounds,
aggregation), `edgesplit.export` (cutting a model into a head and a tail) and `edgesplit.profiles` (device
profiles and the split-point profiler). `edgesplit.cli` is the `edgesplit` command.
"""

__version__ = "0.1.0"
