"""The edgesplit protocol's messages: small frozen dataclasses, each checked on construction.

A message is valid or it does not exist: the sender's constructor and the receiver's decode run the same
`__post_init__`, so what one side may not build the other side never sees. The frame codec and the
session's state table live in protocol.py, which re-exports everything here. numpy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, TypeAlias

import numpy as np

from edgesplit.client.session_settings import SessionSettings
from edgesplit.client.tensors import Array, is_number
from edgesplit.errors import ProtocolError


class Kind(IntEnum):
    """The message kind: one byte of the frame header. Never renumber, older peers read these bytes."""

    HELLO = 1
    WELCOME = 2
    ACTIVATIONS = 3
    GRADIENTS = 4
    ADAPTER_UPDATE = 5
    ROUND_RESULT = 6
    ERROR = 7
    BYE = 8


# ----------------------------------------------------------------------------------------------- stages

SPLIT_STAGE = "split"


@dataclass(frozen=True)
class TensorRule:
    """One named tensor of a stage: its dtype and its shape in named dimensions. Within one message a
    dimension name is one size: the mask's (B, T) must be the activations' (B, T)."""

    dtype: str  # "float" (any float; travels in the session's wire) or "int64"
    dims: tuple[str, ...]
    required: bool = True


_HIDDEN = TensorRule("float", ("B", "T", "H"))
_TOKENS = TensorRule("int64", ("B", "T"))

# (kind, stage) -> the tensors that message carries, checked in this order. The stage is the cut the
# tensors cross (session_settings.EXCHANGES says which stages a step of each plan uses).
STAGE_TENSORS: dict[tuple[Kind, str], dict[str, TensorRule]] = {
    # The split: the head's output goes up with what the tail's loss needs; the cut's gradient comes down,
    # or nothing for a frozen head.
    (Kind.ACTIVATIONS, SPLIT_STAGE): {"activations": _HIDDEN, "attention_mask": _TOKENS, "labels": _TOKENS},
    (Kind.GRADIENTS, SPLIT_STAGE): {"activation_grads": TensorRule("float", ("B", "T", "H"), required=False)},
    # The U-shape: the labels stay on the device, which computes the loss on its top layers.
    (Kind.ACTIVATIONS, "lower"): {"activations": _HIDDEN, "attention_mask": _TOKENS},
    (Kind.ACTIVATIONS, "upper"): {"activations": _HIDDEN},
    (Kind.GRADIENTS, "upper"): {"activation_grads": _HIDDEN},
    (Kind.GRADIENTS, "lower"): {"activation_grads": TensorRule("float", ("B", "T", "H"), required=False)},
}

# --------------------------------------------------------------------------------------------- messages

_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # it ends up in file names and log lines


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)


def _require_counts(message: object, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        _require(value >= 0, f"{type(message).__name__}.{name} must be >= 0, got {value}")


def _require_optional_counts(message: object, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        _require(
            value is None or (is_number(value) and value >= 0),
            f"{type(message).__name__}.{name} must be None or a number >= 0, got {value!r:.40}",
        )


def _require_round_tensors(message: object, tensors: dict[str, Array]) -> None:
    """Adapters are float. KD-FedLLM also sends int64 tensors: top-k token indices and the proxy set's tokens
    and labels."""
    for name, array in tensors.items():
        is_indices = (
            isinstance(array, np.ndarray)
            and array.dtype == np.int64
            and name.endswith(("indices", "input_ids", "attention_mask", "labels"))
        )
        if not is_indices:
            _require_float_tensors(message, {name: array})


def _require_float_tensors(message: object, tensors: dict[str, Array]) -> None:
    for name, array in tensors.items():
        _require(
            isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating),
            f"{type(message).__name__} tensor {name!r} must be a float array",
        )


def _require_stage_tensors(message: Activations | Gradients) -> None:
    """The stage is known for this kind of message, and its tensors are the stage's, by name, dtype and shape."""
    what = type(message).__name__
    stages = sorted(stage for kind, stage in STAGE_TENSORS if kind is message.kind)
    rules = STAGE_TENSORS.get((message.kind, message.stage))
    if rules is None:
        raise ProtocolError(f"{what} has no stage {message.stage!r:.40}: its stages are {stages}")
    tensors = message.tensors
    required = [name for name, rule in rules.items() if rule.required]
    _require(
        set(required) <= set(tensors) <= set(rules),
        f"{what} of stage {message.stage!r} carries {required}"
        f"{'' if len(required) == len(rules) else f' (may carry {sorted(rules)})'}, got {sorted(tensors)}",
    )
    sizes: dict[str, int] = {}  # the named dimensions, as the first tensor to use each one set it
    for name, rule in rules.items():
        if name not in tensors:
            continue
        tensor = tensors[name]
        if rule.dtype == "float":
            _require_float_tensors(message, {name: tensor})
        else:
            _require(
                isinstance(tensor, np.ndarray) and tensor.dtype == np.dtype(rule.dtype),
                f"{what} tensor {name!r} must be an {rule.dtype} array",
            )
        expected = tuple(sizes.get(dim, dim) for dim in rule.dims)
        fits = tensor.ndim == len(rule.dims) and all(
            sizes.setdefault(dim, size) == size for dim, size in zip(rule.dims, tensor.shape, strict=False)
        )
        _require(
            fits,
            f"{name} must be {rule.dtype} of shape ({', '.join(rule.dims)}) = {expected}, got shape {tensor.shape}",
        )


@dataclass(frozen=True)
class Hello:
    """Client -> server, first: who this client is and which artifacts it runs."""

    kind: ClassVar[Kind] = Kind.HELLO
    client_id: str
    protocol_version: int  # informational: the frame header's version is the one enforced
    manifest_hash: str  # Manifest.manifest_hash; the server refuses a client running other artifacts
    token: str | None
    num_samples: int  # the client's training examples: FedAvg's weight
    # The layer its head ends at: checked against the server's exported cuts. None (or absent, from an older
    # client) is the export's one cut.
    cut_layer: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.cut_layer is None or (self.cut_layer >= 1 and not isinstance(self.cut_layer, bool)),
            f"Hello.cut_layer must be a layer >= 1, got {self.cut_layer!r:.40}",
        )
        _require(
            _CLIENT_ID.fullmatch(self.client_id) is not None,
            f"client_id must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got {self.client_id!r:.80}",
        )
        _require_counts(self, "protocol_version", "num_samples")


# eq=False on messages with tensors: dataclass == on dicts of arrays raises instead of comparing.
@dataclass(frozen=True, eq=False)
class Activations:
    """One stage's forward tensors, named as STAGE_TENSORS says. Client -> server for the split:

    activations (B, T, H) float, attention_mask (B, T) int64, labels (B, T) int64 with -100 = no loss.
    A U-shaped step also sends them server -> client (stage "upper": the middle's output).
    """

    kind: ClassVar[Kind] = Kind.ACTIVATIONS
    round: int
    step: int
    tensors: dict[str, Array]
    stage: str = SPLIT_STAGE

    def __post_init__(self) -> None:
        _require_counts(self, "round", "step")
        _require_stage_tensors(self)


@dataclass(frozen=True, eq=False)
class AdapterUpdate:
    """Client -> server at round end: the client's LoRA matrices, keyed by head.onnx input name."""

    kind: ClassVar[Kind] = Kind.ADAPTER_UPDATE
    round: int
    num_samples: int
    tensors: dict[str, Array]
    metrics: dict[str, float]

    def __post_init__(self) -> None:
        _require_counts(self, "round", "num_samples")
        _require_round_tensors(self, self.tensors)
        _require(
            all(isinstance(name, str) and is_number(value) for name, value in self.metrics.items()),
            "AdapterUpdate metrics must map names to numbers",
        )


@dataclass(frozen=True)
class Bye:
    """Client -> server, any time: the client is leaving."""

    kind: ClassVar[Kind] = Kind.BYE
    reason: str


@dataclass(frozen=True, eq=False)
class Welcome:
    """Server -> client after Hello: the session's settings and the current global client adapters."""

    kind: ClassVar[Kind] = Kind.WELCOME
    round: int
    total_rounds: int
    settings: SessionSettings
    tensors: dict[str, Array]

    def __post_init__(self) -> None:
        _require_counts(self, "round", "total_rounds")
        _require(isinstance(self.settings, SessionSettings), "Welcome.settings must be a SessionSettings")
        _require_round_tensors(self, self.tensors)


@dataclass(frozen=True, eq=False)
class Gradients:
    """One stage's backward tensors and the step's loss. Server -> client for the split: the loss, and
    activation_grads (B, T, H) unless the head is frozen. A U-shaped step also sends them client -> server
    (stage "upper": the device computed the loss, and `server_seconds` is then the device's time).

    `server_seconds` is the whole time the step spent with the server, from its arrival to this answer;
    `queue_seconds` (waiting for the shared tail, behind other clients' steps or the round's evaluation) and
    `compute_seconds` (the tail's forward, backward and optimiser step; a batched step's, shared with the
    clients batched with it) split it, so that queueing is never read as compute. Absent from an older sender."""

    kind: ClassVar[Kind] = Kind.GRADIENTS
    round: int
    step: int
    loss: float  # NaN travels: the client should see its run diverge
    server_seconds: float
    tensors: dict[str, Array]
    stage: str = SPLIT_STAGE
    queue_seconds: float | None = None
    compute_seconds: float | None = None

    def __post_init__(self) -> None:
        _require_counts(self, "round", "step", "server_seconds")
        _require_optional_counts(self, "queue_seconds", "compute_seconds")
        _require_stage_tensors(self)


@dataclass(frozen=True, eq=False)
class RoundResult:
    """Server -> client after AdapterUpdate: the new global adapters, and whether training is over.

    `eval_seconds`: how long the server's evaluation of the round took (part of the client's wait for this
    answer); None without an evaluation, or from an older sender."""

    kind: ClassVar[Kind] = Kind.ROUND_RESULT
    round: int
    next_round: int
    done: bool
    eval_loss: float | None
    tensors: dict[str, Array]
    eval_seconds: float | None = None

    def __post_init__(self) -> None:
        _require_counts(self, "round", "next_round")
        _require_optional_counts(self, "eval_seconds")
        _require_round_tensors(self, self.tensors)


@dataclass(frozen=True)
class Error:
    """Server -> client, any time: why the server is ending the conversation."""

    kind: ClassVar[Kind] = Kind.ERROR
    code: str  # machine-readable: "bad_token", "manifest_mismatch", "protocol", ...
    message: str  # for the person at the client's terminal

    def __post_init__(self) -> None:
        _require(self.code != "", "Error.code must not be empty")


Message: TypeAlias = Hello | Activations | AdapterUpdate | Bye | Welcome | Gradients | RoundResult | Error
MESSAGE_TYPES: dict[Kind, type[Message]] = {
    Kind.HELLO: Hello,
    Kind.WELCOME: Welcome,
    Kind.ACTIVATIONS: Activations,
    Kind.GRADIENTS: Gradients,
    Kind.ADAPTER_UPDATE: AdapterUpdate,
    Kind.ROUND_RESULT: RoundResult,
    Kind.ERROR: Error,
    Kind.BYE: Bye,
}
