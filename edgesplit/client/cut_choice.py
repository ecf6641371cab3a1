"""Which of a mixed-cut export's cuts this device runs, from its profile and a memory budget, without torch.

    edgesplit client --artifacts artifacts/ --device-profile raspberry-pi-4 --max-memory-mb 512 ...

The rule (RULE): of the exported cuts whose estimated training peak fits the budget (the smaller of
--max-memory-mb and the profile's memory), the deepest. A deeper cut keeps more layers, and their LoRA
training, on the device and takes them off the server, which runs every client's tail on one machine; the
budget is what stops a device from taking more. `edgesplit profile --devices ...` is what chooses the cuts to
export for each kind of device from measured step times (docs/mixed-cuts.md); this picks among them on the
device, where nothing can be measured before joining.

The estimate is not a measurement: the head's weight files (ONNX Runtime maps them, so this is an upper
bound on what becomes resident), the tensors the forward graph saves for the backward and the activations
(sizes from the manifest), the LoRA matrices four times (values, gradients, AdamW's two moments), and
RUNTIME_MIB for Python, numpy, ONNX Runtime and tokenizers before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesplit.client.artifacts import Manifest, load_manifest
from edgesplit.devices.profiles import DeviceProfile
from edgesplit.errors import ArtifactError

MIB = 2**20
# Python with numpy, ONNX Runtime and tokenizers imported, before a model loads: a rough figure, below the
# 148 MB the device install held before its first step with SmolLM2 loaded (docs/devices.md).
RUNTIME_MIB = 100.0
RULE = "the deepest exported cut whose estimated training peak fits the memory budget"


@dataclass(frozen=True)
class CutChoice:
    cut_layer: int
    reason: str
    estimates_mib: dict[int, float]  # cut -> estimated peak, for every exported cut


def _tensor_bytes(shape: tuple[int | str, ...], dtype: str) -> int:
    if not all(isinstance(d, int) for d in shape):
        return 0  # a dynamic axis: the graphs are traced for fixed shapes, so none is expected
    return int(math.prod(int(d) for d in shape)) * np.dtype(dtype).itemsize


def estimate_peak_mib(directory: Path, manifest: Manifest) -> float:
    """A cut's training peak on the device, estimated from its artifact (see the module docs)."""
    weights = sum((directory / name).stat().st_size for name in manifest.files if name.startswith("head"))
    saved = sum(_tensor_bytes(manifest.longest_shape(spec.shape), spec.dtype) for spec in manifest.head_outputs)
    activations = 2 * 4 * math.prod(manifest.activations_shape)  # up, and their gradients down
    lora = 4 * 4 * sum(math.prod(shape) for shape in manifest.lora.matrices.values())
    return RUNTIME_MIB + (weights + saved + activations + lora) / MIB


def choose_cut(root: Path, manifest: Manifest, profile: DeviceProfile, max_memory_mb: float | None) -> CutChoice:
    """The cut RULE picks for `profile` among the cuts `manifest` (a mixed-cut export at `root`) lists.

    Raises ArtifactError, naming the smallest estimate, when no cut fits."""
    budget = float(profile.memory_mb) if max_memory_mb is None else min(float(max_memory_mb), profile.memory_mb)
    source = "--max-memory-mb" if max_memory_mb is not None and max_memory_mb <= profile.memory_mb else "memory"
    estimates = {}
    for cut in manifest.cuts:
        directory = root / cut.directory
        estimates[cut.cut_layer] = estimate_peak_mib(directory, load_manifest(directory, verify=False))
    fitting = [cut for cut, peak in estimates.items() if peak <= budget]
    listed = ", ".join(f"cut {cut} ~{peak:.0f} MiB" for cut, peak in sorted(estimates.items()))
    if not fitting:
        raise ArtifactError(
            f"no exported cut fits {profile.name}'s budget of {budget:.0f} MiB (estimated: {listed}): export a "
            "smaller cut or --quantize int8, or give the device more memory"
        )
    chosen = max(fitting)
    reason = (
        f"cut {chosen}: {RULE} ({profile.name}, {source} budget {budget:.0f} MiB; estimated: {listed}; "
        "an estimate from the artifact's sizes, not a measurement)"
    )
    return CutChoice(chosen, reason, estimates)
