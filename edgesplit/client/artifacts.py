"""The artifact directory: the contract between the exporter, the edge client and the cloud server.

    artifacts/
      manifest.json              what everything below is (see `Manifest`), with the sha256 of every file
      head.onnx                  client head: input_ids, attention_mask, LoRA matrices -> activations (+ saved)
      head_grad.onnx             backward of the head: saved tensors + activation_grads -> grad.<adapter name>
      head_adapters.safetensors  initial client LoRA matrices, keyed by adapter name (= head.onnx input name)
      head_weights.safetensors   a dynamic-length head's frozen weights and embedding table, which its two
                                 graphs take as inputs (`Manifest.fed_weights`; edgesplit/client/fed.py)
      tokenizer.json             the tokenizer, readable by the `tokenizers` package alone
      tail/config.json           Hugging Face config of the tail (the layers after the cut)
      tail/model.safetensors     weights of the tail layers (numbered from the tail's first), norm, LM head
      tail/lora.json             LoRA settings for the tail

Schema 2 describes the model as a list of stages (`Stage`): what runs where, on which layers [first, end),
from which files, with which named inputs and outputs. Today's exports have three: the head and its gradient
graph on the device, the tail on the server; several heads (several cuts) or a device-side top stage are
more entries in the same list. LoRA matrices are named by the rule in edgesplit/lora_names.py everywhere.

An export with shorter sequence buckets (`--seq-buckets 64,96`) holds the head and its gradient graph once
more per bucket, traced for that many tokens, beside the full-length ones: `head.t64.onnx` and
`head_grad.t64.onnx` (stages `head.t64`, `head_grad.t64`; `bucket_stage`). `head` and `head_grad` are
always the full `max_seq_len`; the client runs each batch at the smallest bucket that holds its longest row
(`Manifest.seq_buckets`, `Manifest.bucket_for`). The server's tail takes any length.

An export with a dynamic sequence axis (`--dynamic-seq`, `Manifest.dynamic_seq`) holds one head and one
gradient graph whose token axis is named `seq` (SEQ_AXIS) and takes any length from MIN_SEQ_LEN to
max_seq_len (`Manifest.seq_lengths`); the stages' shapes carry that name, or a size derived from it such
as `2*seq` (`Manifest.longest_shape` gives a shape at max_seq_len). The client cuts each batch to its
longest real row.

A mixed-cut export (`--cut-layers 2,4,8`) writes one tail, from the smallest cut, and one complete device
artifact per cut in a sub-directory (`cut2/`, `cut4/`, ...): the top-level manifest lists them under `cuts`
(`CutEntry`), and its head stages are the smallest cut's, with files inside that cut's directory.

Nothing here imports torch: the edge client reads this module on a Raspberry Pi.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.errors import ArtifactError
from edgesplit.lora_names import is_adapter_name

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"

DEVICE, SERVER = "device", "server"
HEAD, HEAD_GRAD, TAIL = "head", "head_grad", "tail"  # the stages an export writes today
# A U-shaped export's device-side top: the last layers, the final norm, the LM head and the loss, forward and
# backward in one graph (top.onnx), with its initial LoRA matrices and the LM head's weight beside it.
TOP = "top"
TOP_FILES = ("top_adapters.safetensors", "lm_head.npy")
LM_HEAD_INPUT = "lm_head.weight_t"  # top.onnx's input: the LM head's weight transposed, (H, V)
ACTIVATIONS, ACTIVATION_GRADS = "activations", "activation_grads"
LAYOUT_DEQUANTIZE = "dequantize-linear"  # Manifest.int8_layout: see edgesplit/export/quantize.py
LAYOUT_FED = "fed"  # Manifest.int8_layout of a dynamic-length head: int8 weights fed to both graphs (client/fed.py)
# A dynamic-length head's token axis (export --dynamic-seq): its name in the graphs and the manifest's shapes,
# and the shortest length it takes (tracing specialises lengths 0 and 1, so the graphs hold from 2).
SEQ_AXIS = "seq"
MIN_SEQ_LEN = 2
_DERIVED_AXIS = re.compile(rf"^\s*(?:(\d+)\s*\*\s*)?{SEQ_AXIS}\s*(?:\+\s*(\d+))?\s*$")


def axis_size(dimension: int | str, seq_len: int) -> int:
    """One dimension of a stage's shape at `seq_len` tokens: a fixed size, `seq` or a size derived from it
    (`2*seq`, `2*seq + 1`). ArtifactError for any other named axis."""
    if isinstance(dimension, int):
        return dimension
    match = _DERIVED_AXIS.match(dimension)
    if match is None:
        raise ArtifactError(f"a dynamic axis {dimension!r}: only {SEQ_AXIS!r} and sizes derived from it are known")
    return int(match.group(1) or 1) * seq_len + int(match.group(2) or 0)


def bucket_stage(stage: str, seq_len: int, max_seq_len: int) -> str:
    """The name of `stage` (head or head_grad) traced for `seq_len` tokens: the plain name at full length."""
    return stage if seq_len == max_seq_len else f"{stage}.t{seq_len}"


def bucket_graph_file(graph_file: str, seq_len: int, max_seq_len: int) -> str:
    """head.onnx -> head.t64.onnx for a bucket of 64 tokens; the plain name at full length."""
    if seq_len == max_seq_len:
        return graph_file
    stem, dot, suffix = graph_file.rpartition(".")
    return f"{stem}.t{seq_len}{dot}{suffix}"


def _is_size(dimension: object) -> bool:
    """A fixed size (an int >= 0) or a dynamic axis (its name)."""
    if isinstance(dimension, str):
        return True
    return isinstance(dimension, int) and not isinstance(dimension, bool) and dimension >= 0


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output of a stage: its name, element type and shape (ints; strings for dynamic axes)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ArtifactError(f"a tensor needs a name, got {self.name!r}")
        if not all(_is_size(d) for d in self.shape):
            raise ArtifactError(f"tensor {self.name}: shape {self.shape!r} is not a list of sizes")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> TensorSpec:
        return TensorSpec(str(raw["name"]), str(raw["dtype"]), tuple(raw["shape"]))


@dataclass(frozen=True)
class Stage:
    """One part of the model: where it runs, its layers [first_layer, end_layer), its files, its tensors.

    The head is layers [0, cut) on the device, its gradient graph the same layers backwards; the tail is
    layers [cut, num_layers) on the server, with the final norm and the LM head. A stage that holds the
    final norm and the LM head ends at num_layers.
    """

    name: str
    runs_on: str  # DEVICE | SERVER
    first_layer: int
    end_layer: int
    files: tuple[str, ...]  # relative paths, each also in the manifest's `files` with its sha256
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ArtifactError(f"a stage needs a name, got {self.name!r}")
        if self.runs_on not in (DEVICE, SERVER):
            raise ArtifactError(f"stage {self.name} runs on {self.runs_on!r}: expected {DEVICE!r} or {SERVER!r}")
        layers = (self.first_layer, self.end_layer)
        if any(isinstance(n, bool) or not isinstance(n, int) for n in layers) or not 0 <= layers[0] <= layers[1]:
            raise ArtifactError(f"stage {self.name} has layers {list(layers)}: expected [first, end), first <= end")
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ArtifactError(f"stage {self.name} names an {kind} twice: {names}")

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.end_layer)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "runs_on": self.runs_on,
            "layers": [self.first_layer, self.end_layer],
            "files": list(self.files),
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Stage:
        first, end = raw["layers"]
        return Stage(
            name=str(raw["name"]),
            runs_on=str(raw["runs_on"]),
            first_layer=first,
            end_layer=end,
            files=tuple(str(f) for f in raw["files"]),
            inputs=tuple(TensorSpec.from_json(s) for s in raw["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in raw["outputs"]),
        )


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA settings shared by the head (client) and the tail (server)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]
    # The head's matrices, adapter name -> shape: A is (rank, in_features), B is (out_features, rank), as in
    # PEFT. In the manifest these are the head stage's float inputs that are adapter names.
    matrices: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ArtifactError(f"LoRA rank must be at least 1, got {self.rank}")


def head_matrices(head_inputs: tuple[TensorSpec, ...]) -> dict[str, tuple[int, ...]]:
    """The LoRA matrices a head graph takes: its inputs named by the adapter naming rule, with their shapes."""
    matrices: dict[str, tuple[int, ...]] = {}
    for spec in head_inputs:
        if is_adapter_name(spec.name):
            if not all(isinstance(d, int) for d in spec.shape):
                raise ArtifactError(f"LoRA input {spec.name} has a dynamic shape {spec.shape!r}")
            matrices[spec.name] = tuple(int(d) for d in spec.shape)
    return matrices


@dataclass(frozen=True)
class CutEntry:
    """One cut of a mixed-cut export: its layer, the sub-directory holding its complete device artifact (a
    single-cut manifest, head graphs, adapters, tokenizer; no tail), and that manifest's fingerprint, which
    a client at this cut presents in its Hello."""

    cut_layer: int
    directory: str
    manifest_hash: str

    def __post_init__(self) -> None:
        if isinstance(self.cut_layer, bool) or not isinstance(self.cut_layer, int) or self.cut_layer < 1:
            raise ArtifactError(f"a cut must be a layer >= 1, got {self.cut_layer!r}")
        if not self.directory or "/" in self.directory or self.directory.startswith("."):
            raise ArtifactError(f"cut {self.cut_layer}: {self.directory!r} is not a sub-directory name")

    def to_json(self) -> dict[str, Any]:
        return {"cut_layer": self.cut_layer, "dir": self.directory, "manifest_hash": self.manifest_hash}

    @staticmethod
    def from_json(raw: dict[str, Any]) -> CutEntry:
        return CutEntry(int(raw["cut_layer"]), str(raw["dir"]), str(raw["manifest_hash"]))


def cut_directory(cut_layer: int) -> str:
    """The sub-directory of a mixed-cut export that holds one cut's device artifact."""
    return f"cut{cut_layer}"


@dataclass(frozen=True)
class Manifest:
    """manifest.json, parsed. `files` maps each artifact file (relative path) to its sha256."""

    schema_version: int
    model_source: str
    model_sha256: str
    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    batch_size: int  # the head graphs are traced for this batch size; the client pads to it
    max_seq_len: int  # and this sequence length
    lora: LoraSpec
    quantize: str  # "none" | "int8"
    stages: tuple[Stage, ...]
    files: dict[str, str]
    tools: dict[str, str]
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # A mixed-cut export's cuts, smallest first; () for a single-cut export (its one cut is `cut_layer`).
    cuts: tuple[CutEntry, ...] = ()
    # What the exporter measured when it ran the written files against the model (export/selfcheck.py):
    # relative errors and seconds. Optional: absent from older manifests.
    self_check: dict[str, Any] | None = None
    # How an int8 head holds its matmul weights: "dequantize-linear" (blocked DequantizeLinear + MatMul, which
    # the client runs as int8 dot products or dequantises at load, per CPU) or, absent from older int8
    # exports, None: MatMulNBits nodes, always int8 dot products. See edgesplit/export/quantize.py.
    int8_layout: str | None = None
    # One head graph pair for every length in seq_lengths (a named `seq` axis); False: traced lengths only.
    dynamic_seq: bool = False
    # The file whose frozen weights and embedding table the head's graphs take as inputs (client/fed.py):
    # a dynamic-length head's; None: the graphs hold their weights.
    fed_weights: str | None = None

    def __post_init__(self) -> None:
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ArtifactError(f"the manifest names a stage twice: {names}")
        if HEAD not in names:
            raise ArtifactError(f"the manifest has no {HEAD!r} stage (it has {names})")
        for stage in self.stages:
            if stage.end_layer > self.num_layers:
                raise ArtifactError(f"stage {stage.name} ends at layer {stage.end_layer} of {self.num_layers}")
            missing = [name for name in stage.files if name not in self.files]
            if missing:
                raise ArtifactError(f"stage {stage.name} uses files the manifest does not list: {missing}")
        if TAIL in names and self.stage(TAIL).first_layer != self.cut_layer:
            tail_first = self.stage(TAIL).first_layer
            raise ArtifactError(f"the tail starts at layer {tail_first}, the head ends at {self.cut_layer}")
        for seq_len in self.seq_buckets:
            if not 2 <= seq_len <= self.max_seq_len:
                raise ArtifactError(f"a sequence bucket of {seq_len} tokens: expected 2 to {self.max_seq_len}")
            if HEAD_GRAD in names and bucket_stage(HEAD_GRAD, seq_len, self.max_seq_len) not in names:
                raise ArtifactError(f"the head has a {seq_len}-token bucket but its gradient graph has none")
        if self.fed_weights is not None and self.fed_weights not in self.stage(HEAD).files:
            raise ArtifactError(f"the head's weights file {self.fed_weights} is not among the head stage's files")
        if self.dynamic_seq:
            if len(self.seq_buckets) > 1:
                raise ArtifactError("a dynamic-length head has no sequence buckets; these artifacts list some")
            if self.max_seq_len < MIN_SEQ_LEN:
                raise ArtifactError(f"max_seq_len {self.max_seq_len}: a dynamic head takes {MIN_SEQ_LEN}+ tokens")
        if TOP in names:
            top = self.stage(TOP)
            if top.runs_on != DEVICE or top.end_layer != self.num_layers or top.first_layer <= self.cut_layer:
                raise ArtifactError(
                    f"the top stage runs layers [{top.first_layer}, {top.end_layer}) on the {top.runs_on}: a U-shaped "
                    f"export's top runs on the device, ends at layer {self.num_layers} and leaves the server a "
                    f"middle after the head's {self.cut_layer}"
                )
            if self.cuts:
                raise ArtifactError("a U-shaped export has one cut; these artifacts list several")
        if self.cuts:
            layers = [cut.cut_layer for cut in self.cuts]
            if layers != sorted(set(layers)) or layers[0] != self.cut_layer or layers[-1] >= self.num_layers:
                raise ArtifactError(
                    f"the manifest's cuts {layers} must be distinct and rising, from the head's {self.cut_layer} "
                    f"to below {self.num_layers}"
                )

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ArtifactError(
            f"these artifacts have no {name!r} stage (they have {[s.name for s in self.stages]}): export it"
        )

    def has_stage(self, name: str) -> bool:
        return any(stage.name == name for stage in self.stages)

    # What the rest of edgesplit reads, derived from the stages.
    @property
    def cut_layer(self) -> int:
        """The head holds layers [0, cut_layer); a full-model head holds them all."""
        return self.stage(HEAD).end_layer

    @property
    def cut_layers(self) -> tuple[int, ...]:
        """Every cut a client of these artifacts may run at: a mixed-cut export's, or the one cut."""
        return tuple(cut.cut_layer for cut in self.cuts) or (self.cut_layer,)

    def cut_entry(self, cut_layer: int) -> CutEntry:
        """A mixed-cut export's entry for `cut_layer`; ArtifactError naming the exported cuts otherwise."""
        for cut in self.cuts:
            if cut.cut_layer == cut_layer:
                return cut
        raise ArtifactError(
            f"these artifacts hold no head for cut {cut_layer}: the exported cuts are {list(self.cut_layers)}"
        )

    def client_cut(self, manifest_hash: str, cut_layer: int | None) -> int | None:
        """The cut a client runs at, from what its Hello says: the fingerprint of its own manifest and the cut
        it names (None from a client that names none). A mixed-cut export's client presents its cut's
        manifest; a single-cut export's, the export's own. ArtifactError saying what differs otherwise; for a
        fingerprint these artifacts do not know, None (the server's admission refuses that itself)."""
        if not self.cuts:
            # Other artifacts altogether: the admission's fingerprint check says so, and what to do.
            if manifest_hash == self.manifest_hash and cut_layer is not None and cut_layer != self.cut_layer:
                raise ArtifactError(
                    f"the client runs at cut {cut_layer}, the server's artifacts were exported for cut "
                    f"{self.cut_layer} only: export the cuts with --cut-layers, or copy the server's artifacts"
                )
            return cut_layer
        entry = next((cut for cut in self.cuts if cut.manifest_hash == manifest_hash), None)
        if entry is None:
            return None
        if cut_layer is not None and cut_layer != entry.cut_layer:
            raise ArtifactError(
                f"the client says cut {cut_layer} but runs the artifacts of cut {entry.cut_layer}: copy the "
                f"server's {entry.directory}/ again"
            )
        return entry.cut_layer

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        """The sequence lengths the head graphs were traced for, shortest first; the last is max_seq_len."""
        prefix = f"{HEAD}.t"
        shorter = {
            int(stage.name.removeprefix(prefix))
            for stage in self.stages
            if stage.name.startswith(prefix) and stage.name.removeprefix(prefix).isdigit()
        }
        return (*sorted(shorter - {self.max_seq_len}), self.max_seq_len)

    @property
    def seq_lengths(self) -> tuple[int, ...]:
        """Every length a client may send, shortest first: MIN_SEQ_LEN..max_seq_len for a dynamic-length head,
        the traced buckets otherwise."""
        if self.dynamic_seq:
            return tuple(range(MIN_SEQ_LEN, self.max_seq_len + 1))
        return self.seq_buckets

    def longest_shape(self, shape: tuple[int | str, ...]) -> tuple[int, ...]:
        """A stage's tensor shape at max_seq_len tokens (its named axes resolved): the most it holds."""
        return tuple(axis_size(dimension, self.max_seq_len) for dimension in shape)

    def bucket_for(self, longest: int) -> int:
        """The shortest bucket that holds a batch whose longest row has `longest` tokens."""
        for seq_len in self.seq_lengths:
            if longest <= seq_len:
                return seq_len
        raise ArtifactError(f"a row of {longest} tokens: the head takes at most {self.max_seq_len}")

    def head_stage(self, seq_len: int) -> Stage:
        return self.stage(HEAD if self.dynamic_seq else bucket_stage(HEAD, seq_len, self.max_seq_len))

    def grad_stage(self, seq_len: int) -> Stage:
        return self.stage(HEAD_GRAD if self.dynamic_seq else bucket_stage(HEAD_GRAD, seq_len, self.max_seq_len))

    @property
    def full_model(self) -> bool:
        """The whole model on the client (FedLLM, KD-FedLLM): no tail, and the head's `activations` are its
        logits (B, T, V), `activation_grads` the loss gradient with respect to them."""
        return self.cut_layer == self.num_layers

    @property
    def u_shaped(self) -> bool:
        """The device also runs the top (the last layers, the norm, the LM head and the loss): the labels never
        leave it, and the server runs the middle [cut_layer, top_first_layer)."""
        return self.has_stage(TOP)

    @property
    def top_first_layer(self) -> int:
        """Where the device's top starts: the server's middle ends here (num_layers for a plain split)."""
        return self.stage(TOP).first_layer if self.u_shaped else self.num_layers

    @property
    def top_matrices(self) -> dict[str, tuple[int, ...]]:
        """The top's LoRA matrices (adapter name -> shape); empty for a plain split or a top without layers."""
        return head_matrices(self.stage(TOP).inputs) if self.u_shaped else {}

    @property
    def frozen_head(self) -> bool:
        return not self.has_stage(HEAD_GRAD)

    @property
    def head_inputs(self) -> tuple[TensorSpec, ...]:
        return self.stage(HEAD).inputs

    @property
    def head_outputs(self) -> tuple[TensorSpec, ...]:
        return self.stage(HEAD).outputs

    @property
    def grad_inputs(self) -> tuple[TensorSpec, ...]:
        return self.stage(HEAD_GRAD).inputs if not self.frozen_head else ()

    @property
    def grad_outputs(self) -> tuple[TensorSpec, ...]:
        return self.stage(HEAD_GRAD).outputs if not self.frozen_head else ()

    @property
    def activations_shape(self) -> tuple[int, int, int]:
        width = self.vocab_size if self.full_model else self.hidden_size
        return (self.batch_size, self.max_seq_len, width)

    @property
    def saved_names(self) -> tuple[str, ...]:
        """head.onnx outputs besides `activations`: tensors saved for the backward graph."""
        return tuple(spec.name for spec in self.head_outputs if spec.name != ACTIVATIONS)

    @property
    def manifest_hash(self) -> str:
        """A short fingerprint both sides compare at the handshake: the files' hashes, in order."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}={self.files[name]}\n".encode())
        return digest.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        optional: dict[str, Any] = {} if self.self_check is None else {"self_check": dict(self.self_check)}
        if self.int8_layout is not None:
            optional["int8_layout"] = self.int8_layout
        if self.fed_weights is not None:
            optional["fed_weights"] = self.fed_weights
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
            "shapes": {
                "batch_size": self.batch_size,
                "max_seq_len": self.max_seq_len,
                **({"dynamic_seq": True, "seq_lengths": list(self.seq_lengths)} if self.dynamic_seq else {}),
            },
            "lora": {"rank": self.lora.rank, "alpha": self.lora.alpha, "targets": list(self.lora.targets)},
            "quantize": self.quantize,
            "stages": [stage.to_json() for stage in self.stages],
            "files": dict(sorted(self.files.items())),
            "tools": dict(sorted(self.tools.items())),
            **({"cuts": [cut.to_json() for cut in self.cuts]} if self.cuts else {}),
            **optional,
        }

    @staticmethod
    def from_json(raw: dict[str, Any]) -> Manifest:
        model = raw["model"]
        lora = raw["lora"]
        stages = tuple(Stage.from_json(s) for s in raw["stages"])
        head = next((stage for stage in stages if stage.name == HEAD), None)
        return Manifest(
            schema_version=int(raw["schema_version"]),
            model_source=str(model["source"]),
            model_sha256=str(model["sha256"]),
            family=str(model["family"]),
            architecture=str(model["architecture"]),
            num_layers=int(model["num_layers"]),
            hidden_size=int(model["hidden_size"]),
            vocab_size=int(model["vocab_size"]),
            batch_size=int(raw["shapes"]["batch_size"]),
            max_seq_len=int(raw["shapes"]["max_seq_len"]),
            lora=LoraSpec(
                rank=int(lora["rank"]),
                alpha=float(lora["alpha"]),
                targets=tuple(str(t) for t in lora["targets"]),
                matrices=head_matrices(head.inputs) if head is not None else {},
            ),
            quantize=str(raw["quantize"]),
            stages=stages,
            files={str(k): str(v) for k, v in raw["files"].items()},
            tools={str(k): str(v) for k, v in raw["tools"].items()},
            eos_token_id=model.get("eos_token_id"),
            pad_token_id=model.get("pad_token_id"),
            cuts=tuple(CutEntry.from_json(c) for c in raw.get("cuts", ())),
            self_check=dict(raw["self_check"]) if isinstance(raw.get("self_check"), dict) else None,
            int8_layout=str(raw["int8_layout"]) if raw.get("int8_layout") is not None else None,
            dynamic_seq=_dynamic_seq(raw["shapes"]),
            fed_weights=str(raw["fed_weights"]) if raw.get("fed_weights") is not None else None,
        )


def _dynamic_seq(shapes: dict[str, Any]) -> bool:
    """shapes.dynamic_seq (absent from older manifests: False), its seq_lengths checked against max_seq_len."""
    dynamic = shapes.get("dynamic_seq", False)
    if not isinstance(dynamic, bool):
        raise ArtifactError(f"shapes.dynamic_seq is {dynamic!r}: expected true or false")
    lengths = shapes.get("seq_lengths")
    if dynamic and lengths != list(range(MIN_SEQ_LEN, int(shapes["max_seq_len"]) + 1)):
        raise ArtifactError(
            f"shapes.seq_lengths must be every length from {MIN_SEQ_LEN} to max_seq_len for a dynamic-length head"
        )
    return dynamic


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
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path} is unreadable or malformed ({error}): export the artifacts again") from error
    # The version first: an older manifest is refused for what it is, not for a field it lacks.
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema version {version!r}, this edgesplit reads schema {SCHEMA_VERSION}: "
            "re-export the artifacts with this version (`edgesplit export ...`)"
        )
    try:
        manifest = Manifest.from_json(raw)
    except (ValueError, KeyError, TypeError, OverflowError) as error:  # OverflowError: 1e999 read as an int
        raise ArtifactError(f"{path} is malformed ({error}): export the artifacts again") from error
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
            raise ArtifactError(
                f"{file} is listed in the manifest but missing: copy it from the export (a device needs "
                "manifest.json, tokenizer.json, head_adapters.safetensors and the head*.onnx files with their "
                ".data files)"
            )
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{file} does not match its manifest (sha256 {actual[:12]}..., expected {expected[:12]}...): "
                "the file was changed or truncated; copy it again from the export, or export again"
            )


def device_artifacts(artifact_dir: str | Path, cut_layer: int | None = None) -> Path:
    """The directory holding the device's artifact for `cut_layer`: a mixed-cut export's `cutN/`, or a
    single-cut export itself. `cut_layer` None: the one cut of a single-cut export (a mixed-cut one needs it).

    Raises ArtifactError, naming the exported cuts, for a cut these artifacts do not hold."""
    root = Path(artifact_dir)
    manifest = load_manifest(root, verify=False)
    if not manifest.cuts:
        if cut_layer is not None and cut_layer != manifest.cut_layer:
            raise ArtifactError(
                f"{root} was exported for cut {manifest.cut_layer} only, not {cut_layer}: leave --cut-layer out, "
                "or export the cuts you need with --cut-layers"
            )
        return root
    if cut_layer is None:
        raise ArtifactError(
            f"{root} holds heads for cuts {list(manifest.cut_layers)}: choose one with --cut-layer, or let "
            "--device-profile with --max-memory-mb choose, or point --artifacts at one cut's directory"
        )
    return root / manifest.cut_entry(cut_layer).directory
