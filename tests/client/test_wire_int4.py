"""The int4 wire: two 4-bit codes a byte with one float32 scale per row (per token), round trips and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.client.tensors import TensorHeader, Wire, decode_tensor, encode_tensor, tensor_nbytes_on_wire
from edgesplit.errors import ProtocolError


@pytest.mark.parametrize("shape", [(4, 16, 64), (3, 5), (1, 7), (9,)], ids=str)
def test_int4_error_is_at_most_half_a_step_of_each_rows_scale(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    tensor = (rng.standard_normal(shape) * rng.uniform(1e-3, 1e3, size=shape[:-1] + (1,))).astype(np.float32)
    header, data = encode_tensor("x", tensor, Wire.INT4)
    assert header.nbytes == len(data) == tensor_nbytes_on_wire(shape, np.float32, Wire.INT4)
    decoded = decode_tensor(header, data)
    step = np.max(np.abs(tensor), axis=-1, keepdims=True) / 7
    assert np.all(np.abs(decoded - tensor) <= step / 2 * 1.0001)


def test_int4_layout_is_row_scales_then_low_nibble_first() -> None:
    header, data = encode_tensor("x", np.array([[0.0, 7.0, -7.0]], np.float32), Wire.INT4)
    assert np.frombuffer(data[:4], np.float32).tolist() == [1.0]
    # codes +8: 8, 15, 1, then the pad 8: bytes (15 << 4 | 8), (8 << 4 | 1)
    assert list(data[4:]) == [0xF8, 0x81] and header.to_json()["wire"] == "int4"


def test_int4_is_an_eighth_of_fp32_plus_a_scale_per_token() -> None:
    shape = (4, 128, 576)
    fp32 = tensor_nbytes_on_wire(shape, np.float32, Wire.FP32)
    int4 = tensor_nbytes_on_wire(shape, np.float32, Wire.INT4)
    assert int4 == 4 * 4 * 128 + 4 * 128 * 576 // 2 and fp32 / int4 > 7.8


def _frame(values: list[int], scale: float = 1.0, count: int = 3) -> tuple[TensorHeader, bytes]:
    data = np.array([scale], np.float32).tobytes() + bytes(values)
    return TensorHeader("x", "float32", (1, count), Wire.INT4, len(data)), data


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (_frame([0xF8, 0x81], scale=float("nan")), "scales must be finite and positive"),
        (_frame([0xF8, 0x81], scale=float("inf")), "scales must be finite and positive"),
        (_frame([0xF8, 0x81], scale=-1.0), "scales must be finite and positive"),
        (_frame([0xF0, 0x81]), "the frame holds a 0"),
        (_frame([0xF8, 0x91]), "pad after an odd number"),
    ],
    ids=["nan-scale", "inf-scale", "negative-scale", "code-0", "bad-pad"],
)
def test_hostile_int4_frames_are_refused(frame: tuple[TensorHeader, bytes], message: str) -> None:
    header, data = frame
    with pytest.raises(ProtocolError, match=message):
        decode_tensor(header, data)


def test_int4_header_with_the_wrong_size_is_refused() -> None:
    with pytest.raises(ProtocolError, match="takes 6 bytes, header says 7"):
        TensorHeader("x", "float32", (1, 3), Wire.INT4, 7)
    header, data = _frame([0xF8, 0x81])
    with pytest.raises(ProtocolError, match="expected 6 bytes, got 5"):
        decode_tensor(header, data[:5])


def test_non_finite_values_are_not_sent_as_int4() -> None:
    with pytest.raises(ProtocolError, match="NaN or inf, which int4 cannot carry"):
        encode_tensor("x", np.array([[1.0, np.inf]], np.float32), Wire.INT4)
