"""The artifact directory: the contract between the exporter, the edge client and the cloud server.

    artifacts/
      manifest.json              what everything below is (see `Manifest`), with the sha256 of every file
      head.onnx                  client head: input_ids, attention_mask, LoRA matrices -> activations (+ saved)
      head_grad.onnx             backward of the head: saved tensors + activation_grads -> grad.<LoRA input>
      head_adapters.safetensors  initial client LoRA matrices, keyed by head.onnx input name
      tokenizer.json             the tokenizer, readable by the `tokenizers` package alone
      tail/config.json           Hugging Face config of the tail (the layers after the cut)
      tail/model.safetensors     weights of the tail layers, final norm and LM head
      tail/lora.json             LoRA settings for the tail

Nothing here imports torch: the edge client reads this module on a Raspberry Pi.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    """One ONNX graph input or output: its name, element type and shape (ints; strings for dynamic axes)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> TensorSpec:
        return TensorSpec(str(raw["name"]), str(raw["dtype"]), tuple(raw["shape"]))


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings shared by the head (client) and the tail (server)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    # head.onnx input name -> shape. A is (rank, in_features), B is (out_features, rank), as in PEFT.
    matrices: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ArtifactError(f"LoRA rank must be at least 1, got {self.rank}")


@dataclass(frozen=True)
class Manifest:
    """manifest.json, parsed. `files` maps each artifact file (relative path) to its sha256."""

    schema_version: int
    model_source: str
    model_sha256: str
    family: str
    architecture: str
    cut_layer: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    batch_size: int  # the head graphs are traced for this batch size; the client pads to it
    max_seq_len: int  # and this sequence length
    lora: LoraSpec
    quantize: str  # "none" | "int8"
    frozen_head: bool
    head_inputs: tuple[TensorSpec, ...]
    head_outputs: tuple[TensorSpec, ...]
    grad_inputs: tuple[TensorSpec, ...]
    grad_outputs: tuple[TensorSpec, ...]
    files: dict[str, str]
    tools: dict[str, str]
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # The whole model on the client (FedLLM, KD-FedLLM): no tail, and the head's `activations` are its
    # logits (B, T, V), `activation_grads` the loss gradient with respect to them.
    full_model: bool = False

    @property
    def activations_shape(self) -> tuple[int, int, int]:
        width = self.vocab_size if self.full_model else self.hidden_size
        return (self.batch_size, self.max_seq_len, width)

    @property
    def saved_names(self) -> tuple[str, ...]:
        """head.onnx outputs besides `activations`: tensors saved for the backward graph."""
        return tuple(spec.name for spec in self.head_outputs if spec.name != "activations")

    @property
    def manifest_hash(self) -> str:
        """A short fingerprint both sides compare at the handshake: the files' hashes, in order."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}={self.files[name]}\n".encode())
        return digest.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": {
                "source": self.model_source,
                "sha256": self.model_sha256,
                "family": self.family,
                "architecture": self.architecture,
                "num_layers": self.num_layers,
                "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size,
                "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id,
            },
            "cut_layer": self.cut_layer,
            "full_model": self.full_model,
            "shapes": {"batch_size": self.batch_size, "max_seq_len": self.max_seq_len},
            "lora": {
                "rank": self.lora.rank,
                "alpha": self.lora.alpha,
                "targets": list(self.lora.targets),
                "matrices": {name: list(shape) for name, shape in self.lora.matrices.items()},
            },
            "quantize": self.quantize,
            "frozen_head": self.frozen_head,
            "head": {
                "file": "head.onnx",
                "inputs": [spec.to_json() for spec in self.head_inputs],
                "outputs": [spec.to_json() for spec in self.head_outputs],
            },
            "head_grad": None
            if self.frozen_head
            else {
                "file": "head_grad.onnx",
                "inputs": [spec.to_json() for spec in self.grad_inputs],
                "outputs": [spec.to_json() for spec in self.grad_outputs],
            },
            "files": dict(sorted(self.files.items())),
            "tools": dict(sorted(self.tools.items())),
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Manifest:
        model = raw["model"]
        lora = raw["lora"]
        grad = raw.get("head_grad") or {"inputs": [], "outputs": []}
        return Manifest(
            schema_version=int(raw["schema_version"]),
            model_source=str(model["source"]),
            model_sha256=str(model["sha256"]),
            family=str(model["family"]),
            architecture=str(model["architecture"]),
            cut_layer=int(raw["cut_layer"]),
            num_layers=int(model["num_layers"]),
            hidden_size=int(model["hidden_size"]),
            vocab_size=int(model["vocab_size"]),
            batch_size=int(raw["shapes"]["batch_size"]),
            max_seq_len=int(raw["shapes"]["max_seq_len"]),
            lora=LoraSpec(
                rank=int(lora["rank"]),
                alpha=float(lora["alpha"]),
                targets=tuple(lora["targets"]),
                matrices={name: tuple(shape) for name, shape in lora["matrices"].items()},
            ),
            quantize=str(raw["quantize"]),
            frozen_head=bool(raw["frozen_head"]),
            head_inputs=tuple(TensorSpec.from_json(s) for s in raw["head"]["inputs"]),
            head_outputs=tuple(TensorSpec.from_json(s) for s in raw["head"]["outputs"]),
            grad_inputs=tuple(TensorSpec.from_json(s) for s in grad["inputs"]),
            grad_outputs=tuple(TensorSpec.from_json(s) for s in grad["outputs"]),
            files={str(k): str(v) for k, v in raw["files"].items()},
            tools={str(k): str(v) for k, v in raw["tools"].items()},
            eos_token_id=model.get("eos_token_id"),
            pad_token_id=model.get("pad_token_id"),
            full_model=bool(raw.get("full_model", False)),
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(artifact_dir: str | Path, verify: bool = True) -> Manifest:
    """Read manifest.json and, with `verify`, check every file's sha256 against it.

    Raises ArtifactError naming the file and what to do when anything is missing or does not match.
    """
    root = Path(artifact_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist: run `edgesplit export` first")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: {root} is not an edgesplit artifact directory")
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest.from_json(raw)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(f"{path} is unreadable or malformed ({error}): export the artifacts again") from error
    if manifest.schema_version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {manifest.schema_version}, this edgesplit reads {SCHEMA_VERSION}: "
            "export the artifacts again with this version"
        )
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest, only: tuple[str, ...] | None = None) -> None:
    """Check the sha256 of the manifest's files (or of those under the prefixes in `only`)."""
    for name, expected in manifest.files.items():
        if only is not None and not name.startswith(only):
            continue
        file = root / name
        if not file.is_file():
            raise ArtifactError(f"{file} is listed in the manifest but missing: copy the whole artifact directory")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{file} does not match its manifest (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                "the file was changed or truncated; copy it again from the export, or export again"
            )
