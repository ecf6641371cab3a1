"""The edgesplit wire protocol, shared by the edge client and the cloud server.

Sans-I/O: `encode` turns a message into the bytes of one binary websocket frame, `decode` turns such bytes
back into a message or raises `ProtocolError`, and `Session` checks that messages come in the order the
protocol allows. Nothing here touches a socket, asyncio or torch: the client runs this file with numpy
alone, and the tests feed it bytes.

A frame, little-endian:

    offset  size  field
    0       2     magic b"ES"
    2       1     protocol version (PROTOCOL_VERSION)
    3       1     message kind (`Kind`)
    4       4     u32 length M of the metadata
    8       M     metadata: a UTF-8 JSON object, the message's scalar fields plus
                  "tensors": [{"name", "dtype", "shape", "wire", "nbytes"}, ...] in payload order
    8+M     ...   payload: the tensors' wire bytes, concatenated; nothing after the last

Float tensors travel in the `Wire` encoding the sender picks and always decode to float32; integer and
bool tensors travel as their own dtype ("wire": "raw"). Never pickle: a frame is untrusted input, and
unpickling untrusted input is running the peer's code.

The conversation (`TRANSITIONS` is the authority):

    client                         server
    Hello             ------->
                      <-------     Welcome        settings, global client adapters
    per step:
      Activations     ------->
                      <-------     Gradients
    per round end:
      AdapterUpdate   ------->
                      <-------     RoundResult    done=False: next round; done=True: closed
    Bye (any time)    ------->
                      <-------     Error (any time)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeGuard

import numpy as np
import numpy.typing as npt

from edgesplit.errors import ProtocolError

if TYPE_CHECKING:
    from edgesplit.client.artifacts import Manifest

PROTOCOL_VERSION = 1
MAGIC = b"ES"
_HEADER = struct.Struct("<2sBBI")  # magic, version, kind, metadata length

# Websocket close codes (RFC 6455) carried by ProtocolError.
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009

Array: TypeAlias = npt.NDArray[Any]


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


class Wire(str, Enum):
    """How float tensors travel. The server picks one for the session (settings["wire"])."""

    FP32 = "fp32"
    FP16 = "fp16"  # half the bytes; values beyond float16's +-65504 are refused rather than sent as inf
    INT8 = "int8"  # a quarter of the bytes, plus one float32 scale per row (per token, for activations)


# ---------------------------------------------------------------------------------------------- tensors

_RAW = "raw"
# Integer and bool tensors travel as themselves; little-endian spelled out so a big-endian host agrees.
_RAW_DTYPES: dict[str, np.dtype[Any]] = {
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int8": np.dtype("i1"),
    "bool": np.dtype("?"),
}
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_MAX_NDIM = 8
# numpy refuses shapes whose non-zero dimensions multiply past its index range, even for an empty array,
# so a zero-sized tensor could otherwise declare (0, 2**40, 2**40) and make reshape fail.
_MAX_ELEMENTS = 2**40


@dataclass(frozen=True)
class TensorHeader:
    """One entry of the metadata's "tensors" list: everything `decode_tensor` needs besides the bytes."""

    name: str
    dtype: str  # what decode returns: "float32" for every float tensor, else a key of _RAW_DTYPES
    shape: tuple[int, ...]
    wire: Wire | None  # None for raw tensors ("raw" in the JSON)
    nbytes: int

    def __post_init__(self) -> None:
        if self.dtype != "float32" and self.dtype not in _RAW_DTYPES:
            raise ProtocolError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r:.40}", CLOSE_UNSUPPORTED_DATA)
        if (self.dtype == "float32") != (self.wire is not None):
            raise ProtocolError(
                f"tensor {self.name!r}: float32 tensors travel as fp32, fp16 or int8 and other dtypes raw,"
                f" got {self.dtype} as {self.wire_name}",
                CLOSE_UNSUPPORTED_DATA,
            )
        if (
            len(self.shape) > _MAX_NDIM
            or any(dim < 0 for dim in self.shape)
            or math.prod(max(dim, 1) for dim in self.shape) > _MAX_ELEMENTS
        ):
            raise ProtocolError(f"tensor {self.name!r}: impossible shape {list(self.shape)!r:.100}")
        expected = _payload_nbytes(self.shape, self.dtype, self.wire)
        if self.nbytes != expected:
            raise ProtocolError(
                f"tensor {self.name!r}: shape {list(self.shape)} of {self.dtype} as {self.wire_name}"
                f" takes {expected} bytes, header says {self.nbytes}"
            )

    @property
    def wire_name(self) -> str:
        return _RAW if self.wire is None else self.wire.value

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "wire": self.wire_name,
            "nbytes": self.nbytes,
        }

    @staticmethod
    def from_json(raw: object) -> TensorHeader:
        keys = {"name", "dtype", "shape", "wire", "nbytes"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise ProtocolError(f"a tensor header is an object with exactly the keys {sorted(keys)}, got {raw!r:.200}")
        name, dtype, shape, wire, nbytes = raw["name"], raw["dtype"], raw["shape"], raw["wire"], raw["nbytes"]
        if not (
            isinstance(name, str)
            and name
            and isinstance(dtype, str)
            and isinstance(shape, list)
            and all(map(_is_int, shape))
            and isinstance(wire, str)
            and _is_int(nbytes)
        ):
            raise ProtocolError(
                f"a tensor header needs a non-empty name, string dtype and wire, integer shape list and"
                f" integer nbytes, got {raw!r:.200}"
            )
        wires = {member.value: member for member in Wire}
        if wire != _RAW and wire not in wires:
            raise ProtocolError(f"tensor {name!r}: unknown wire encoding {wire!r:.40}", CLOSE_UNSUPPORTED_DATA)
        return TensorHeader(name, dtype, tuple(shape), None if wire == _RAW else wires[wire], nbytes)


def _payload_nbytes(shape: Sequence[int], dtype: str, wire: Wire | None) -> int:
    count = math.prod(shape)
    if wire is None:
        return count * _RAW_DTYPES[dtype].itemsize
    if wire is Wire.FP32:
        return 4 * count
    if wire is Wire.FP16:
        return 2 * count
    return 4 * math.prod(shape[:-1]) + count  # one float32 scale per row, then one int8 per value


def _wire_format(dtype: np.dtype[Any], wire: Wire) -> tuple[str, Wire | None]:
    """The (decoded dtype, wire) a tensor of `dtype` travels as when the message's encoding is `wire`."""
    if np.issubdtype(dtype, np.floating):
        return "float32", wire
    if dtype.name in _RAW_DTYPES:
        return dtype.name, None
    raise ProtocolError(f"cannot send a {dtype} tensor: send float, int64, int32, int8 or bool", CLOSE_UNSUPPORTED_DATA)


def tensor_nbytes_on_wire(shape: Sequence[int], dtype: npt.DTypeLike, wire: Wire) -> int:
    """Payload bytes of one tensor of this shape and dtype in encoding `wire` (its metadata not counted)."""
    return _payload_nbytes(tuple(shape), *_wire_format(np.dtype(dtype), Wire(wire)))


def _rows(shape: Sequence[int]) -> tuple[int, int]:
    """int8 quantises along the last axis: (number of rows, row length); a 0-d tensor is one row of one."""
    return math.prod(shape[:-1]), (shape[-1] if shape else 1)


def encode_tensor(name: str, array: Array, wire: Wire = Wire.FP32) -> tuple[TensorHeader, bytes]:
    """A tensor's metadata entry and wire bytes. Raises ProtocolError if `wire` cannot carry it."""
    wire = Wire(wire)
    dtype, tensor_wire = _wire_format(array.dtype, wire)
    shape = tuple(int(dim) for dim in array.shape)
    if tensor_wire is None:
        data = array.astype(_RAW_DTYPES[dtype], copy=False).tobytes()
    elif tensor_wire is Wire.FP32:
        data = array.astype(_F32, copy=False).tobytes()
    elif tensor_wire is Wire.FP16:
        with np.errstate(over="ignore"):
            half = array.astype(_F16)
        if np.any(np.isinf(half) & np.isfinite(array)):
            raise ProtocolError(
                f"tensor {name!r} has values beyond float16's range (+-65504): use wire fp32 or int8",
                CLOSE_UNSUPPORTED_DATA,
            )
        data = half.tobytes()
    else:
        values = array.astype(_F32, copy=False)
        if not np.isfinite(values).all():
            # A NaN would poison its row's scale and silently zero the whole token.
            raise ProtocolError(f"tensor {name!r} holds NaN or inf, which int8 cannot carry", CLOSE_UNSUPPORTED_DATA)
        rows = values.reshape(_rows(shape))
        scales = (np.max(np.abs(rows), axis=1, initial=0.0) / 127).astype(_F32)
        # An all-zero row, or one so small that its scale underflows, still needs a divisor.
        scales[scales == 0] = 1
        quantised = np.clip(np.rint(rows / scales[:, None]), -127, 127).astype(np.int8)
        data = scales.tobytes() + quantised.tobytes()
    return TensorHeader(name, dtype, shape, tensor_wire, len(data)), data


def decode_tensor(header: TensorHeader, data: bytes | memoryview) -> Array:
    """Rebuild a tensor from its wire bytes: a new, writable, C-contiguous array, float32 for floats."""
    if len(data) != header.nbytes:
        raise ProtocolError(f"tensor {header.name!r}: expected {header.nbytes} bytes, got {len(data)}")
    # astype copies: the result must not pin, or alias, the frame it came from.
    if header.wire is None:
        if header.dtype == "bool" and np.frombuffer(data, np.uint8).max(initial=0) > 1:
            raise ProtocolError(f"tensor {header.name!r}: bool bytes must be 0 or 1", CLOSE_UNSUPPORTED_DATA)
        array = np.frombuffer(data, _RAW_DTYPES[header.dtype]).astype(header.dtype)
    elif header.wire is Wire.FP32:
        array = np.frombuffer(data, _F32).astype(np.float32)
    elif header.wire is Wire.FP16:
        array = np.frombuffer(data, _F16).astype(np.float32)
    else:
        num_rows, row_len = _rows(header.shape)
        scales = np.frombuffer(data[: 4 * num_rows], _F32).astype(np.float32)
        if not np.all(np.isfinite(scales) & (scales > 0)):
            raise ProtocolError(f"tensor {header.name!r}: int8 scales must be finite and positive")
        quantised = np.frombuffer(data[4 * num_rows :], np.int8).reshape(num_rows, row_len)
        with np.errstate(over="ignore"):  # a scale near float32's limit times 127 is inf, as it was sent
            array = quantised.astype(np.float32) * scales[:, None]
    return array.reshape(header.shape)


# --------------------------------------------------------------------------------------------- messages

_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # it ends up in file names and log lines


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count of 1


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)


def _require_counts(message: object, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        _require(value >= 0, f"{type(message).__name__}.{name} must be >= 0, got {value}")


def _require_round_tensors(message: object, tensors: dict[str, Array]) -> None:
    """Adapters are float. KD-FedLLM also sends int64 tensors: top-k token indices and the proxy set's tokens."""
    for name, array in tensors.items():
        is_indices = (
            isinstance(array, np.ndarray)
            and array.dtype == np.int64
            and name.endswith(("indices", "input_ids", "attention_mask"))
        )
        if not is_indices:
            _require_float_tensors(message, {name: array})


def _require_float_tensors(message: object, tensors: dict[str, Array]) -> None:
    for name, array in tensors.items():
        _require(
            isinstance(array, np.ndarray) and np.issubdtype(array.dtype, np.floating),
            f"{type(message).__name__} tensor {name!r} must be a float array",
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

    def __post_init__(self) -> None:
        _require(
            _CLIENT_ID.fullmatch(self.client_id) is not None,
            f"client_id must be 1 to 64 characters of A-Z a-z 0-9 . _ -, got {self.client_id!r:.80}",
        )
        _require_counts(self, "protocol_version", "num_samples")


# eq=False on messages with tensors: dataclass == on dicts of arrays raises instead of comparing.
@dataclass(frozen=True, eq=False)
class Activations:
    """Client -> server: the head's output for one batch.

    activations (B, T, H) float, attention_mask (B, T) int64, labels (B, T) int64 with -100 = no loss.
    """

    kind: ClassVar[Kind] = Kind.ACTIVATIONS
    round: int
    step: int
    tensors: dict[str, Array]

    def __post_init__(self) -> None:
        _require_counts(self, "round", "step")
        names = {"activations", "attention_mask", "labels"}
        _require(set(self.tensors) == names, f"Activations carries {sorted(names)}, got {sorted(self.tensors)}")
        activations = self.tensors["activations"]
        _require_float_tensors(self, {"activations": activations})
        _require(activations.ndim == 3, f"activations must be (B, T, H), got shape {activations.shape}")
        for name in ("attention_mask", "labels"):
            tensor = self.tensors[name]
            _require(
                isinstance(tensor, np.ndarray) and tensor.dtype == np.int64 and tensor.shape == activations.shape[:2],
                f"{name} must be int64 of shape (B, T) = {activations.shape[:2]}",
            )


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
            all(isinstance(name, str) and _is_number(value) for name, value in self.metrics.items()),
            "AdapterUpdate metrics must map names to numbers",
        )


@dataclass(frozen=True)
class Bye:
    """Client -> server, any time: the client is leaving."""

    kind: ClassVar[Kind] = Kind.BYE
    reason: str


@dataclass(frozen=True, eq=False)
class Welcome:
    """Server -> client after Hello: the run's settings and the current global client adapters."""

    kind: ClassVar[Kind] = Kind.WELCOME
    round: int
    total_rounds: int
    # steps_per_round, learning_rate, wire, batch_size, max_seq_len, frozen_head, ...
    settings: dict[str, object]
    tensors: dict[str, Array]

    def __post_init__(self) -> None:
        _require_counts(self, "round", "total_rounds")
        _require_round_tensors(self, self.tensors)
        try:
            # json.dumps would turn a key 1 into "1", and the settings would not round-trip.
            _require(all(isinstance(key, str) for key in self.settings), "Welcome settings keys must be strings")
            json.dumps(self.settings)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"Welcome settings must be a JSON object: {exc}") from exc


@dataclass(frozen=True, eq=False)
class Gradients:
    """Server -> client per step: the loss, and activation_grads (B, T, H) unless the head is frozen."""

    kind: ClassVar[Kind] = Kind.GRADIENTS
    round: int
    step: int
    loss: float  # NaN travels: the client should see its run diverge
    server_seconds: float
    tensors: dict[str, Array]

    def __post_init__(self) -> None:
        _require_counts(self, "round", "step", "server_seconds")
        _require(
            set(self.tensors) <= {"activation_grads"},
            f"Gradients carries only activation_grads, got {sorted(self.tensors)}",
        )
        _require_float_tensors(self, self.tensors)
        _require(all(grads.ndim == 3 for grads in self.tensors.values()), "activation_grads must be (B, T, H)")


@dataclass(frozen=True, eq=False)
class RoundResult:
    """Server -> client after AdapterUpdate: the new global adapters, and whether training is over."""

    kind: ClassVar[Kind] = Kind.ROUND_RESULT
    round: int
    next_round: int
    done: bool
    eval_loss: float | None
    tensors: dict[str, Array]

    def __post_init__(self) -> None:
        _require_counts(self, "round", "next_round")
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
_MESSAGE_TYPES: dict[Kind, type[Message]] = {
    Kind.HELLO: Hello,
    Kind.WELCOME: Welcome,
    Kind.ACTIVATIONS: Activations,
    Kind.GRADIENTS: Gradients,
    Kind.ADAPTER_UPDATE: AdapterUpdate,
    Kind.ROUND_RESULT: RoundResult,
    Kind.ERROR: Error,
    Kind.BYE: Bye,
}


# ------------------------------------------------------------------------------------- encode / decode


def _parse_field(annotation: str, value: object) -> object:
    """A scalar field as decode found it in the JSON, checked against its annotation (a string, under
    `from __future__ import annotations`). A field of a type not handled here fails every decode."""
    if value is None and annotation.endswith(" | None"):
        return None
    expected = annotation.removesuffix(" | None")
    if expected == "int" and _is_int(value):
        return value
    if expected == "float" and _is_number(value):
        return float(value)
    if (expected, type(value)) in {("str", str), ("bool", bool), ("dict[str, object]", dict)}:
        return value
    if expected == "dict[str, float]" and isinstance(value, dict) and all(map(_is_number, value.values())):
        return {name: float(number) for name, number in value.items()}
    raise TypeError(f"expected {annotation}, got {type(value).__name__}")


def encode(message: Message, wire: Wire = Wire.FP32) -> bytes:
    """The bytes of one binary frame. `wire` applies to float tensors; the others always travel raw."""
    metadata: dict[str, object] = {}
    tensors: dict[str, Array] = {}
    for field in dataclasses.fields(message):
        if field.name == "tensors":
            tensors = getattr(message, field.name)
        else:
            metadata[field.name] = getattr(message, field.name)
    encoded = [encode_tensor(name, array, wire) for name, array in tensors.items()]
    metadata["tensors"] = [header.to_json() for header, _ in encoded]
    metadata_bytes = json.dumps(metadata, separators=(",", ":")).encode()
    header = _HEADER.pack(MAGIC, PROTOCOL_VERSION, message.kind, len(metadata_bytes))
    return b"".join([header, metadata_bytes, *(data for _, data in encoded)])


def max_frame_bytes(manifest: Manifest) -> int:
    """The largest frame either side of a session on these artifacts may send, plus 1 MiB for the headers.

    The largest payloads are a step's float32 activations (or their gradients) with the int64 labels and
    attention mask, and a set of adapters.
    """
    batch, seq, hidden = manifest.activations_shape
    activations = batch * seq * (hidden * 4 + 16)
    adapters = sum(math.prod(shape) * 4 for shape in manifest.lora.matrices.values())
    return max(activations, adapters) + (1 << 20)


def decode(frame: bytes | bytearray, max_size: int | None = None) -> Message:
    """The message in one binary frame. Raises ProtocolError, and nothing else, for any bytes."""
    try:
        return _decode(frame, max_size)
    except ProtocolError:
        raise
    except Exception as exc:
        # The peer is untrusted and decode runs inside the event loop: a check this module forgot must
        # still close one connection with a code, not kill the server. The fuzz tests keep this unreached.
        raise ProtocolError(f"undecodable frame (a gap in edgesplit's checks): {exc!r:.200}") from exc


def _decode(frame: bytes | bytearray, max_size: int | None) -> Message:
    if not isinstance(frame, bytes | bytearray):
        raise ProtocolError(f"expected a binary frame, got {type(frame).__name__}", CLOSE_UNSUPPORTED_DATA)
    # Every size below is checked against len(frame) before anything is allocated.
    if max_size is not None and len(frame) > max_size:
        raise ProtocolError(f"frame of {len(frame)} bytes is over the limit of {max_size}", CLOSE_TOO_BIG)
    if len(frame) < _HEADER.size:
        raise ProtocolError(f"frame of {len(frame)} bytes is shorter than the {_HEADER.size}-byte header")
    magic, version, kind_byte, metadata_len = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise ProtocolError(f"not an edgesplit frame: starts with {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"the peer speaks edgesplit protocol version {version}, this side speaks version"
            f" {PROTOCOL_VERSION}: upgrade the older side"
        )
    try:
        kind = Kind(kind_byte)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind_byte}", CLOSE_UNSUPPORTED_DATA) from None
    payload_start = _HEADER.size + metadata_len
    if payload_start > len(frame):
        raise ProtocolError(
            f"{kind.name} frame truncated: metadata of {metadata_len} bytes declared,"
            f" {len(frame) - _HEADER.size} bytes follow the header"
        )
    view = memoryview(frame)
    try:
        metadata = json.loads(bytes(view[_HEADER.size : payload_start]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{kind.name} metadata is not UTF-8 JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ProtocolError(f"{kind.name} metadata must be a JSON object, got {type(metadata).__name__}")
    tensors = _decode_payload(kind, metadata.pop("tensors", None), view[payload_start:])
    return _build(kind, metadata, tensors)


def _decode_payload(kind: Kind, entries: object, payload: memoryview) -> dict[str, Array]:
    if not isinstance(entries, list):
        raise ProtocolError(f"{kind.name} metadata needs a 'tensors' list")
    headers = [TensorHeader.from_json(entry) for entry in entries]
    if len({header.name for header in headers}) != len(headers):
        raise ProtocolError(f"{kind.name} frame names a tensor twice")
    declared = sum(header.nbytes for header in headers)
    if declared != len(payload):
        problem = "is truncated" if declared > len(payload) else "has trailing bytes"
        raise ProtocolError(
            f"{kind.name} frame {problem}: its tensors declare {declared} payload bytes, it carries {len(payload)}"
        )
    tensors: dict[str, Array] = {}
    offset = 0
    for header in headers:
        tensors[header.name] = decode_tensor(header, payload[offset : offset + header.nbytes])
        offset += header.nbytes
    return tensors


def _build(kind: Kind, metadata: dict[str, Any], tensors: dict[str, Array]) -> Message:
    cls = _MESSAGE_TYPES[kind]
    fields = {field.name: str(field.type) for field in dataclasses.fields(cls)}
    carries_tensors = fields.pop("tensors", None) is not None
    if tensors and not carries_tensors:
        raise ProtocolError(f"{kind.name} carries no tensors, the frame has {sorted(tensors)}")
    missing, unexpected = fields.keys() - metadata.keys(), metadata.keys() - fields.keys()
    if missing or unexpected:
        raise ProtocolError(f"{kind.name} metadata: missing fields {sorted(missing)}, unexpected {sorted(unexpected)}")
    values: dict[str, Any] = {}
    for name, annotation in fields.items():
        try:
            values[name] = _parse_field(annotation, metadata[name])
        except (TypeError, OverflowError) as exc:
            raise ProtocolError(f"{kind.name}.{name}: {exc}") from None
    if carries_tensors:
        values["tensors"] = tensors
    return cls(**values)  # __post_init__ checks the values, as it does for the sender


# ---------------------------------------------------------------------------------------------- session


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    """Where the conversation stands, named by what it waits for. Both sides start in AWAIT_HELLO."""

    AWAIT_HELLO = "await_hello"
    AWAIT_WELCOME = "await_welcome"
    TRAINING = "training"  # the client may send Activations or AdapterUpdate
    AWAIT_GRADIENTS = "await_gradients"
    AWAIT_ROUND_RESULT = "await_round_result"
    CLOSED = "closed"


_OPEN_STATES = [state for state in State if state is not State.CLOSED]

# Everything that moves the conversation: (receiving role, state, kind) -> next state. Both sides walk the
# same states, so a sender checks the entry under its peer's role: what one may not send, the other may
# not receive. The one rule the table cannot hold: RoundResult with done=True goes to CLOSED (next_state).
# Welcome comes once; later rounds take their adapters from RoundResult.
TRANSITIONS: dict[tuple[Role, State, Kind], State] = {
    (Role.SERVER, State.AWAIT_HELLO, Kind.HELLO): State.AWAIT_WELCOME,
    (Role.CLIENT, State.AWAIT_WELCOME, Kind.WELCOME): State.TRAINING,
    (Role.SERVER, State.TRAINING, Kind.ACTIVATIONS): State.AWAIT_GRADIENTS,
    (Role.CLIENT, State.AWAIT_GRADIENTS, Kind.GRADIENTS): State.TRAINING,
    (Role.SERVER, State.TRAINING, Kind.ADAPTER_UPDATE): State.AWAIT_ROUND_RESULT,
    (Role.CLIENT, State.AWAIT_ROUND_RESULT, Kind.ROUND_RESULT): State.TRAINING,
    **{(Role.SERVER, state, Kind.BYE): State.CLOSED for state in _OPEN_STATES},
    **{(Role.CLIENT, state, Kind.ERROR): State.CLOSED for state in _OPEN_STATES},
}


def next_state(receiver: Role, state: State, message: Message) -> State | None:
    """Where the conversation goes when `receiver` gets `message` in `state`; None if it may not."""
    after = TRANSITIONS.get((receiver, state, message.kind))
    if after is not None and isinstance(message, RoundResult) and message.done:
        return State.CLOSED
    return after


class Session:
    """One side of one conversation: encodes, decodes, enforces the order, counts bytes. No I/O.

    The runtime sends the bytes `send` returns and passes every binary frame it gets to `receive`. A
    ProtocolError from `receive` closes the session: close the socket with the error's `close_code`.
    """

    def __init__(self, role: Role, max_size: int | None = None) -> None:
        self.role = role
        self.peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.max_size = max_size
        self.state = State.AWAIT_HELLO
        self.bytes_sent: dict[str, int] = {}  # Kind name -> frame bytes
        self.bytes_received: dict[str, int] = {}

    def send(self, message: Message, wire: Wire = Wire.FP32) -> bytes:
        """The frame to send; ProtocolError (and no state change) if this side may not send it now."""
        after = next_state(self.peer, self.state, message)
        if after is None:
            raise ProtocolError(f"the {self.role.value} may not send {message.kind.name} in state {self.state.name}")
        frame = encode(message, wire)
        self.state = after
        kind = message.kind.name
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + len(frame)
        return frame

    def receive(self, frame: bytes) -> Message:
        """The message in `frame`, if it is valid and may come now; otherwise ProtocolError, and CLOSED."""
        try:
            message = decode(frame, self.max_size)
            kind = message.kind.name
            self.bytes_received[kind] = self.bytes_received.get(kind, 0) + len(frame)
            after = next_state(self.role, self.state, message)
            if after is None:
                raise ProtocolError(f"unexpected {message.kind.name} in state {self.state.name}")
        except ProtocolError:
            # As in h11: once a peer has broken the protocol, nothing more it sends can be trusted.
            self.state = State.CLOSED
            raise
        self.state = after
        return message
