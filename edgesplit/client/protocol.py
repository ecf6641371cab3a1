"""The edgesplit wire protocol, shared by the edge client and the cloud server.

Sans-I/O: `encode` turns a message into the bytes of one binary websocket frame, `decode` turns such bytes
back into a message or raises `ProtocolError`, and `Session` checks that messages come in the order the
protocol allows. Nothing here touches a socket, asyncio or torch: the client runs this file with numpy
alone, and the tests feed it bytes. The messages live in messages.py, how one tensor becomes bytes in
tensors.py, the Welcome's settings record in session_settings.py; all are re-exported here.

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
bool tensors travel as their own dtype ("wire": "raw"). int4k (int4k.py) is for a step's (B, T, H) tensors:
under it the other messages' float tensors (adapters) travel in fp32. Never pickle: a frame is untrusted input, and
unpickling untrusted input is running the peer's code.

The conversation (`TRANSITIONS` is the authority), for the split's one exchange a step:

    client                         server
    Hello             ------->
                      <-------     Welcome        settings, global client adapters
    per step:
      Activations     ------->                    stage "split"
                      <-------     Gradients      stage "split"
    per round end:
      AdapterUpdate   ------->
                      <-------     RoundResult    done=False: next round; done=True: closed
    Bye (any time)    ------->
                      <-------     Error (any time)

A U-shaped step (settings.exchange "u_shaped") holds two exchanges: Activations "lower" up, Activations
"upper" down, Gradients "upper" up, Gradients "lower" down.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from enum import Enum
from typing import TYPE_CHECKING, Any

from edgesplit.client.messages import MESSAGE_TYPES as MESSAGE_TYPES
from edgesplit.client.messages import SPLIT_STAGE as SPLIT_STAGE
from edgesplit.client.messages import STAGE_TENSORS as STAGE_TENSORS
from edgesplit.client.messages import Activations as Activations
from edgesplit.client.messages import AdapterUpdate as AdapterUpdate
from edgesplit.client.messages import Bye as Bye
from edgesplit.client.messages import Error as Error
from edgesplit.client.messages import Gradients as Gradients
from edgesplit.client.messages import Hello as Hello
from edgesplit.client.messages import Kind as Kind
from edgesplit.client.messages import Message as Message
from edgesplit.client.messages import RoundResult as RoundResult
from edgesplit.client.messages import TensorRule as TensorRule
from edgesplit.client.messages import Welcome as Welcome
from edgesplit.client.session_settings import EXCHANGES as EXCHANGES
from edgesplit.client.session_settings import FRAMEWORKS as FRAMEWORKS
from edgesplit.client.session_settings import SessionSettings as SessionSettings
from edgesplit.client.tensors import CLOSE_PROTOCOL_ERROR as CLOSE_PROTOCOL_ERROR
from edgesplit.client.tensors import CLOSE_TOO_BIG as CLOSE_TOO_BIG
from edgesplit.client.tensors import CLOSE_UNSUPPORTED_DATA as CLOSE_UNSUPPORTED_DATA
from edgesplit.client.tensors import Array as Array
from edgesplit.client.tensors import TensorHeader as TensorHeader
from edgesplit.client.tensors import Wire as Wire
from edgesplit.client.tensors import decode_tensor as decode_tensor
from edgesplit.client.tensors import encode_tensor as encode_tensor
from edgesplit.client.tensors import is_int, is_number
from edgesplit.client.tensors import tensor_nbytes_on_wire as tensor_nbytes_on_wire
from edgesplit.errors import ProtocolError

if TYPE_CHECKING:
    from edgesplit.client.artifacts import Manifest

# 2: Activations and Gradients name their stage; the Welcome's settings are a checked record.
PROTOCOL_VERSION = 2
MAGIC = b"ES"
_HEADER = struct.Struct("<2sBBI")  # magic, version, kind, metadata length
_INT4K_REBUILT_MAX = 1 << 32  # float32 bytes int4k tensors may rebuild to, for a decode without a frame limit


# ------------------------------------------------------------------------------------- encode / decode


def _parse_field(annotation: str, value: object) -> object:
    """A scalar field as decode found it in the JSON, checked against its annotation (a string, under
    `from __future__ import annotations`). A field of a type not handled here fails every decode."""
    if value is None and annotation.endswith(" | None"):
        return None
    expected = annotation.removesuffix(" | None")
    if expected == "int" and is_int(value):
        return value
    if expected == "float" and is_number(value):
        return float(value)
    if (expected, type(value)) in {("str", str), ("bool", bool)}:
        return value
    if expected == "SessionSettings" and isinstance(value, dict):
        return SessionSettings.from_mapping(value)  # raises ProtocolError with what is wrong
    if expected == "dict[str, float]" and isinstance(value, dict) and all(map(is_number, value.values())):
        return {name: float(number) for name, number in value.items()}
    raise TypeError(f"expected {annotation}, got {type(value).__name__}")


def encode(message: Message, wire: Wire = Wire.FP32) -> bytes:
    """The bytes of one binary frame. `wire` applies to float tensors; the others always travel raw. int4k
    applies to Activations and Gradients (whose float tensors are all (B, T, H)): the rest go in fp32."""
    if wire is Wire.INT4K and not isinstance(message, Activations | Gradients):
        wire = Wire.FP32
    metadata: dict[str, object] = {}
    tensors: dict[str, Array] = {}
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        if field.name == "tensors":
            tensors = value
        elif value is None and field.default is None:
            continue  # an optional field left unset: the frame is the one an older sender would write
        else:
            metadata[field.name] = value.to_json() if isinstance(value, SessionSettings) else value
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
    # int4k's row (a scale, 8 outliers and their indices, the codes) outgrows fp32's for a hidden size under 12.
    activations = batch * seq * (max(hidden * 4, tensor_nbytes_on_wire((1, hidden), "float32", Wire.INT4K)) + 16)
    matrices = {**manifest.lora.matrices, **manifest.top_matrices}  # a U-shaped device's adapters include its top's
    adapters = sum(math.prod(shape) * 4 for shape in matrices.values())
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
    tensors = _decode_payload(kind, metadata.pop("tensors", None), view[payload_start:], max_size)
    return _build(kind, metadata, tensors)


def _decode_payload(kind: Kind, entries: object, payload: memoryview, max_size: int | None) -> dict[str, Array]:
    if not isinstance(entries, list):
        raise ProtocolError(f"{kind.name} metadata needs a 'tensors' list")
    headers = [TensorHeader.from_json(entry) for entry in entries]
    # An int4k row left out costs a bit: bound what its zeros rebuild by what the frame could hold in fp32.
    rebuilt = sum(4 * math.prod(header.shape) for header in headers if header.wire is Wire.INT4K)
    if rebuilt > (_INT4K_REBUILT_MAX if max_size is None else max_size):
        raise ProtocolError(
            f"{kind.name} frame's int4k tensors rebuild to {rebuilt} bytes, more than this session's"
            f" frame limit of {max_size or _INT4K_REBUILT_MAX} bytes in fp32",
            CLOSE_TOO_BIG,
        )
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
    cls = MESSAGE_TYPES[kind]
    fields = {field.name: str(field.type) for field in dataclasses.fields(cls)}
    # A field with a default may be absent: an older peer does not send it (Hello.cut_layer).
    optional = {field.name for field in dataclasses.fields(cls) if field.default is not dataclasses.MISSING}
    carries_tensors = fields.pop("tensors", None) is not None
    if tensors and not carries_tensors:
        raise ProtocolError(f"{kind.name} carries no tensors, the frame has {sorted(tensors)}")
    missing, unexpected = fields.keys() - metadata.keys() - optional, metadata.keys() - fields.keys()
    if missing or unexpected:
        raise ProtocolError(f"{kind.name} metadata: missing fields {sorted(missing)}, unexpected {sorted(unexpected)}")
    values: dict[str, Any] = {}
    for name, annotation in fields.items():
        if name not in metadata:
            continue  # an optional field left out: its default
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
    TRAINING = "training"  # the client may start a step (Activations) or send its AdapterUpdate
    AWAIT_GRADIENTS = "await_gradients"  # split: the server's Gradients close the step
    AWAIT_UPPER_ACTIVATIONS = "await_upper_activations"  # U-shaped: the server's middle output
    AWAIT_UPPER_GRADIENTS = "await_upper_gradients"  # U-shaped: the device's gradient at the upper cut
    AWAIT_LOWER_GRADIENTS = "await_lower_gradients"  # U-shaped: the server's gradient at the lower cut
    AWAIT_ROUND_RESULT = "await_round_result"
    CLOSED = "closed"


_OPEN_STATES = [state for state in State if state is not State.CLOSED]

# Everything that moves the conversation: (receiving role, state, kind, stage) -> next state; the stage is
# None for the kinds that have none. Both sides walk the same states, so a sender checks the entry under
# its peer's role: what one may not send, the other may not receive. Rules the table cannot hold live in
# Session._refusal (the stage belongs to the session's exchange; one step's exchanges name one round and
# step) and next_state (RoundResult with done=True goes to CLOSED). Welcome comes once; later rounds take
# their adapters from RoundResult.
TRANSITIONS: dict[tuple[Role, State, Kind, str | None], State] = {
    (Role.SERVER, State.AWAIT_HELLO, Kind.HELLO, None): State.AWAIT_WELCOME,
    (Role.CLIENT, State.AWAIT_WELCOME, Kind.WELCOME, None): State.TRAINING,
    # The split: one exchange a step.
    (Role.SERVER, State.TRAINING, Kind.ACTIVATIONS, SPLIT_STAGE): State.AWAIT_GRADIENTS,
    (Role.CLIENT, State.AWAIT_GRADIENTS, Kind.GRADIENTS, SPLIT_STAGE): State.TRAINING,
    # The U-shape: up the lower cut, down the upper cut, its gradient up, the lower cut's gradient down.
    (Role.SERVER, State.TRAINING, Kind.ACTIVATIONS, "lower"): State.AWAIT_UPPER_ACTIVATIONS,
    (Role.CLIENT, State.AWAIT_UPPER_ACTIVATIONS, Kind.ACTIVATIONS, "upper"): State.AWAIT_UPPER_GRADIENTS,
    (Role.SERVER, State.AWAIT_UPPER_GRADIENTS, Kind.GRADIENTS, "upper"): State.AWAIT_LOWER_GRADIENTS,
    (Role.CLIENT, State.AWAIT_LOWER_GRADIENTS, Kind.GRADIENTS, "lower"): State.TRAINING,
    (Role.SERVER, State.TRAINING, Kind.ADAPTER_UPDATE, None): State.AWAIT_ROUND_RESULT,
    (Role.CLIENT, State.AWAIT_ROUND_RESULT, Kind.ROUND_RESULT, None): State.TRAINING,
    **{(Role.SERVER, state, Kind.BYE, None): State.CLOSED for state in _OPEN_STATES},
    **{(Role.CLIENT, state, Kind.ERROR, None): State.CLOSED for state in _OPEN_STATES},
}


def stage_of(message: Message) -> str | None:
    return message.stage if isinstance(message, Activations | Gradients) else None


def kind_may_come(receiver: Role, state: State, kind: Kind) -> bool:
    """Whether some message of `kind` (of any stage) may reach `receiver` in `state`: what a frame's header
    alone can tell, before its payload is decoded."""
    return any(key[:3] == (receiver, state, kind) for key in TRANSITIONS)


def next_state(receiver: Role, state: State, message: Message) -> State | None:
    """Where the conversation goes when `receiver` gets `message` in `state`; None if it may not."""
    after = TRANSITIONS.get((receiver, state, message.kind, stage_of(message)))
    if after is not None and isinstance(message, RoundResult) and message.done:
        return State.CLOSED
    return after


class Session:
    """One side of one conversation: encodes, decodes, enforces the order, counts bytes. No I/O.

    The runtime sends the bytes `send` returns and passes every binary frame it gets to `receive`. A
    ProtocolError from `receive` closes the session: close the socket with the error's `close_code`.
    The session keeps what the Welcome negotiated (`settings`, and so the step's `wire`).
    """

    def __init__(self, role: Role, max_size: int | None = None) -> None:
        self.role = role
        self.peer = Role.SERVER if role is Role.CLIENT else Role.CLIENT
        self.max_size = max_size
        self.state = State.AWAIT_HELLO
        self.settings: SessionSettings | None = None  # from the Welcome, sent or received
        self.step_in_progress: tuple[int, int] | None = None  # (round, step) while a step's exchanges run
        self.bytes_sent: dict[str, int] = {}  # Kind name -> frame bytes
        self.bytes_received: dict[str, int] = {}

    @property
    def wire(self) -> Wire:
        """How this session's float tensors travel: the Welcome's choice, fp32 until then."""
        return Wire.FP32 if self.settings is None else self.settings.wire

    def send(self, message: Message, wire: Wire | None = None) -> bytes:
        """The frame to send, in `wire` (default: the session's); ProtocolError, and no state change, if this
        side may not send it now."""
        after = next_state(self.peer, self.state, message)
        if after is None:
            raise ProtocolError(f"the {self.role.value} may not send {message.kind.name} in state {self.state.name}")
        refusal = self._refusal(message)
        if refusal is not None:
            raise ProtocolError(f"the {self.role.value} may not send it: {refusal}")
        frame = encode(message, self.wire if wire is None else wire)
        self._advance(message, after)
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
            refusal = self._refusal(message)
            if refusal is not None:
                raise ProtocolError(refusal)
        except ProtocolError:
            # As in h11: once a peer has broken the protocol, nothing more it sends can be trusted.
            self.state = State.CLOSED
            raise
        self._advance(message, after)
        return message

    def _refusal(self, message: Message) -> str | None:
        """Why a message the table allows may still not come now, or None."""
        if not isinstance(message, Activations | Gradients):
            return None
        stages = EXCHANGES["split"] if self.settings is None else self.settings.stages
        if message.stage not in stages:
            return f"{message.kind.name} of stage {message.stage!r}: this session's steps use {list(stages)}"
        if self.step_in_progress not in (None, (message.round, message.step)):
            step_round, step = self.step_in_progress
            return (
                f"{message.kind.name} for round {message.round + 1} step {message.step + 1} in the middle of"
                f" round {step_round + 1} step {step + 1}"
            )
        return None

    def _advance(self, message: Message, after: State) -> None:
        if isinstance(message, Welcome):
            self.settings = message.settings
        if isinstance(message, Activations | Gradients):
            # Back in TRAINING the step is over; anywhere else its next exchange must name it again.
            self.step_in_progress = None if after is State.TRAINING else (message.round, message.step)
        self.state = after
