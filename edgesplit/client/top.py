"""The device's top stage of a U-shaped split in ONNX Runtime: the last layers, the norm, the LM head and the
loss, forward and backward in one run. numpy only.

    top.onnx:  activations (B, T, H) from the server's middle, attention_mask, labels (B, T),
               lm_head.weight_t (H, V), the top's LoRA matrices
           ->  loss, activation_grads (B, T, H) for the server, grad.<adapter name> per top matrix

The labels go into this graph and nowhere else. The LM head's weight is read from `lm_head.npy` memory-mapped,
once, and fed to every run as it is (ONNX Runtime reads a float32 numpy input in place). The logits are
computed in blocks of tokens inside the graph (edgesplit/export/top.py): the device never holds (B, T, V).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from edgesplit.client.artifacts import LM_HEAD_INPUT, TOP, Manifest, load_manifest, verify_files
from edgesplit.client.head import resolve_providers, session_options
from edgesplit.errors import ArtifactError, TrainingError
from edgesplit.lora_names import GRADIENT_PREFIX

Arrays = dict[str, np.ndarray]


@dataclass
class TopResult:
    loss: float
    activation_grads: np.ndarray  # (B, T, H): d loss / d the middle's output, which goes up to the server
    grads: Arrays  # the top's LoRA gradients, by adapter name


class Top:
    """top.onnx of a U-shaped export, ready to run."""

    def __init__(
        self, artifact_dir: str | Path, threads: int | None = None, verify: bool = True, providers: Sequence[str] = ()
    ) -> None:
        self.root = Path(artifact_dir)
        self.manifest: Manifest = load_manifest(self.root, verify=False)
        if not self.manifest.u_shaped:
            raise ArtifactError(f"{self.root} has no {TOP!r} stage: it is a plain split export")
        if verify:
            verify_files(self.root, self.manifest, only=("top", "lm_head"))
        options = session_options(threads)
        # The loss's blocks in order: ONNX Runtime's priority-based order keeps to the graph's, block by block
        # (SmolLM2 cut 4, top 2, 4 x 128 tokens: the top alone peaked at 351 MiB against 411 in the default order).
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        try:
            self.session = ort.InferenceSession(
                str(self.root / "top.onnx"), options, providers=resolve_providers(providers)
            )
        except Exception as error:  # ONNX Runtime raises its own exception types for a corrupt graph
            raise ArtifactError(f"ONNX Runtime cannot load the top in {self.root}: {error}") from error
        self.lm_head = np.load(self.root / "lm_head.npy", mmap_mode="r")  # one copy, paged in as it is read
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def initial_adapters(self) -> Arrays:
        adapters = load_file(str(self.root / "top_adapters.safetensors"))
        expected = set(self.manifest.top_matrices)
        if set(adapters) != expected:
            raise ArtifactError(f"top_adapters.safetensors holds {sorted(adapters)}, the manifest {sorted(expected)}")
        return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in adapters.items()}

    def step(
        self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, adapters: Arrays
    ) -> TopResult:
        """The loss of one batch from the middle's output, its gradient there, and the top's LoRA gradients."""
        expected = (self.manifest.batch_size, self.manifest.max_seq_len, self.manifest.hidden_size)
        if tuple(activations.shape) != expected:
            raise TrainingError(f"the middle's activations have shape {activations.shape}, the top takes {expected}")
        if not np.all(np.isfinite(activations)):
            raise TrainingError("the middle's activations from the server contain NaN or Inf; the step is skipped")
        feed: dict[str, np.ndarray] = {
            "activations": np.ascontiguousarray(activations, dtype=np.float32),
            "attention_mask": attention_mask.astype(np.int64, copy=False),
            "labels": labels.astype(np.int64, copy=False),
            LM_HEAD_INPUT: self.lm_head,
        }
        for name in self.manifest.top_matrices:
            feed[name] = adapters[name]
        feed = {name: value for name, value in feed.items() if name in self.input_names}
        named = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        prefix = GRADIENT_PREFIX
        grads = {name.removeprefix(prefix): value for name, value in named.items() if name.startswith(prefix)}
        return TopResult(float(named["loss"]), named["activation_grads"], grads)
