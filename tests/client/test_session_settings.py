"""The Welcome's settings record: typed, validated like every other field, and carried in the Welcome's JSON."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest

from edgesplit.client.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Hello,
    Kind,
    Role,
    Session,
    SessionSettings,
    Welcome,
    Wire,
    decode,
    encode,
)
from edgesplit.errors import ProtocolError

# What the server's settings property gives today, plus the reconnection fields.
SERVER_MAPPING: dict[str, object] = {
    "steps_per_round": 4,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "wire": "int8",
    "batch_size": 2,
    "max_seq_len": 16,
    "frozen_head": False,
    "seed": 7,
    "framework": "split",
    "resume_step": 2,
    "update_received": False,
}
KD_MAPPING = {**SERVER_MAPPING, "framework": "kd", "top_k": 4, "temperature": 2.0, "client_distill_epochs": 1}


def welcome_frame(settings: object) -> bytes:
    """A Welcome frame whose settings object is `settings`, written as the JSON a peer could send."""
    metadata = json.dumps({"round": 0, "total_rounds": 1, "settings": settings, "tensors": []}).encode()
    return struct.pack("<2sBBI", MAGIC, PROTOCOL_VERSION, Kind.WELCOME, len(metadata)) + metadata


def test_the_servers_mapping_becomes_a_typed_record() -> None:
    settings = SessionSettings.from_mapping(SERVER_MAPPING)
    assert settings.wire is Wire.INT8 and settings.resume_step == 2 and settings.seed == 7
    assert settings.top_k is None and settings.exchange == "split" and settings.stages == ("split",)
    kd = SessionSettings.from_mapping(KD_MAPPING)
    assert (kd.framework, kd.top_k, kd.temperature, kd.client_distill_epochs) == ("kd", 4, 2.0, 1)


@pytest.mark.parametrize("mapping", [SERVER_MAPPING, KD_MAPPING])
def test_settings_round_trip_through_a_welcome_frame(mapping: dict[str, object]) -> None:
    settings = SessionSettings.from_mapping(mapping)
    welcome = decode(encode(Welcome(0, 3, settings, {})))
    assert isinstance(welcome, Welcome)
    assert welcome.settings == settings
    # An integer learning rate in the JSON (1 for 1.0) still reads as a float.
    assert SessionSettings.from_mapping({**mapping, "learning_rate": 1}).learning_rate == 1.0


# (what is wrong, the settings object, regex of the error)
BAD_SETTINGS: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "expected SessionSettings"),
    ("unknown key", {**SERVER_MAPPING, "lerning_rate": 0.1}, r"unknown keys \['lerning_rate'\]"),
    ("missing key", {k: v for k, v in SERVER_MAPPING.items() if k != "wire"}, r"missing \['wire'\]"),
    ("unknown wire", {**SERVER_MAPPING, "wire": "bf16"}, "wire must be one of"),
    ("wire not a string", {**SERVER_MAPPING, "wire": 8}, "wire must be one of"),
    ("unknown framework", {**SERVER_MAPPING, "framework": "fedprox"}, "unknown framework 'fedprox'"),
    ("unknown exchange", {**SERVER_MAPPING, "exchange": "ring"}, "unknown exchange 'ring'"),
    ("zero steps", {**SERVER_MAPPING, "steps_per_round": 0}, "steps_per_round must be at least 1"),
    ("steps as a string", {**SERVER_MAPPING, "steps_per_round": "4"}, "steps_per_round must be an integer"),
    ("steps as true", {**SERVER_MAPPING, "steps_per_round": True}, "steps_per_round must be an integer"),
    ("negative seed", {**SERVER_MAPPING, "seed": -1}, "seed must be >= 0"),
    ("resume past the round", {**SERVER_MAPPING, "resume_step": 5}, r"resume_step must be in \[0, "),
    ("negative learning rate", {**SERVER_MAPPING, "learning_rate": -0.1}, "learning_rate must be a finite"),
    ("huge learning rate", {**SERVER_MAPPING, "learning_rate": 10**400}, "learning_rate"),
    ("frozen_head as 1", {**SERVER_MAPPING, "frozen_head": 1}, "frozen_head must be true or false"),
    ("kd fields on split", {**SERVER_MAPPING, "top_k": 4}, r"\['top_k'\] are KD-FedLLM settings"),
    ("kd without top_k", {k: v for k, v in KD_MAPPING.items() if k != "top_k"}, "KD-FedLLM needs"),
    ("kd top_k 0", {**KD_MAPPING, "top_k": 0}, "top_k must be an integer >= 1"),
    ("kd temperature 0", {**KD_MAPPING, "temperature": 0}, "temperature must be a finite number > 0"),
]


@pytest.mark.parametrize(("settings", "match"), [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS])
def test_bad_settings_in_a_welcome_frame_are_protocol_errors(settings: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as caught:
        decode(welcome_frame(settings))
    assert caught.value.close_code == 1002


def test_bad_settings_are_refused_on_construction_too() -> None:
    with pytest.raises(ProtocolError, match="unknown keys"):
        SessionSettings.from_mapping({**SERVER_MAPPING, "extra": 1})
    with pytest.raises(ProtocolError, match="batch_size must be at least 1"):
        SessionSettings(steps_per_round=1, learning_rate=0.1, wire=Wire.FP32, batch_size=0, max_seq_len=8)


def test_the_session_owns_the_negotiated_settings_and_wire() -> None:
    client, server = Session(Role.CLIENT), Session(Role.SERVER)
    assert client.settings is None and client.wire is Wire.FP32
    server.receive(client.send(Hello("c", PROTOCOL_VERSION, "h", None, 1)))
    settings = SessionSettings.from_mapping(SERVER_MAPPING)
    client.receive(server.send(Welcome(0, 1, settings, {"lora": np.zeros((2, 2), np.float32)})))
    assert client.settings == server.settings == settings
    assert client.wire is server.wire is Wire.INT8
