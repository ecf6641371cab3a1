"""The wire protocol, tested by feeding bytes: no sockets, no event loop."""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgesplit.client.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Activations,
    AdapterUpdate,
    Bye,
    Error,
    Gradients,
    Hello,
    Kind,
    Message,
    Role,
    RoundResult,
    Session,
    SessionSettings,
    State,
    Welcome,
    Wire,
    decode,
    decode_tensor,
    encode,
    encode_tensor,
    tensor_nbytes_on_wire,
)
from edgesplit.errors import ProtocolError

# decode runs on a peer's bytes: a warning there is a log line any peer could make the server print.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

B, T, H = 2, 5, 8
CLOSE_CODES = {1002, 1003, 1009}
LORA_SHAPES = {"lora_A.q_proj.0": (4, H), "lora_B.q_proj.0": (H, 4)}


def adapters(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in LORA_SHAPES.items()}


def activations_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 1000, size=(B, T))
    labels[:, 0] = -100
    return {
        "activations": rng.normal(scale=3.0, size=(B, T, H)).astype(np.float32),
        "attention_mask": np.ones((B, T), dtype=np.int64),
        "labels": labels.astype(np.int64),
    }


SETTINGS = SessionSettings(steps_per_round=4, learning_rate=1e-4, wire=Wire.INT8, batch_size=B, max_seq_len=T)


def examples() -> list[Message]:
    """One message of every kind, with every optional field used."""
    grads = np.random.default_rng(7).normal(size=(B, T, H)).astype(np.float32)
    return [
        Hello("pi-4.kitchen_01", PROTOCOL_VERSION, "0123456789abcdef", "s3cret", 128),
        Welcome(0, 3, SETTINGS, adapters(1)),
        Activations(0, 2, activations_tensors()),
        Gradients(0, 2, 2.75, 0.125, {"activation_grads": grads}),
        AdapterUpdate(0, 128, adapters(2), {"train_loss": 2.5, "client_seconds": 3.0}),
        RoundResult(0, 1, False, 2.25, adapters(3)),
        Error("bad_token", "the server needs a token: pass --token"),
        Bye("user pressed ctrl-c"),
    ]


def tensors_of(message: Message) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = getattr(message, "tensors", {})
    return tensors


EXAMPLES = {message.kind: message for message in examples()}
TENSOR_KINDS = [kind for kind, message in EXAMPLES.items() if hasattr(message, "tensors")]


def assert_same_message(expected: Message, actual: Message, *, float_atol: float = 0.0) -> None:
    """Messages with tensors have no value ==, by design: compare field by field here."""
    assert type(actual) is type(expected)
    for field in dataclasses.fields(expected):
        want, got = getattr(expected, field.name), getattr(actual, field.name)
        if field.name != "tensors":
            assert got == want, field.name
            continue
        assert got.keys() == want.keys()
        for name, tensor in want.items():
            assert got[name].shape == tensor.shape, name
            if np.issubdtype(tensor.dtype, np.floating):
                assert got[name].dtype == np.float32, name
                np.testing.assert_allclose(got[name], tensor, rtol=0, atol=float_atol, err_msg=name)
            else:
                assert got[name].dtype == tensor.dtype, name
                np.testing.assert_array_equal(got[name], tensor, err_msg=name)


def expect_protocol_error(frame: bytes, close_code: int, match: str | None = None, **kwargs: Any) -> None:
    with pytest.raises(ProtocolError, match=match) as caught:
        decode(frame, **kwargs)
    assert caught.value.close_code == close_code, str(caught.value)


def craft(
    kind: int,
    metadata: object,
    payload: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    raw_metadata: bytes | None = None,
) -> bytes:
    """A frame built by hand, to say exactly what is wrong with it."""
    body = json.dumps(metadata).encode() if raw_metadata is None else raw_metadata
    return struct.pack("<2sBBI", magic, version, kind, len(body)) + body + payload


def metadata_of(frame: bytes) -> dict[str, Any]:
    (length,) = struct.unpack_from("<I", frame, 4)
    metadata: dict[str, Any] = json.loads(frame[8 : 8 + length])
    return metadata


def payload_of(frame: bytes) -> bytes:
    (length,) = struct.unpack_from("<I", frame, 4)
    return frame[8 + length :]


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
def test_every_kind_round_trips_exactly_in_fp32(kind: Kind) -> None:
    message = EXAMPLES[kind]
    frame = encode(message)
    assert frame[:4] == MAGIC + bytes([PROTOCOL_VERSION, kind])
    assert_same_message(message, decode(frame))


@pytest.mark.parametrize("wire", list(Wire), ids=lambda wire: wire.value)
@pytest.mark.parametrize("kind", TENSOR_KINDS, ids=lambda kind: kind.name)
def test_tensor_messages_round_trip_in_every_wire(kind: Kind, wire: Wire) -> None:
    message = EXAMPLES[kind]
    peak = max(float(np.abs(t).max()) for t in tensors_of(message).values() if t.dtype == np.float32)
    # fp16 keeps 11 significant bits; int8 is off by at most half a step of its row's scale.
    steps = {Wire.INT8: 127, Wire.INT4: 7}  # int4 likewise, in steps of peak / 7
    atol = {Wire.FP32: 0.0, Wire.FP16: peak * 2**-11}.get(wire, peak / steps.get(wire, 1) / 2 * 1.0001)
    # Integer tensors (mask, labels) are compared exactly whatever the wire.
    assert_same_message(message, decode(encode(message, wire)), float_atol=atol)


def test_frame_layout_is_header_json_metadata_then_concatenated_tensor_bytes() -> None:
    message = EXAMPLES[Kind.ACTIVATIONS]
    frame = encode(message, Wire.FP16)
    magic, version, kind, length = struct.unpack_from("<2sBBI", frame)
    assert (magic, version, kind) == (b"ES", 2, Kind.ACTIVATIONS)
    metadata = metadata_of(frame)
    assert (metadata["round"], metadata["step"], metadata["stage"]) == (0, 2, "split")
    assert metadata["tensors"] == [
        {
            "name": "activations",
            "dtype": "float32",
            "shape": [B, T, H],
            "wire": "fp16",
            "nbytes": 2 * B * T * H,
        },
        {"name": "attention_mask", "dtype": "int64", "shape": [B, T], "wire": "raw", "nbytes": 8 * B * T},
        {"name": "labels", "dtype": "int64", "shape": [B, T], "wire": "raw", "nbytes": 8 * B * T},
    ]
    tensors = tensors_of(message)
    expected_payload = (
        tensors["activations"].astype("<f2").tobytes()
        + tensors["attention_mask"].astype("<i8").tobytes()
        + tensors["labels"].astype("<i8").tobytes()
    )
    assert payload_of(frame) == expected_payload
    assert len(frame) == 8 + length + len(expected_payload)


def test_nan_loss_and_missing_optional_values_travel() -> None:
    gradients = decode(encode(Gradients(1, 0, float("nan"), 0.0, {})))
    assert isinstance(gradients, Gradients) and np.isnan(gradients.loss) and gradients.tensors == {}
    result = decode(encode(RoundResult(2, 3, True, None, {})))
    assert isinstance(result, RoundResult) and result.eval_loss is None and result.done is True
    hello = decode(encode(Hello("c", 1, "h", None, 0)))
    assert isinstance(hello, Hello) and hello.token is None


def test_integer_json_values_decode_as_float_fields() -> None:
    frame = craft(
        Kind.GRADIENTS, {"round": 0, "step": 0, "loss": 3, "server_seconds": 1, "stage": "split", "tensors": []}
    )
    gradients = decode(frame)
    assert isinstance(gradients, Gradients)
    assert isinstance(gradients.loss, float) and isinstance(gradients.server_seconds, float)


# ----------------------------------------------------------------------------------------------- tensors


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6),
        elements=st.floats(-1e6, 1e6, width=32),
    )
)
def test_int8_error_is_at_most_half_a_step_of_each_rows_scale(tensor: np.ndarray) -> None:
    header, data = encode_tensor("activations", tensor, Wire.INT8)
    decoded = decode_tensor(header, data)
    assert decoded.dtype == np.float32 and decoded.shape == tensor.shape
    rows = tensor.reshape(int(np.prod(tensor.shape[:-1])), tensor.shape[-1]).astype(np.float64)
    scale = np.abs(rows).max(axis=1, keepdims=True, initial=0.0) / 127
    error = np.abs(decoded.reshape(rows.shape) - rows)
    assert np.all(error <= scale / 2 + scale * 1e-5 + 1e-30)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=6), elements=st.floats(-6e4, 6e4, width=32)))
def test_fp16_error_is_float16_rounding(tensor: np.ndarray) -> None:
    decoded = decode_tensor(*encode_tensor("x", tensor, Wire.FP16))
    bound = np.abs(tensor) * 2**-11 + 2**-25  # relative half-ulp, plus float16's smallest subnormal step
    assert np.all(np.abs(decoded - tensor) <= bound)


def test_int8_layout_is_row_scales_then_values() -> None:
    tensor = np.array([[0.0, 0.0, 0.0], [1.0, -2.54, 0.5]], dtype=np.float32)
    header, data = encode_tensor("x", tensor, Wire.INT8)
    assert header.nbytes == len(data) == 4 * 2 + 6
    scales = np.frombuffer(data[:8], "<f4")
    np.testing.assert_allclose(scales, [1.0, 2.54 / 127], rtol=1e-6)  # an all-zero row gets scale 1
    assert np.frombuffer(data[8:], np.int8).tolist() == [0, 0, 0, 50, -127, 25]


@pytest.mark.parametrize("shape", [(), (7,), (3, 0), (0, 4), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("wire", list(Wire), ids=lambda wire: wire.value)
def test_edge_shapes_round_trip_and_byte_accounting_agrees(shape: tuple[int, ...], wire: Wire) -> None:
    tensor = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) - 3.0
    header, data = encode_tensor("x", tensor, wire)
    assert len(data) == header.nbytes == tensor_nbytes_on_wire(shape, tensor.dtype, wire)
    decoded = decode_tensor(header, data)
    assert decoded.dtype == np.float32 and decoded.shape == shape
    # Half a step of a row up to 20: int8's 20/127, int4's 20/7.
    np.testing.assert_allclose(decoded, tensor, atol=1.5 if wire is Wire.INT4 else 0.1)


def test_tensor_nbytes_on_wire_by_hand() -> None:
    assert tensor_nbytes_on_wire((B, T, H), np.float32, Wire.FP32) == 4 * B * T * H
    assert tensor_nbytes_on_wire((B, T, H), "float64", Wire.FP16) == 2 * B * T * H
    assert tensor_nbytes_on_wire((B, T, H), np.float32, Wire.INT8) == 4 * B * T + B * T * H
    assert tensor_nbytes_on_wire((B, T), np.int64, Wire.INT8) == 8 * B * T  # integers always travel raw


@pytest.mark.parametrize("dtype", ["int64", "int32", "int8", "bool", ">i8"])
@pytest.mark.parametrize("wire", list(Wire), ids=lambda wire: wire.value)
def test_integer_and_bool_tensors_travel_raw_and_exact(dtype: str, wire: Wire) -> None:
    tensor = (np.arange(-6, 6).reshape(3, 4) % (2 if dtype == "bool" else 1000)).astype(dtype)
    header, data = encode_tensor("mask", tensor, wire)
    assert header.wire is None and header.to_json()["wire"] == "raw"
    assert data == tensor.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    decoded = decode_tensor(header, data)
    assert decoded.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(decoded, tensor)


@pytest.mark.parametrize("wire", list(Wire), ids=lambda wire: wire.value)
def test_decoded_tensors_are_fresh_writable_contiguous_float32(wire: Wire) -> None:
    message = EXAMPLES[Kind.ACTIVATIONS]
    frame = bytearray(encode(message, wire))
    decoded = decode(frame)
    assert isinstance(decoded, Activations)
    before = {name: tensor.copy() for name, tensor in decoded.tensors.items()}
    frame[len(frame) - len(payload_of(bytes(frame))) :] = bytes(len(payload_of(bytes(frame))))  # zero the payload
    for name, tensor in decoded.tensors.items():
        assert tensor.flags.c_contiguous and tensor.flags.writeable, name
        np.testing.assert_array_equal(tensor, before[name])  # no view into the frame
    assert decoded.tensors["activations"].dtype == np.float32


def test_float64_tensors_decode_as_float32() -> None:
    tensor = np.linspace(-1, 1, 12).reshape(3, 4)
    decoded = decode_tensor(*encode_tensor("x", tensor))
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, tensor, rtol=1e-7)


def test_nan_travels_in_fp32_and_fp16() -> None:
    tensor = np.array([1.0, np.nan, -np.inf], dtype=np.float32)
    for wire in (Wire.FP32, Wire.FP16):
        np.testing.assert_array_equal(decode_tensor(*encode_tensor("x", tensor, wire)), tensor)


@pytest.mark.parametrize(
    ("tensor", "wire", "match"),
    [
        (np.array([70000.0], np.float32), Wire.FP16, "float16's range"),
        (np.array([[1.0, np.nan]], np.float32), Wire.INT8, "NaN or inf"),
        (np.array([1 + 2j]), Wire.FP32, "cannot send a complex128"),
        (np.array([1], np.uint8), Wire.FP32, "cannot send a uint8"),
    ],
    ids=["fp16-overflow", "int8-nan", "complex", "uint8"],
)
def test_tensors_a_wire_cannot_carry_are_refused_when_encoding(tensor: np.ndarray, wire: Wire, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as caught:
        encode_tensor("x", tensor, wire)
    assert caught.value.close_code == 1003


# -------------------------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
def test_every_truncation_of_a_valid_frame_is_a_protocol_error(kind: Kind) -> None:
    frame = encode(EXAMPLES[kind], Wire.INT8)
    for length in range(len(frame)):
        expect_protocol_error(frame[:length], 1002)


def test_trailing_bytes_are_a_protocol_error() -> None:
    expect_protocol_error(encode(EXAMPLES[Kind.ACTIVATIONS]) + b"\0", 1002, "trailing bytes")
    expect_protocol_error(encode(EXAMPLES[Kind.BYE]) + b"\0", 1002, "trailing bytes")


def test_frame_over_max_size_is_too_big() -> None:
    frame = encode(EXAMPLES[Kind.ACTIVATIONS])
    assert isinstance(decode(frame, max_size=len(frame)), Activations)
    expect_protocol_error(frame, 1009, "over the limit", max_size=len(frame) - 1)


def test_wrong_version_names_both_versions_and_the_fix() -> None:
    frame = bytearray(encode(EXAMPLES[Kind.HELLO]))
    frame[2] = PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError) as caught:
        decode(bytes(frame))
    text = str(caught.value)
    assert f"version {PROTOCOL_VERSION + 1}" in text and f"version {PROTOCOL_VERSION}" in text
    assert "upgrade the older side" in text and caught.value.close_code == 1002


def test_a_text_frame_is_unsupported_data() -> None:
    expect_protocol_error('{"kind": "hello"}', 1003, "binary frame")  # type: ignore[arg-type]


BYE = {"reason": "x", "tensors": []}
GRADS = {"round": 0, "step": 0, "loss": 1.0, "server_seconds": 0.0, "stage": "split", "tensors": []}
HELLO = {"client_id": "c", "protocol_version": 1, "manifest_hash": "h", "token": None, "num_samples": 1}
RESULT: dict[str, object] = {"round": 0, "next_round": 1, "done": False, "eval_loss": None, "tensors": []}
WELCOME = {"round": 0, "total_rounds": 1, "settings": SETTINGS.to_json()}
MASK = {"name": "mask", "dtype": "int64", "shape": [2], "wire": "raw", "nbytes": 16}
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


def grads_frame(payload: bytes = b"", **header: object) -> bytes:
    """A Gradients frame with one tensor, activation_grads, whose header is MASK with `header` changes."""
    return craft(Kind.GRADIENTS, {**GRADS, "tensors": [{**MASK, "name": "activation_grads", **header}]}, payload)


F32 = {"dtype": "float32", "wire": "fp32"}
INT8_1 = {"dtype": "float32", "wire": "int8", "shape": [1, 1, 1], "nbytes": 5}  # one value: scale, int8

# (what is wrong, frame, close code, regex the message must match)
# fmt: off
BAD_FRAMES: list[tuple[str, bytes, int, str]] = [
    ("empty", b"", 1002, "shorter than"),
    ("bad magic", craft(Kind.BYE, BYE, magic=b"EZ"), 1002, "not an edgesplit frame"),
    ("http", b"GET / HTTP/1.1\r\n\r\n", 1002, "not an edgesplit frame"),
    ("kind 0", craft(0, BYE), 1003, "unknown message kind 0"),
    ("kind 99", craft(99, BYE), 1003, "unknown message kind 99"),
    ("metadata past the end", craft(Kind.BYE, BYE)[:-1], 1002, "truncated"),
    ("bad json", craft(Kind.BYE, None, raw_metadata=b'{"reason": '), 1002, "not UTF-8 JSON"),
    ("not utf-8", craft(Kind.BYE, None, raw_metadata=b'{"reason": "\xff"}'), 1002, "not UTF-8 JSON"),
    ("deep json", craft(Kind.BYE, None, raw_metadata=DEEP_JSON), 1002, "not UTF-8 JSON"),
    ("json array", craft(Kind.BYE, [1, 2]), 1002, "must be a JSON object"),
    ("no tensors list", craft(Kind.BYE, {"reason": "x"}), 1002, "'tensors' list"),
    ("missing field", craft(Kind.BYE, {"tensors": []}), 1002, r"missing fields \['reason'\]"),
    ("unexpected field", craft(Kind.BYE, {**BYE, "extra": 1}), 1002, r"unexpected \['extra'\]"),
    ("str as int", craft(Kind.GRADIENTS, {**GRADS, "round": "0"}), 1002, "round: expected int"),
    ("bool as int", craft(Kind.GRADIENTS, {**GRADS, "step": True}), 1002, "step: expected int"),
    ("null as float", craft(Kind.GRADIENTS, {**GRADS, "loss": None}), 1002, "loss: expected float"),
    ("huge int as float", craft(Kind.GRADIENTS, {**GRADS, "loss": 10**400}), 1002, "loss"),
    ("int as bool", craft(Kind.ROUND_RESULT, {**RESULT, "done": 1}), 1002, "done: expected bool"),
    ("negative round", craft(Kind.GRADIENTS, {**GRADS, "round": -1}), 1002, "must be >= 0"),
    ("bad client_id", craft(Kind.HELLO, {**HELLO, "client_id": "a b", "tensors": []}), 1002, "client_id"),
    ("tensor header not an object", craft(Kind.GRADIENTS, {**GRADS, "tensors": [1]}), 1002, "tensor header"),
    ("tensor header missing keys", craft(Kind.GRADIENTS, {**GRADS, "tensors": [{}]}), 1002, "tensor header"),
    ("unknown dtype", grads_frame(dtype="complex64"), 1003, "unsupported dtype"),
    ("unknown wire", grads_frame(dtype="float32", wire="bf16"), 1003, "unknown wire"),
    ("float32 sent raw", grads_frame(dtype="float32", wire="raw"), 1003, "travel as"),
    ("int64 sent as fp16", grads_frame(wire="fp16"), 1003, "travel as"),
    ("negative dim", grads_frame(bytes(16), shape=[-2]), 1002, "impossible shape"),
    ("huge empty shape", grads_frame(shape=[0, 2**40, 2**40], nbytes=0), 1002, "impossible shape"),
    ("shape vs nbytes", grads_frame(bytes(16), shape=[3]), 1002, "takes 24 bytes, header says 16"),
    ("payload short", grads_frame(bytes(15), **F32, shape=[1, 1, 4]), 1002, "is truncated"),
    ("payload long", grads_frame(bytes(17), **F32, shape=[1, 1, 4]), 1002, "has trailing bytes"),
    ("int8 scale NaN", grads_frame(b"\0\0\xc0\x7f\1", **INT8_1), 1002, "int8 scales must be finite"),
    ("int8 scale 0", grads_frame(bytes(5), **INT8_1), 1002, "int8 scales must be finite and positive"),
    ("bool byte 2", grads_frame(b"\0\2", dtype="bool", nbytes=2), 1003, "0 or 1"),
    ("2-d activation_grads", grads_frame(bytes(16), **F32, shape=[2, 2]), 1002, r"\(B, T, H\)"),
    ("tensors on Bye", craft(Kind.BYE, {**BYE, "tensors": [MASK]}, bytes(16)), 1002, "carries no tensors"),
    ("same name twice", craft(Kind.WELCOME, {**WELCOME, "tensors": [MASK, MASK]}, bytes(32)), 1002, "twice"),
    ("int adapters", craft(Kind.WELCOME, {**WELCOME, "tensors": [MASK]}, bytes(16)), 1002, "float array"),
    ("no tensors", craft(Kind.ACTIVATIONS, {"round": 0, "step": 0, "stage": "split", "tensors": []}), 1002, "carries"),
]
# fmt: on


@pytest.mark.parametrize(
    ("frame", "close_code", "match"), [case[1:] for case in BAD_FRAMES], ids=[case[0] for case in BAD_FRAMES]
)
def test_bad_frames_are_protocol_errors_with_a_close_code(frame: bytes, close_code: int, match: str) -> None:
    expect_protocol_error(frame, close_code, match)


def test_mask_shape_must_match_the_activations() -> None:
    tensors = activations_tensors()
    frame = encode(Activations(0, 0, tensors))
    wrong = {**tensors, "attention_mask": np.ones((B, T + 1), dtype=np.int64)}
    with pytest.raises(ProtocolError, match="attention_mask must be int64 of shape"):
        Activations(0, 0, wrong)
    # The receiver checks what the sender checks: splice a (B, T+1) mask into a valid frame.
    metadata = metadata_of(frame)
    metadata["tensors"][1].update(shape=[B, T + 1], nbytes=8 * B * (T + 1))
    payload = payload_of(frame)
    spliced = payload[: 4 * B * T * H] + wrong["attention_mask"].tobytes() + payload[4 * B * T * H + 8 * B * T :]
    expect_protocol_error(craft(Kind.ACTIVATIONS, metadata, spliced), 1002, "attention_mask")


@pytest.mark.parametrize("client_id", ["", "a" * 65, "has space", "slash/", "naïve", "new\nline"])
def test_bad_client_ids_are_refused_on_construction(client_id: str) -> None:
    with pytest.raises(ProtocolError, match="client_id"):
        Hello(client_id, 1, "h", None, 1)


def test_good_client_ids_are_accepted() -> None:
    for client_id in ["a", "A" * 64, "pi-4.kitchen_01"]:
        assert Hello(client_id, 1, "h", None, 1).client_id == client_id


# ------------------------------------------------------------------------------------------------- fuzzing


def decodes_or_fails_cleanly(frame: bytes) -> None:
    """The property: any bytes give a message or a ProtocolError, and never through decode's safety net."""
    try:
        decode(frame, max_size=1 << 20)
    except ProtocolError as error:
        assert error.close_code in CLOSE_CODES
        assert "gap in edgesplit's checks" not in str(error), str(error)


VALID_FRAMES = [encode(message, wire) for message in examples() for wire in Wire]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_protocol_error(frame: bytes) -> None:
    decodes_or_fails_cleanly(frame)


@FUZZ
@given(st.sampled_from(list(Kind)), st.binary(max_size=300))
def test_random_bytes_after_a_valid_header_only_ever_raise_protocol_error(kind: Kind, rest: bytes) -> None:
    decodes_or_fails_cleanly(MAGIC + bytes([PROTOCOL_VERSION, kind]) + rest)


@FUZZ
@given(
    st.sampled_from(VALID_FRAMES),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), max_size=8),
    st.integers(min_value=0),
    st.binary(max_size=8),
)
def test_mutated_valid_frames_only_ever_raise_protocol_error(
    frame: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    mutated = bytearray(frame)
    for position, bit in flips:
        mutated[position % len(mutated)] ^= 1 << bit
    decodes_or_fails_cleanly(bytes(mutated[: cut % (len(mutated) + 1)]) + tail)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(VALID_FRAMES), st.data())
def test_mutated_metadata_only_ever_raises_protocol_error(frame: bytes, data: st.DataObject) -> None:
    """Rewrite one metadata field, or one key of one tensor header, with any JSON value."""
    metadata = metadata_of(frame)
    target = metadata
    if metadata["tensors"] and data.draw(st.booleans()):
        target = data.draw(st.sampled_from(metadata["tensors"]))
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=6))
    if data.draw(st.booleans()):
        target.pop(key, None)
    else:
        target[key] = data.draw(JSON_VALUES)
    decodes_or_fails_cleanly(craft(frame[3], metadata, payload_of(frame)))


# ------------------------------------------------------------------------------------------------ session


def flow() -> list[tuple[Role, Message, State]]:
    """Two rounds: (sender, message, state after it). Round 1 has a frozen head (no activation_grads)."""
    steps: list[tuple[Role, Message, State]] = [
        (Role.CLIENT, EXAMPLES[Kind.HELLO], State.AWAIT_WELCOME),
        (Role.SERVER, EXAMPLES[Kind.WELCOME], State.TRAINING),
    ]
    for round_ in (0, 1):
        for step in (0, 1):
            grads = {"activation_grads": np.zeros((B, T, H), np.float32)} if round_ == 0 else {}
            steps += [
                (Role.CLIENT, Activations(round_, step, activations_tensors(step)), State.AWAIT_GRADIENTS),
                (Role.SERVER, Gradients(round_, step, 2.0, 0.01, grads), State.TRAINING),
            ]
        done = round_ == 1
        steps += [
            (Role.CLIENT, AdapterUpdate(round_, 128, adapters(round_), {}), State.AWAIT_ROUND_RESULT),
            (
                Role.SERVER,
                RoundResult(round_, round_ + 1, done, None, adapters(9)),
                State.CLOSED if done else State.TRAINING,
            ),
        ]
    return steps


def sessions() -> dict[Role, Session]:
    return {Role.CLIENT: Session(Role.CLIENT), Role.SERVER: Session(Role.SERVER)}


def play(sides: dict[Role, Session], steps: list[tuple[Role, Message, State]]) -> None:
    for sender, message, _ in steps:
        receiver = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
        sides[receiver].receive(sides[sender].send(message, Wire.INT8))


def test_the_whole_flow_passes_and_both_sides_agree_on_state_and_bytes() -> None:
    sides = sessions()
    assert sides[Role.CLIENT].state is sides[Role.SERVER].state is State.AWAIT_HELLO
    sent: dict[Role, dict[str, int]] = {Role.CLIENT: {}, Role.SERVER: {}}
    for sender, message, state_after in flow():
        receiver = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
        frame = sides[sender].send(message, Wire.INT8)
        sent[sender][message.kind.name] = sent[sender].get(message.kind.name, 0) + len(frame)
        assert sides[sender].state is state_after
        assert_same_message(message, sides[receiver].receive(frame), float_atol=0.05)
        assert sides[receiver].state is state_after
    assert sides[Role.CLIENT].bytes_sent == sides[Role.SERVER].bytes_received == sent[Role.CLIENT]
    assert sides[Role.SERVER].bytes_sent == sides[Role.CLIENT].bytes_received == sent[Role.SERVER]
    assert set(sent[Role.CLIENT]) == {"HELLO", "ACTIVATIONS", "ADAPTER_UPDATE"}
    assert set(sent[Role.SERVER]) == {"WELCOME", "GRADIENTS", "ROUND_RESULT"}


@pytest.mark.parametrize(
    ("prefix", "receiver", "message"),
    [
        (0, Role.SERVER, EXAMPLES[Kind.ACTIVATIONS]),  # activations before Hello
        (1, Role.SERVER, EXAMPLES[Kind.HELLO]),  # a second Hello
        (2, Role.CLIENT, EXAMPLES[Kind.WELCOME]),  # a second Welcome
        (2, Role.CLIENT, EXAMPLES[Kind.GRADIENTS]),  # gradients nobody asked for
        (3, Role.SERVER, EXAMPLES[Kind.ACTIVATIONS]),  # a second batch before its gradients
        (3, Role.SERVER, EXAMPLES[Kind.ADAPTER_UPDATE]),  # adapters while gradients are owed
        (2, Role.CLIENT, EXAMPLES[Kind.ROUND_RESULT]),  # a result for adapters never sent
        (2, Role.SERVER, EXAMPLES[Kind.WELCOME]),  # a server-only message, received by the server
    ],
)
def test_out_of_order_messages_are_protocol_errors_and_close_the_session(
    prefix: int, receiver: Role, message: Message
) -> None:
    sides = sessions()
    play(sides, flow()[:prefix])
    state = sides[receiver].state
    with pytest.raises(ProtocolError, match=f"unexpected {message.kind.name} in state {state.name}") as caught:
        sides[receiver].receive(encode(message))
    assert caught.value.close_code == 1002
    assert sides[receiver].state is State.CLOSED


def test_a_side_may_not_send_out_of_order_and_stays_where_it_was() -> None:
    client = Session(Role.CLIENT)
    with pytest.raises(ProtocolError, match="client may not send ACTIVATIONS in state AWAIT_HELLO"):
        client.send(EXAMPLES[Kind.ACTIVATIONS])
    with pytest.raises(ProtocolError, match="may not send WELCOME"):
        client.send(EXAMPLES[Kind.WELCOME])
    assert client.state is State.AWAIT_HELLO and client.bytes_sent == {}


@pytest.mark.parametrize("prefix", range(len(flow()) - 1))
def test_error_and_bye_end_the_conversation_from_any_open_state(prefix: int) -> None:
    for sender, message in [(Role.SERVER, EXAMPLES[Kind.ERROR]), (Role.CLIENT, EXAMPLES[Kind.BYE])]:
        sides = sessions()
        play(sides, flow()[:prefix])
        receiver = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
        sides[receiver].receive(sides[sender].send(message))
        assert sides[sender].state is sides[receiver].state is State.CLOSED


def test_nothing_is_accepted_once_closed() -> None:
    sides = sessions()
    play(sides, flow())
    for role, message in [(Role.CLIENT, EXAMPLES[Kind.ERROR]), (Role.SERVER, EXAMPLES[Kind.BYE])]:
        with pytest.raises(ProtocolError, match="in state CLOSED"):
            sides[role].receive(encode(message))


def test_a_malformed_frame_closes_the_session_and_bad_frames_are_not_counted() -> None:
    server = Session(Role.SERVER, max_size=64)
    with pytest.raises(ProtocolError) as caught:
        server.receive(encode(EXAMPLES[Kind.ACTIVATIONS]))
    assert caught.value.close_code == 1009
    assert server.state is State.CLOSED and server.bytes_received == {}


def test_the_table_gives_every_open_state_an_exit_and_closed_none() -> None:
    for state in State:
        exits = {kind for (_, from_state, kind, _) in TRANSITIONS if from_state is state}
        if state is State.CLOSED:
            assert not exits
        else:
            assert {Kind.ERROR, Kind.BYE} <= exits
    assert {kind for (_, _, kind, _) in TRANSITIONS} == set(Kind)


def test_round_messages_carry_top_k_indices_for_kd() -> None:
    values = np.random.default_rng(0).random((2, 3, 4)).astype(np.float32)
    indices = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    update = decode(encode(AdapterUpdate(0, 5, {"proxy_values": values, "proxy_indices": indices}, {})))
    assert isinstance(update, AdapterUpdate)
    np.testing.assert_array_equal(update.tensors["proxy_indices"], indices)
    assert update.tensors["proxy_indices"].dtype == np.int64
    with pytest.raises(ProtocolError, match="float array"):
        AdapterUpdate(0, 5, {"lora.0.q_proj.A": indices}, {})  # an int adapter is still refused


# ----------------------------------------------------------------------------------- optional fields


def test_the_servers_time_split_travels_and_an_older_senders_frame_still_decodes() -> None:
    gradients = decode(encode(Gradients(0, 1, 2.0, 0.5, {}, queue_seconds=0.375, compute_seconds=0.125)))
    assert isinstance(gradients, Gradients)
    assert (gradients.queue_seconds, gradients.compute_seconds) == (0.375, 0.125)
    result = decode(encode(RoundResult(0, 1, False, 2.5, {}, eval_seconds=37.0)))
    assert isinstance(result, RoundResult) and result.eval_seconds == 37.0
    # A frame without them (what an older server writes) decodes with None, and an unset optional field is
    # left out of the frame, so that frame is byte for byte the older one.
    older = craft(Kind.GRADIENTS, GRADS)
    decoded = decode(older)
    assert isinstance(decoded, Gradients) and decoded.queue_seconds is None and decoded.compute_seconds is None
    assert encode(Gradients(0, 0, 1.0, 0.0, {})) == craft(
        Kind.GRADIENTS, GRADS, raw_metadata=json.dumps(GRADS, separators=(",", ":")).encode()
    )
    assert b"eval_seconds" not in encode(RoundResult(0, 1, False, None, {}))


@pytest.mark.parametrize("value", [-1.0, float("nan"), "1"])
def test_a_bad_time_split_is_refused(value: object) -> None:
    with pytest.raises(ProtocolError, match="queue_seconds"):
        Gradients(0, 0, 1.0, 0.5, {}, queue_seconds=value)  # type: ignore[arg-type]
    expect_protocol_error(craft(Kind.GRADIENTS, {**GRADS, "queue_seconds": value}), 1002, "queue_seconds")
