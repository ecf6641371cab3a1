"""Every export checks itself: the files it wrote must compute what the model computes.

After the artifacts are written (into the exporter's scratch directory, before the manifest), one batch of
the traced shape (batch_size x max_seq_len random tokens) goes through the head graphs; the comparison uses
its first `CHECK_ROWS` rows and `CHECK_POSITIONS` positions (the last of those rows right-padded from
half-way), where PyTorch runs the model on just that prefix: a causal LM's output at a position depends on
the positions before it only, and PyTorch on the whole traced batch of the default model took most of the
check's time. Compared:
    logits      head.onnx (ONNX Runtime, LoRA adding nothing) then the tail built from tail/ as the server
                builds it, against the full model's logits in PyTorch; for a full-model export the head's
                own output; without a tail, the head's activations against the PyTorch head's;
    gradients   head.onnx then head_grad.onnx with random non-zero LoRA matrices and random activation
                gradients (zero outside the compared prefix), against PyTorch autograd through the same head
                (the largest relative error of any LoRA matrix); none for a frozen head.
Errors are relative L2 norms over the attended positions. Above `TOLERANCES` the export is refused (and
the exporter removes its scratch directory); otherwise the errors go into the manifest's `self_check`.

A wrong split (a layer-type pattern that did not follow its layers, an embedding scaled twice, positions
added twice) puts the error near 1, far above any tolerance here; fp32 ONNX against PyTorch differs by
about 1e-6. int8 weights move the head's output by a few per cent, hence the wider bounds for them.

An export with sequence buckets checks each bucket's graphs (`graphs`) the same way, at that bucket's length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgesplit.client.fed import EMBEDDINGS_INPUT, WEIGHTS_FILE, FedWeights
from edgesplit.errors import ExportError
from edgesplit.export.families import Family
from edgesplit.export.lora import HeadWithLora
from edgesplit.lora_names import GRADIENT_PREFIX

CHECK_ROWS = 2
CHECK_POSITIONS = 32
# quantize -> (logits, gradients): the largest relative error an export may have.
TOLERANCES: dict[str, tuple[float, float]] = {"none": (1e-3, 1e-2), "int8": (0.25, 0.5)}


@dataclass(frozen=True)
class SelfCheck:
    logits_error: float  # head then tail against the full model (see the module's docstring)
    gradients_error: float | None  # head_grad.onnx against autograd; None for a frozen head
    compared: str  # what logits_error compares: "logits" or "activations" (an export without a tail)
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            f"{self.compared}_relative_error": self.logits_error,
            "lora_gradients_relative_error": self.gradients_error,
            "seconds": round(self.seconds, 3),
        }

    def summary(self) -> str:
        gradients = "" if self.gradients_error is None else f", LoRA gradients {self.gradients_error:.2e}"
        return f"self-check: {self.compared} {self.logits_error:.2e}{gradients} (relative errors, {self.seconds:.1f}s)"


def _relative_error(actual: np.ndarray, expected: np.ndarray, mask: np.ndarray) -> float:
    """||actual - expected|| / ||expected|| over the positions where `mask` (B, T) is 1."""
    keep = mask.astype(bool)
    difference = float(np.linalg.norm((actual - expected)[keep]))
    return difference / max(float(np.linalg.norm(expected[keep])), 1e-12)


def check_batch(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens (B, T) and their mask: the last compared row is right-padded from half-way through the
    compared positions to the end (when more than one row is compared)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, vocab_size, size=(batch_size, seq_len)).astype(np.int64)
    mask = np.ones((batch_size, seq_len), dtype=np.int64)
    rows, positions = min(batch_size, CHECK_ROWS), min(seq_len, CHECK_POSITIONS)
    if rows > 1:
        mask[rows - 1, max(1, positions // 2) :] = 0
    return input_ids, mask


def _tail(directory: Path, family: Family) -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory)
    return family.build_tail(config, load_file(str(directory / "model.safetensors")))


def run_self_check(
    scratch: Path,
    model: Any,  # a transformers causal LM
    family: Family,
    head: HeadWithLora,
    batch_size: int,
    seq_len: int,
    quantize: str,
    seed: int = 0,
    tail_dir: Path | None = None,
    graphs: tuple[str, str] = ("head.onnx", "head_grad.onnx"),
) -> SelfCheck:
    """Check the head graphs in `scratch` and the tail in `tail_dir` (by default `scratch/tail`; where there is
        none, the head's activations are compared) against `model`; ExportError above tolerance. `graphs`: the
    forward and gradient files to check, traced for `seq_len` tokens."""
    import onnxruntime as ort

    started = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    forward_file, backward_file = graphs
    forward = ort.InferenceSession(str(scratch / forward_file), options, providers=["CPUExecutionProvider"])
    input_ids, mask = check_batch(int(model.config.vocab_size), batch_size, seq_len, seed)
    prefix = (slice(0, min(batch_size, CHECK_ROWS)), slice(0, min(seq_len, CHECK_POSITIONS)))
    tokens = torch.from_numpy(input_ids[prefix])
    torch_mask = torch.from_numpy(mask[prefix])
    names = [spec.name for spec in forward.get_inputs() if spec.name in head.shapes]
    zeros = {name: np.zeros(head.shapes[name], dtype=np.float32) for name in names}  # adds nothing: the base model

    taken = {spec.name for spec in forward.get_inputs()}
    # A dynamic-length head takes its frozen weights (both graphs) and its embeddings as inputs (client/fed.py)
    fed = FedWeights(scratch / WEIGHTS_FILE, int(model.config.vocab_size)) if EMBEDDINGS_INPUT in taken else None

    def run_forward(adapters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {"input_ids": input_ids, "attention_mask": mask, **adapters}
        if fed is not None:
            feed.update({**fed.arrays, EMBEDDINGS_INPUT: fed.embed(input_ids)})
        outputs = forward.run(None, {name: value for name, value in feed.items() if name in taken})
        return {**feed, **dict(zip([o.name for o in forward.get_outputs()], outputs, strict=True))}

    activations = run_forward(zeros)["activations"][prefix]
    tail_dir = scratch / "tail" if tail_dir is None else tail_dir
    with torch.no_grad():
        if head.full_model or tail_dir.is_dir():
            compared = "logits"
            expected = model(input_ids=tokens, attention_mask=torch_mask, use_cache=False).logits.numpy()
            if head.full_model:
                actual = activations
            else:
                tail = _tail(tail_dir, family)
                inputs = torch.from_numpy(np.ascontiguousarray(activations))
                actual = tail(inputs_embeds=inputs, attention_mask=torch_mask, use_cache=False).logits.numpy()
        else:
            compared = "activations"
            # Every LoRA matrix of the PyTorch head at zero: a frozen head's graph takes none, its module still has them
            matrices = {name: torch.zeros(shape) for name, shape in head.shapes.items()}
            expected = head(tokens, torch_mask, matrices).numpy()
            actual = activations
    logits_error = _relative_error(actual, expected, mask[prefix])

    gradients_error = None
    if (scratch / backward_file).exists():
        gradients_error = _gradients_error(scratch / backward_file, head, run_forward, names, prefix, seed, options)
    check = SelfCheck(logits_error, gradients_error, compared, time.perf_counter() - started)
    logits_bound, gradients_bound = TOLERANCES.get(quantize, TOLERANCES["none"])
    if logits_error > logits_bound or (gradients_error is not None and gradients_error > gradients_bound):
        raise ExportError(
            f"the export does not reproduce the model: {check.summary()}, above the tolerance "
            f"({compared} {logits_bound:g}, gradients {gradients_bound:g}); nothing was written. This model's "
            "layout differs from what its family adapter (edgesplit/export/families.py) describes"
        )
    return check


def _relative(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected)) / max(float(np.linalg.norm(expected)), 1e-12)


def _gradients_error(
    path: Path,
    head: HeadWithLora,
    run_forward: Any,
    names: list[str],
    prefix: tuple[slice, slice],
    seed: int,
    options: Any,
) -> float:
    """The largest relative error of head_grad.onnx's LoRA gradients against PyTorch autograd."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed + 1)
    adapters = {name: (rng.standard_normal(head.shapes[name]) * 0.05).astype(np.float32) for name in names}
    saved = run_forward(adapters)
    activation_grads = np.zeros(saved["activations"].shape, dtype=np.float32)  # the loss reads the prefix only
    activation_grads[prefix] = rng.standard_normal(activation_grads[prefix].shape)
    backward = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {spec.name: saved[spec.name] for spec in backward.get_inputs() if spec.name != "activation_grads"}
    feed["activation_grads"] = activation_grads
    outputs = backward.run(None, feed)
    grads = {o.name.removeprefix(GRADIENT_PREFIX): v for o, v in zip(backward.get_outputs(), outputs, strict=True)}

    matrices = {name: torch.from_numpy(value.copy()).requires_grad_(True) for name, value in adapters.items()}
    tokens, attention = torch.from_numpy(saved["input_ids"][prefix]), torch.from_numpy(saved["attention_mask"][prefix])
    with torch.enable_grad():
        output = head(tokens, attention, matrices)
        (output * torch.from_numpy(activation_grads[prefix])).sum().backward()
    errors = []
    for name, tensor in matrices.items():
        expected = tensor.grad.numpy() if tensor.grad is not None else np.zeros(tensor.shape, np.float32)
        errors.append(_relative(grads[name], expected))
    return max(errors, default=0.0)
