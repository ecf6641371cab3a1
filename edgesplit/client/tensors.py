"""Tensors on the wire: a small header (name, dtype, shape, encoding, byte count) plus raw bytes, never pickle.

Split out of the protocol module, which re-exports everything here: the frame layout and the messages live
there, how one array becomes bytes and back lives here. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeAlias, TypeGuard

import numpy as np
import numpy.typing as npt

from edgesplit.client.int4k import (
    INT4_TOP,
    decode_int4k,
    encode_int4k,
    header_problem,
    int4k_nbytes,
    pack_nibbles,
    unpack_nibbles,
)
from edgesplit.errors import ProtocolError

# Websocket close codes (RFC 6455) carried by ProtocolError.
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_TOO_BIG = 1009

Array: TypeAlias = npt.NDArray[Any]


class Wire(str, Enum):
    """How float tensors travel. The server picks one for the session (settings["wire"])."""

    FP32 = "fp32"
    FP16 = "fp16"  # half the bytes; values beyond float16's +-65504 are refused rather than sent as inf
    INT8 = "int8"  # a quarter of the bytes, plus one float32 scale per row (per token, for activations)
    INT4 = "int4"  # an eighth of the bytes (two values a byte), plus one float32 scale per row
    # int4 with a float16 scale per row, each row's 8 largest values apart in float16, and all-zero rows (the
    # padding, zeroed by both sides) not sent: int4k.py. Only a step's (B, T, H) tensors; the rest go fp32.
    INT4K = "int4k"


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a count of 1


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


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
                f"tensor {self.name!r}: float32 tensors travel as fp32, fp16, int8, int4 or int4k and other dtypes raw,"
                f" got {self.dtype} as {self.wire_name}",
                CLOSE_UNSUPPORTED_DATA,
            )
        if (
            len(self.shape) > _MAX_NDIM
            or any(dim < 0 for dim in self.shape)
            or math.prod(max(dim, 1) for dim in self.shape) > _MAX_ELEMENTS
        ):
            raise ProtocolError(f"tensor {self.name!r}: impossible shape {list(self.shape)!r:.100}")
        if self.wire is Wire.INT4K:
            problem = header_problem(self.shape, self.nbytes)
            if problem is not None:
                raise ProtocolError(f"tensor {self.name!r}: {problem}")
            return
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
            and all(map(is_int, shape))
            and isinstance(wire, str)
            and is_int(nbytes)
        ):
            raise ProtocolError(
                f"a tensor header needs a non-empty name, string dtype and wire, integer shape list and"
                f" integer nbytes, got {raw!r:.200}"
            )
        wires = {member.value: member for member in Wire}
        if wire != _RAW and wire not in wires:
            raise ProtocolError(f"tensor {name!r}: unknown wire encoding {wire!r:.40}", CLOSE_UNSUPPORTED_DATA)
        return TensorHeader(name, dtype, tuple(shape), None if wire == _RAW else wires[wire], nbytes)


def _payload_nbytes(shape: Sequence[int], dtype: str, wire: Wire | None, rows_sent: int | None = None) -> int:
    count = math.prod(shape)
    if wire is None:
        return count * _RAW_DTYPES[dtype].itemsize
    if wire is Wire.FP32:
        return 4 * count
    if wire is Wire.FP16:
        return 2 * count
    if wire is Wire.INT4K:
        return int4k_nbytes(shape, rows_sent)
    if wire is Wire.INT4:
        return 4 * math.prod(shape[:-1]) + (count + 1) // 2  # scales, then two 4-bit codes a byte
    return 4 * math.prod(shape[:-1]) + count  # one float32 scale per row, then one int8 per value


def _wire_format(dtype: np.dtype[Any], wire: Wire) -> tuple[str, Wire | None]:
    """The (decoded dtype, wire) a tensor of `dtype` travels as when the message's encoding is `wire`."""
    if np.issubdtype(dtype, np.floating):
        return "float32", wire
    if dtype.name in _RAW_DTYPES:
        return dtype.name, None
    raise ProtocolError(f"cannot send a {dtype} tensor: send float, int64, int32, int8 or bool", CLOSE_UNSUPPORTED_DATA)


def tensor_nbytes_on_wire(shape: Sequence[int], dtype: npt.DTypeLike, wire: Wire, rows_sent: int | None = None) -> int:
    """Payload bytes of one tensor of this shape and dtype in encoding `wire` (its metadata not counted).
    `rows_sent`: int4k's rows not all zero (default: every row); the other wires send every row."""
    return _payload_nbytes(tuple(shape), *_wire_format(np.dtype(dtype), Wire(wire)), rows_sent)


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
            raise ProtocolError(
                f"tensor {name!r} holds NaN or inf, which {tensor_wire.value} cannot carry", CLOSE_UNSUPPORTED_DATA
            )
        if tensor_wire is Wire.INT4K:
            data = encode_int4k(name, values)
            return TensorHeader(name, dtype, shape, tensor_wire, len(data)), data
        rows = values.reshape(_rows(shape))
        top = INT4_TOP if tensor_wire is Wire.INT4 else 127
        scales = (np.max(np.abs(rows), axis=1, initial=0.0) / top).astype(_F32)
        # An all-zero row, or one so small that its scale underflows, still needs a divisor.
        scales[scales == 0] = 1
        quantised = np.clip(np.rint(rows / scales[:, None]), -top, top).astype(np.int8)
        body = quantised.tobytes() if tensor_wire is Wire.INT8 else pack_nibbles(quantised)
        data = scales.tobytes() + body
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
    elif header.wire is Wire.INT4K:
        return decode_int4k(header.name, header.shape, data)
    else:
        num_rows, row_len = _rows(header.shape)
        scales = np.frombuffer(data[: 4 * num_rows], _F32).astype(np.float32)
        if not np.all(np.isfinite(scales) & (scales > 0)):
            raise ProtocolError(f"tensor {header.name!r}: {header.wire.value} scales must be finite and positive")
        if header.wire is Wire.INT4:
            quantised = unpack_nibbles(header.name, data[4 * num_rows :], num_rows * row_len)
        else:
            quantised = np.frombuffer(data[4 * num_rows :], np.int8)
        quantised = quantised.reshape(num_rows, row_len)
        with np.errstate(over="ignore"):  # a scale near float32's limit times 127 is inf, as it was sent
            array = quantised.astype(np.float32) * scales[:, None]
    return array.reshape(header.shape)
