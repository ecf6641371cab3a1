"""The client head in ONNX Runtime: forward to the cut, and the LoRA gradients back from it. numpy only.

    forward:   input_ids (B, T), attention_mask (B, T), LoRA matrices -> activations (B, T, H), saved...
    backward:  saved..., activation_grads (B, T, H)                  -> grad.<LoRA input> for each matrix

The graphs are traced for the manifest's (batch_size, max_seq_len); callers pad to it (see data.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from edge_client.artifacts import Manifest, load_manifest
from edge_client.errors import ArtifactError, TrainingError

Arrays = dict[str, np.ndarray]


@dataclass
class ForwardResult:
    activations: np.ndarray  # (B, T, H) float32
    saved: Arrays  # what the backward graph needs from this forward, by name


def session_options(threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena keeps freed blocks for reuse and so holds the step's peak for good; the shapes here never
    # change, so ONNX Runtime's memory pattern planning does the reuse without it.
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class Head:
    """Both head graphs of one artifact directory, ready to run."""

    def __init__(self, artifact_dir: str | Path, threads: int | None = None, verify: bool = True) -> None:
        self.root = Path(artifact_dir)
        self.manifest: Manifest = load_manifest(self.root, verify=verify)
        options = session_options(threads)
        try:
            self.forward_session = ort.InferenceSession(str(self.root / "head.onnx"), options)
            self.backward_session = (
                None
                if self.manifest.frozen_head
                else ort.InferenceSession(str(self.root / "head_grad.onnx"), options)
            )
        except Exception as error:  # ONNX Runtime raises its own exception types for a corrupt graph
            raise ArtifactError(f"ONNX Runtime cannot load the head in {self.root}: {error}") from error
        self.output_names = [o.name for o in self.forward_session.get_outputs()]
        self.backward_inputs = [i.name for i in self.backward_session.get_inputs()] if self.backward_session else []

    @property
    def trainable(self) -> bool:
        return self.backward_session is not None

    def initial_adapters(self) -> Arrays:
        adapters = load_file(str(self.root / "head_adapters.safetensors"))
        expected = set(self.manifest.lora.matrices)
        if set(adapters) != expected:
            raise ArtifactError(f"head_adapters.safetensors holds {sorted(adapters)}, the manifest {sorted(expected)}")
        return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in adapters.items()}

    def check_adapters(self, adapters: Arrays) -> None:
        """The adapters fit the graph: the same names and shapes, finite float32."""
        for name, shape in self.manifest.lora.matrices.items():
            value = adapters.get(name)
            if value is None or tuple(value.shape) != tuple(shape):
                got = None if value is None else tuple(value.shape)
                raise TrainingError(f"adapter {name} has shape {got}, the head expects {tuple(shape)}")
            if not np.all(np.isfinite(value)):
                raise TrainingError(f"adapter {name} contains NaN or Inf")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, adapters: Arrays) -> ForwardResult:
        expected = (self.manifest.batch_size, self.manifest.max_seq_len)
        if input_ids.shape != expected or attention_mask.shape != expected:
            raise TrainingError(f"the head takes batches of exactly {expected} tokens, got {input_ids.shape}")
        feed = {"input_ids": input_ids.astype(np.int64, copy=False),
                "attention_mask": attention_mask.astype(np.int64, copy=False)}
        for name in self.manifest.lora.matrices:
            feed[name] = adapters[name]
        outputs = self.forward_session.run(None, feed)
        named = dict(zip(self.output_names, outputs))
        activations = named.pop("activations")
        # The backward may also read forward inputs (the mask, LoRA matrices) under their own names.
        saved = {name: named[name] if name in named else feed[name] for name in self.backward_inputs
                 if name != "activation_grads"}
        return ForwardResult(activations=activations, saved=saved)

    def backward(self, forward: ForwardResult, activation_grads: np.ndarray) -> Arrays:
        """LoRA gradients of sum(activations * activation_grads), keyed by the LoRA input name."""
        if self.backward_session is None:
            raise TrainingError("this head was exported with --frozen-head: it has no gradient graph")
        if activation_grads.shape != forward.activations.shape:
            raise TrainingError(
                f"activation_grads has shape {activation_grads.shape}, activations {forward.activations.shape}"
            )
        if not np.all(np.isfinite(activation_grads)):
            raise TrainingError("activation_grads from the server contain NaN or Inf; the step is skipped")
        feed = dict(forward.saved)
        feed["activation_grads"] = np.ascontiguousarray(activation_grads, dtype=np.float32)
        outputs = self.backward_session.run(None, feed)
        names = [o.name for o in self.backward_session.get_outputs()]
        return {name.removeprefix("grad."): value for name, value in zip(names, outputs)}
