"""edgesplit edge client: runs the model head with ONNX Runtime and numpy, never PyTorch."""

import os

# ONNX Runtime's official Linux wheels (1.32 here) switch on Microsoft telemetry at import: they write a
# persistent device id and an event queue under ~/.cache/Microsoft/DeveloperTools/.onnxruntime and upload
# device details when they can reach the internet. A runtime whose point is that data stays on the device
# opts out, before anything imports onnxruntime, unless the user has set the variables themselves.
# (Two names: the first is the full opt-out in 1.32, the second in later releases; docs/security.md.)
for _variable in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
    os.environ.setdefault(_variable, "1")
