"""The int4k wire: int4 with a float16 scale per row, each row's 8 largest values apart in float16, and all-zero
(padding) rows left out: round trips, its bytes, what it leaves exact, and hostile frames."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.client.int4k import TOP_K, zero_padding
from edgesplit.client.protocol import (
    Activations,
    Gradients,
    RoundResult,
    decode,
    encode,
)
from edgesplit.client.tensors import TensorHeader, Wire, decode_tensor, encode_tensor, tensor_nbytes_on_wire
from edgesplit.errors import ProtocolError


def _activations(shape: tuple[int, int, int] = (4, 32, 96), seed: int = 0) -> np.ndarray:
    """Like a transformer's hidden states: most values small, a few channels a hundred times larger."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32)
    values[..., rng.choice(shape[-1], 3, replace=False)] *= 100
    return values


def test_int4k_error_is_at_most_half_a_step_of_the_rows_rest_and_outliers_are_float16() -> None:
    tensor = _activations()
    header, data = encode_tensor("x", tensor, Wire.INT4K)
    decoded = decode_tensor(header, data)
    assert decoded.dtype == np.float32 and decoded.shape == tensor.shape
    magnitude = np.abs(tensor)
    order = np.sort(magnitude, axis=-1)
    top = magnitude >= order[..., -TOP_K : -TOP_K + 1]  # each row's 8 largest (no ties in random data)
    assert np.all(top.sum(axis=-1) == TOP_K)
    # The outliers: float16 of the value, so within float16's rounding.
    assert np.allclose(decoded[top], tensor[top].astype(np.float16).astype(np.float32), rtol=0, atol=0)
    # The rest: within half a step of a scale set by the rest alone (float16 scale rounded up: +0.1%).
    rest_max = order[..., -TOP_K - 1 : -TOP_K]
    error = np.abs(decoded - tensor)
    assert np.all(np.where(top, 0, error) <= rest_max / 7 / 2 * 1.001)


def test_int4k_beats_int4_on_outliers_by_an_order_of_magnitude() -> None:
    tensor = _activations()
    errors = {}
    for wire in (Wire.INT4, Wire.INT4K):
        header, data = encode_tensor("x", tensor, wire)
        errors[wire] = float(np.mean(np.abs(decode_tensor(header, data) - tensor)))
    assert errors[Wire.INT4K] * 5 < errors[Wire.INT4], errors


def test_padding_rows_are_not_sent_and_come_back_as_zeros() -> None:
    tensor = _activations((2, 16, 64))
    mask = np.ones((2, 16), np.int64)
    mask[0, 10:] = 0
    mask[1, 3:] = 0
    zeroed = zero_padding(tensor, mask)
    assert zeroed is not tensor and np.all(zeroed[mask == 0] == 0)
    assert np.array_equal(zeroed[mask == 1], tensor[mask == 1])
    assert zero_padding(zeroed, mask) is zeroed  # nothing to zero: no copy
    header, data = encode_tensor("x", zeroed, Wire.INT4K)
    sent = int(mask.sum())
    # The bitmap (32 rows: 4 bytes), then per sent row a float16 scale, 8 uint16 indices, 8 float16 values and
    # 64 codes of 4 bits.
    assert len(data) == header.nbytes == 4 + sent * (2 + 16 + 16 + 32)
    assert header.nbytes == tensor_nbytes_on_wire(zeroed.shape, np.float32, Wire.INT4K, rows_sent=sent)
    assert tensor_nbytes_on_wire(zeroed.shape, np.float32, Wire.INT4K) == 4 + 32 * 66  # default: every row
    assert np.unpackbits(np.frombuffer(data[:4], np.uint8), bitorder="little").tolist() == mask.reshape(-1).tolist()
    decoded = decode_tensor(header, data)
    assert np.all(decoded[mask == 0] == 0)
    assert np.allclose(decoded[mask == 1], tensor[mask == 1], atol=np.abs(tensor).max() / 7)


def test_the_layout_is_bitmap_scales_indices_outliers_codes() -> None:
    row = np.zeros(10, np.float32)
    row[:8] = [100, -90, 80, -70, 60, -50, 40, -30]
    row[8:] = [0.7, -0.35]
    tensor = np.stack([np.zeros(10, np.float32), row])  # the first row is not sent
    header, data = encode_tensor("x", tensor, Wire.INT4K)
    assert header.to_json()["wire"] == "int4k" and header.nbytes == len(data) == 1 + 2 + 16 + 16 + 5
    assert data[0] == 0b10
    assert np.frombuffer(data[1:3], "<f2").astype(np.float32)[0] == pytest.approx(0.1, rel=1e-3)
    assert np.frombuffer(data[3:19], "<u2").tolist() == list(range(8))
    assert np.frombuffer(data[19:35], "<f2").tolist() == row[:8].tolist()
    # codes +8: the outliers' places hold 8, then 0.7 / s = 7 -> 15 and -0.35 / s = -3.499 -> -3 -> 5, for s the
    # float16 at or above 0.1: 0.10004
    assert list(data[35:]) == [0x88, 0x88, 0x88, 0x88, 0x5F]
    decoded = decode_tensor(header, data)
    assert decoded[0].tolist() == [0.0] * 10 and decoded[1, :8].tolist() == row[:8].tolist()


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (), (7,), (2, 3), (2, 1, 9)], ids=str)
def test_edge_shapes_round_trip(shape: tuple[int, ...]) -> None:
    tensor = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) - 3.0
    header, data = encode_tensor("x", tensor, Wire.INT4K)
    assert header.nbytes == len(data)
    decoded = decode_tensor(header, data)
    assert decoded.shape == tensor.shape
    assert np.allclose(decoded, tensor, atol=float(np.abs(tensor).max(initial=0)) / 7)


def test_only_a_steps_tensors_travel_in_int4k_adapters_go_in_fp32() -> None:
    adapters = {"layers.0.q.lora_A": np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)}
    result = RoundResult(0, 1, False, 2.5, adapters)
    assert encode(result, Wire.INT4K) == encode(result, Wire.FP32)
    name = "layers.0.q.lora_A"
    assert np.array_equal(decode(encode(result, Wire.INT4K)).tensors[name], adapters[name])
    shape = (2, 8, 576)
    mask = np.ones(shape[:2], np.int64)
    up = Activations(0, 0, {"activations": _activations(shape), "attention_mask": mask, "labels": mask})
    back = decode(encode(up, Wire.INT4K))
    assert np.array_equal(back.tensors["labels"], mask)  # integer tensors stay raw
    assert len(encode(up, Wire.INT4K)) < len(encode(up, Wire.FP32)) / 5
    down = Gradients(0, 0, 1.0, 0.1, {"activation_grads": _activations(shape)})
    assert len(encode(down, Wire.INT4K)) < len(encode(down, Wire.FP32)) / 5


def test_values_int4k_cannot_carry_are_refused_at_encode() -> None:
    with pytest.raises(ProtocolError, match="NaN or inf"):
        encode_tensor("x", np.array([[1.0, np.nan]], np.float32), Wire.INT4K)
    with pytest.raises(ProtocolError, match="beyond float16's range"):
        encode_tensor("x", np.array([[1e6, 1.0]], np.float32), Wire.INT4K)
    with pytest.raises(ProtocolError, match="at most 65536 values"):
        encode_tensor("x", np.ones((1, 65537), np.float32), Wire.INT4K)


def _good_frame() -> bytes:
    """One row of 10 values sent of two: bitmap, scale, indices 0..7, outliers, 5 bytes of codes."""
    tensor = np.zeros((2, 10), np.float32)
    tensor[1] = np.arange(1, 11)
    return encode_tensor("x", tensor, Wire.INT4K)[1]


def _with(offset: int, replacement: bytes) -> bytes:
    frame = bytearray(_good_frame())
    frame[offset : offset + len(replacement)] = replacement
    return bytes(frame)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_with(0, b"\x03"), "bitmap marks 2 rows sent, the payload holds 1"),
        (_with(0, b"\x00"), "bitmap marks 0 rows sent, the payload holds 1"),
        (_with(0, b"\x06"), "bits set past its 2 rows"),
        (_with(1, np.array([np.nan], "<f2").tobytes()), "scales must be finite and positive"),
        (_with(1, np.array([np.inf], "<f2").tobytes()), "scales must be finite and positive"),
        (_with(1, np.array([-1], "<f2").tobytes()), "scales must be finite and positive"),
        (_with(1, np.array([0], "<f2").tobytes()), "scales must be finite and positive"),
        (_with(3, np.array([10], "<u2").tobytes()), "strictly increasing within a row and below 10"),
        (_with(3, np.array([1, 1], "<u2").tobytes()), "strictly increasing"),
        (_with(3 + 14, np.array([65535], "<u2").tobytes()), "below 10"),
        (_with(19, np.array([np.inf], "<f2").tobytes()), "outlier values must be finite"),
        (_with(35, b"\x80"), "the frame holds a 0"),
    ],
    ids=[
        "bitmap-too-many",
        "bitmap-too-few",
        "bitmap-past-rows",
        "nan-scale",
        "inf-scale",
        "negative-scale",
        "zero-scale",
        "index-out-of-range",
        "index-repeated",
        "index-max",
        "inf-outlier",
        "code-0",
    ],
)
def test_hostile_int4k_payloads_are_refused(data: bytes, message: str) -> None:
    header = TensorHeader("x", "float32", (2, 10), Wire.INT4K, len(data))
    with pytest.raises(ProtocolError, match=message):
        decode_tensor(header, data)


def test_an_odd_row_with_a_bad_pad_is_refused() -> None:
    tensor = np.zeros((1, 9), np.float32)
    tensor[0] = np.arange(1, 10)
    header, data = encode_tensor("x", tensor, Wire.INT4K)
    bad = data[:-1] + bytes([(data[-1] & 0x0F) | 0x90])
    with pytest.raises(ProtocolError, match="pad after an odd number"):
        decode_tensor(header, bad)


@pytest.mark.parametrize(
    ("shape", "nbytes", "message"),
    [
        ((2, 10), 41, "takes 1 bitmap bytes plus 39 a sent row for 0 to 2 rows, header says 41"),
        ((2, 10), 1 + 3 * 39, "for 0 to 2 rows"),
        ((2, 10), 0, "header says 0"),
        ((1, 70000), 1, "at most 65536 values"),
    ],
    ids=["not-whole-rows", "more-rows-than-shape", "no-bitmap", "row-too-long"],
)
def test_int4k_headers_of_impossible_sizes_are_refused(shape: tuple[int, ...], nbytes: int, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        TensorHeader("x", "float32", shape, Wire.INT4K, nbytes)


def test_a_frame_of_unsent_rows_cannot_rebuild_more_than_the_frame_limit() -> None:
    # A million rows of 65536 values, none sent: a 125 kB bitmap that would rebuild 256 GiB of zeros.
    rows, row_len = 1 << 20, 1 << 16
    up = Activations(0, 0, {"activations": np.zeros((1, 4, 8), np.float32)}, "upper")
    frame = encode(up, Wire.INT4K)
    small = len(frame)
    frame = frame.replace(b'"shape":[1,4,8]', f'"shape":[1,{rows},{row_len}]'.encode())
    frame = frame.replace(b'"nbytes":1', f'"nbytes":{rows // 8}'.encode())
    frame = frame[:4] + (int.from_bytes(frame[4:8], "little") + len(frame) - small).to_bytes(4, "little") + frame[8:]
    frame = frame[:-1] + bytes(rows // 8)
    with pytest.raises(ProtocolError, match="rebuild to") as error:
        decode(frame, max_size=1 << 30)
    assert error.value.close_code == 1009
