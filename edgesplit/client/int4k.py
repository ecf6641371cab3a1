"""The 4-bit codes of the int4 and int4k wires, and int4k's encoding. numpy only.

int4k carries a float tensor as rows along its last axis (per token, for (B, T, H) activations and gradients):

- rows that are all zero are not sent: under int4k both sides zero the padding rows (attention_mask 0) of
  what they send (`zero_padding`), and those are the rows left out. A bitmap says which rows were sent;
  the decoder rebuilds zeros for the others.
- each sent row's TOP_K largest-magnitude values go apart in float16 with their index (uint16);
- the rest of the row is int4 with one float16 scale, computed without those outliers, so that a few
  large values no longer make every other value of the token round to zero.

The payload, little-endian, for R rows of H values of which n are sent (k = min(TOP_K, H)):

    ceil(R / 8)        bitmap: row r is sent iff bit r % 8 of byte r // 8 is set; the bits past R are 0
    2 n                float16 scale per sent row: finite and positive
    2 n k              uint16 outlier indices per sent row: strictly increasing, below H
    2 n k              float16 outlier values per sent row: finite
    n ceil(H / 2)      int4 codes per sent row, stored as code + 8 (1..15), two a byte, the first value in the
                       low 4 bits; an outlier's place holds 8 (zero), an odd H ends each row in a pad of 8
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from edgesplit.errors import ProtocolError

TOP_K = 8  # outliers per row sent apart in float16
INT4_TOP = 7  # codes -7..7
INT4_OFFSET = 8  # stored as code + 8: 0 is never sent, so a frame holding it is refused
_MAX_ROW = 2**16  # indices travel as uint16
_F16 = np.dtype("<f2")
_U16 = np.dtype("<u2")
# The error ProtocolError carries for values the encoding cannot represent (tensors.CLOSE_UNSUPPORTED_DATA).
_UNSUPPORTED = 1003


def pack_nibbles(codes: npt.NDArray[np.int8]) -> bytes:
    """int4 codes (-7..7) two a byte, the first in the low 4 bits; an odd count ends in a pad of 8 (zero)."""
    stored = (codes.reshape(-1).astype(np.int16) + INT4_OFFSET).astype(np.uint8)
    if stored.size % 2:
        stored = np.append(stored, np.uint8(INT4_OFFSET))
    return (stored[0::2] | (stored[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_nibbles(name: str, data: bytes | memoryview, count: int) -> npt.NDArray[np.int8]:
    """The `count` codes `pack_nibbles` packed; ProtocolError for a stored 0 or a pad that is not 8."""
    packed = np.frombuffer(data, np.uint8)
    stored = np.empty(2 * packed.size, np.uint8)
    stored[0::2] = packed & 0x0F
    stored[1::2] = packed >> 4
    if np.any(stored[:count] == 0):
        raise ProtocolError(f"tensor {name!r}: int4 codes are 1 to 15 (value + 8), the frame holds a 0")
    if np.any(stored[count:] != INT4_OFFSET):
        raise ProtocolError(f"tensor {name!r}: the int4 pad after an odd number of values must be 8 (zero)")
    return (stored[:count].astype(np.int16) - INT4_OFFSET).astype(np.int8)


def _layout(shape: Sequence[int]) -> tuple[int, int, int]:
    """(rows, row length, outliers per row); a 0-d tensor is one row of one."""
    rows, row_len = math.prod(shape[:-1]), (shape[-1] if shape else 1)
    return rows, row_len, min(TOP_K, row_len)


def _row_bytes(row_len: int, k: int) -> int:
    return 2 + 4 * k + (row_len + 1) // 2


def int4k_nbytes(shape: Sequence[int], rows_sent: int | None = None) -> int:
    """Payload bytes of a tensor of `shape` in int4k with `rows_sent` rows sent (default: every row that has
    a value; the encoder sends the rows with a value other than zero)."""
    rows, row_len, k = _layout(shape)
    sent = (rows if row_len else 0) if rows_sent is None else rows_sent  # a row of no values is all zero
    return (rows + 7) // 8 + sent * _row_bytes(row_len, k)


def header_problem(shape: Sequence[int], nbytes: int) -> str | None:
    """Why an int4k tensor of `shape` cannot take `nbytes` payload bytes, or None if it can."""
    rows, row_len, k = _layout(shape)
    if row_len > _MAX_ROW:
        return f"int4k rows are at most {_MAX_ROW} values (uint16 indices), got {row_len}"
    sent, rest = divmod(nbytes - (rows + 7) // 8, _row_bytes(row_len, k))
    if rest or not 0 <= sent <= rows:
        return (
            f"shape {list(shape)} in int4k takes {(rows + 7) // 8} bitmap bytes plus"
            f" {_row_bytes(row_len, k)} a sent row for 0 to {rows} rows, header says {nbytes}"
        )
    return None


def zero_padding(array: npt.NDArray[Any], attention_mask: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """`array` (B, T, H) with the rows of padding (attention_mask (B, T) == 0) set to zero: a copy if any is
    not zero already. The tail masks padding positions, so they change no loss and no real gradient."""
    padding = attention_mask == 0
    if array.shape[:-1] != attention_mask.shape or not bool(np.any(array[padding])):
        return array
    zeroed: npt.NDArray[Any] = array.copy()
    zeroed[padding] = 0
    return zeroed


def encode_int4k(name: str, values: npt.NDArray[np.float32]) -> bytes:
    """The int4k payload of a finite float32 array (the caller checks finiteness)."""
    rows, row_len, k = _layout(values.shape)
    if row_len > _MAX_ROW:
        raise ProtocolError(
            f"tensor {name!r}: int4k rows are at most {_MAX_ROW} values, got {row_len}: use wire int4",
            _UNSUPPORTED,
        )
    table = values.reshape(rows, row_len)
    sent = np.any(table != 0, axis=1)
    kept = table[sent]
    if k:
        # The k largest magnitudes of each row, in index order.
        indices = np.sort(np.argpartition(-np.abs(kept), k - 1, axis=1)[:, :k], axis=1)
    else:
        indices = np.zeros((kept.shape[0], 0), np.int64)
    outliers = np.take_along_axis(kept, indices, axis=1)
    with np.errstate(over="ignore"):
        outliers_half = outliers.astype(_F16)
    if not np.all(np.isfinite(outliers_half)):
        raise ProtocolError(
            f"tensor {name!r} has values beyond float16's range (+-65504), which int4k sends in float16: use wire int8",
            _UNSUPPORTED,
        )
    rest = kept.copy()
    np.put_along_axis(rest, indices, 0.0, axis=1)
    wanted = (np.max(np.abs(rest), axis=1, initial=0.0) / INT4_TOP).astype(np.float32)
    with np.errstate(over="ignore"):
        scales = wanted.astype(_F16)
    # Rounded to float16 the scale may fall below the wanted one: take the next float16 up, so that no
    # value needs a code beyond 7. One that overflows, or underflows to 0 (a row of outliers only, or
    # values too small for float16), is fixed below.
    below = scales.astype(np.float32) < wanted
    scales[below] = np.nextafter(scales[below], np.float16(np.inf))
    if not np.all(np.isfinite(scales)):
        raise ProtocolError(
            f"tensor {name!r} has values beyond float16's range (+-65504) times 7, which int4k's scales cannot"
            " carry: use wire int8",
            _UNSUPPORTED,
        )
    scales[scales == 0] = 1
    codes = np.clip(np.rint(rest / scales.astype(np.float32)[:, None]), -INT4_TOP, INT4_TOP).astype(np.int8)
    if row_len % 2:
        codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.int8)], axis=1)  # the pad: 8 stored
    bitmap = np.packbits(sent, bitorder="little").tobytes()
    return b"".join(
        [
            bitmap,
            scales.astype(_F16).tobytes(),
            indices.astype(_U16).tobytes(),
            outliers_half.tobytes(),
            pack_nibbles(codes),
        ]
    )


def decode_int4k(name: str, shape: Sequence[int], data: bytes | memoryview) -> npt.NDArray[np.float32]:
    """The float32 array of `shape` whose int4k payload is `data` (its length checked by the caller against a
    header that passed `header_problem`). ProtocolError for anything malformed."""
    rows, row_len, k = _layout(shape)
    bitmap_len = (rows + 7) // 8
    sent_count = (len(data) - bitmap_len) // _row_bytes(row_len, k)
    bits = np.unpackbits(np.frombuffer(data[:bitmap_len], np.uint8), bitorder="little")
    if np.any(bits[rows:]):
        raise ProtocolError(f"tensor {name!r}: the int4k bitmap has bits set past its {rows} rows")
    sent = bits[:rows].astype(bool)
    if int(sent.sum()) != sent_count:
        raise ProtocolError(
            f"tensor {name!r}: the int4k bitmap marks {int(sent.sum())} rows sent, the payload holds {sent_count}"
        )
    offset = bitmap_len
    scales = np.frombuffer(data[offset : offset + 2 * sent_count], _F16).astype(np.float32)
    offset += 2 * sent_count
    if not np.all(np.isfinite(scales) & (scales > 0)):
        raise ProtocolError(f"tensor {name!r}: int4k scales must be finite and positive")
    indices = np.frombuffer(data[offset : offset + 2 * sent_count * k], _U16).astype(np.int64)
    indices = indices.reshape(sent_count, k)
    offset += 2 * sent_count * k
    if np.any(indices >= row_len) or np.any(np.diff(indices, axis=1) <= 0):
        raise ProtocolError(
            f"tensor {name!r}: int4k outlier indices must be strictly increasing within a row and below {row_len}"
        )
    outliers = np.frombuffer(data[offset : offset + 2 * sent_count * k], _F16).astype(np.float32)
    offset += 2 * sent_count * k
    if not np.all(np.isfinite(outliers)):
        raise ProtocolError(f"tensor {name!r}: int4k outlier values must be finite")
    padded_len = row_len + row_len % 2
    codes = unpack_nibbles(name, data[offset:], sent_count * padded_len).reshape(sent_count, padded_len)
    if row_len % 2 and np.any(codes[:, -1] != 0):
        raise ProtocolError(f"tensor {name!r}: the int4 pad after an odd number of values must be 8 (zero)")
    kept = codes[:, :row_len].astype(np.float32) * scales[:, None]
    np.put_along_axis(kept, indices, outliers.reshape(sent_count, k), axis=1)
    table = np.zeros((rows, row_len), np.float32)
    table[sent] = kept
    return table.reshape(tuple(shape))
