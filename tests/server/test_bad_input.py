"""Bad input against a real server while a real client trains: every malformed, truncated, oversized,
out-of-order or poisoned message gets an Error and a close code on its own connection, no tensor of it
reaches the tail's optimiser, and the server carries on serving the others to the end of the run."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from loopback import (
    Processes,
    activations,
    adapters,
    client_command,
    free_port,
    hello_frame,
    probe,
    raw_frame,
    serve_command,
    write_task,
)
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.metrics import read_jsonl
from edgesplit.client.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    AdapterUpdate,
    Error,
    Gradients,
    Hello,
    Kind,
    Welcome,
    decode,
    encode,
    max_frame_bytes,
)
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.server import HELLO_MAX_BYTES


@pytest.fixture
def setup(tiny_artifacts, tmp_path):  # type: ignore[no-untyped-def]
    write_task(tmp_path / "a.jsonl", seed=1, count=16)
    write_task(tmp_path / "b.jsonl", seed=2, count=20)
    return tiny_artifacts("llama", 1), tmp_path


def test_bad_peers_are_refused_and_training_carries_on(setup) -> None:  # type: ignore[no-untyped-def]
    artifacts, work = setup
    manifest = load_manifest(artifacts, verify=False)
    port, rounds = free_port(), 2
    url = f"ws://127.0.0.1:{port}"
    batch, seq, hidden = manifest.activations_shape
    valid_hello = encode(Hello("x", PROTOCOL_VERSION, manifest.manifest_hash, None, 8))
    hello_fields = {
        "client_id": "x",
        "protocol_version": PROTOCOL_VERSION,
        "manifest_hash": manifest.manifest_hash,
        "token": None,
        "num_samples": 8,
    }

    # Before Hello: (what the peer sends, expected Error code, expected close code).
    strangers: list[tuple[str, bytes | str, str | None, int]] = [
        ("garbage", b"\x00\x01garbage", "protocol", 1002),
        ("truncated Hello", valid_hello[:-5], "protocol", 1002),
        ("text frame", "hello", "protocol", 1003),
        ("unknown kind", raw_frame(99, {}), "protocol", 1003),
        (
            "wrong version",
            raw_frame(Kind.HELLO, hello_fields, version=PROTOCOL_VERSION + 1),
            "protocol",
            1002,
        ),
        ("Activations before Hello", encode(activations(manifest)), "protocol", 1002),
        (
            "client id with a path",
            raw_frame(Kind.HELLO, {**hello_fields, "client_id": "../../etc"}),
            "protocol",
            1002,
        ),
        (
            "deeply nested JSON",
            struct.pack("<2sBBI", MAGIC, PROTOCOL_VERSION, Kind.HELLO, 40_000) + b"[" * 40_000,
            "protocol",
            1002,
        ),
        (
            "Hello carrying a tensor",
            raw_frame(Kind.HELLO, hello_fields, {"x": np.zeros(4, np.float32)}),
            "protocol",
            1002,
        ),
        # Bigger than a Hello may be: websockets refuses it unread, with "message too big".
        ("oversized frame before Hello", b"\x00" * (HELLO_MAX_BYTES + 1), None, 1009),
    ]
    # After a valid Hello and Welcome: (what it sends, expected Error code, expected close code).
    nan = activations(manifest)
    nan.tensors["activations"][0, 0, 0] = np.nan
    inf = activations(manifest)
    inf.tensors["activations"][1, 2, 3] = np.inf
    bad_labels = activations(manifest)
    bad_labels.tensors["labels"][0, 0] = manifest.vocab_size
    bad_mask = activations(manifest)
    bad_mask.tensors["attention_mask"][0, 0] = 7
    nan_adapters = adapters(manifest)
    next(iter(nan_adapters.values()))[...] = np.nan
    first_name, first_shape = next(iter(manifest.lora.matrices.items()))
    wrong_shape = {
        **adapters(manifest),
        first_name: np.zeros((first_shape[0] + 1, *first_shape[1:]), np.float32),
    }
    members: list[tuple[str, Callable[[], bytes], str, int]] = [
        ("NaN in activations", lambda: encode(nan), "bad_tensor", 1008),
        ("Inf in activations", lambda: encode(inf), "bad_tensor", 1008),
        (
            "batch larger than allowed",
            lambda: encode(activations(manifest, batch=batch + 1)),
            "bad_tensor",
            1008,
        ),
        (
            "labels as int32",
            lambda: raw_frame(
                Kind.ACTIVATIONS,
                {"round": 0, "step": 0, "stage": "split"},
                {
                    "activations": np.zeros((batch, seq, hidden), np.float32),
                    "attention_mask": np.ones((batch, seq), np.int64),
                    "labels": np.zeros((batch, seq), np.int32),
                },
            ),
            "protocol",
            1002,
        ),
        ("labels outside the vocabulary", lambda: encode(bad_labels), "bad_tensor", 1008),
        ("attention mask of 7", lambda: encode(bad_mask), "bad_tensor", 1008),
        ("a round not started", lambda: encode(activations(manifest, round=5)), "protocol", 1002),
        ("a step past the round", lambda: encode(activations(manifest, step=99)), "protocol", 1002),
        ("NaN adapters", lambda: encode(AdapterUpdate(0, 8, nan_adapters, {})), "bad_tensor", 1008),
        (
            "adapters of the wrong shape",
            lambda: encode(AdapterUpdate(0, 8, wrong_shape, {})),
            "bad_tensor",
            1008,
        ),
        (
            "an extra adapter",
            lambda: encode(AdapterUpdate(0, 8, {**adapters(manifest), "evil": np.zeros(2, np.float32)}, {})),
            "bad_tensor",
            1008,
        ),
        ("a second Hello", lambda: valid_hello, "protocol", 1002),
    ]

    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, work, rounds=rounds))
        server.wait_for("listening on")
        a = run.start("a", client_command(url, artifacts, work / "a.jsonl", "a", work))
        server.wait_for(r"\ba joined")

        outcomes = {}
        for name, frame, _, _ in strangers:
            outcome = probe(url, frame)
            outcomes[name] = (outcome.error, outcome.close_code)
        for index, (name, make, _, _) in enumerate(members):
            # The first admitted peer completes the start barrier (2 clients), and a starts training.
            outcome = probe(url, hello_frame(f"peer-{index}", manifest), make())
            assert isinstance(outcome.messages[0], Welcome)
            outcomes[name] = (outcome.error, outcome.close_code)
        # A replayed step: the first is trained on, the same (round, step) again is refused.
        step = encode(activations(manifest))
        outcome = probe(url, hello_frame("replayer", manifest), step, step)
        assert [type(m) for m in outcome.messages] == [Welcome, Gradients, Error]
        outcomes["a replayed step"] = (outcome.error, outcome.close_code)
        # A connection that never says Hello is not kept waiting on forever: covered by hello_timeout_s, whose
        # 30 s default is too long for this test.

        a.wait_for(r"round 1 step 4:")  # a trained while all of the above went on
        b = run.start("b", client_command(url, artifacts, work / "b.jsonl", "b", work))
        assert a.wait() == 0, a.output
        assert b.wait() == 0, b.output
        assert server.wait() == 0, server.output

    expected = {name: (code, close) for name, _, code, close in strangers + members}
    expected["a replayed step"] = ("protocol", 1002)
    assert outcomes == expected
    assert "Traceback" not in server.output
    assert f"round {rounds}/{rounds} closed with 2 clients (a, b)" in server.output
    records = read_jsonl(work / "server.jsonl")
    # Of the bad peers, only the replayer's one valid step reached the tail; no bad update was taken.
    stepped = {r["client_id"] for r in records if r["event"] == "step"}
    assert stepped == {"a", "b", "replayer"}
    assert {r["client_id"] for r in records if r["event"] == "update"} == {"a", "b"}
    final = load_latest(work / "ckpt")
    assert final is not None and final.round == rounds
    assert all(np.isfinite(value).all() for value in [*final.global_adapters.values(), *final.tail_lora.values()])


def test_kind_precheck_raises_only_protocol_errors() -> None:
    """The server's look at a frame's kind, before decoding it, takes any bytes and raises nothing but
    ProtocolError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from edgesplit.client.protocol import State
    from edgesplit.errors import ProtocolError
    from edgesplit.server.transport import check_kind_allowed as _check_kind_allowed

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64), st.sampled_from(list(State)))
    def check(frame: bytes, state: State) -> None:
        try:
            _check_kind_allowed(frame, state)
        except ProtocolError:
            pass

    check()


def test_oversized_frame_after_hello_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    """Admitted clients may send activation-sized frames, and no bigger."""
    artifacts, work = setup
    manifest = load_manifest(artifacts, verify=False)
    port = free_port()
    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, work, rounds=1, min_clients=1))
        server.wait_for("listening on")
        url = f"ws://127.0.0.1:{port}"
        # As big as allowed: websockets takes it, and the protocol says what is wrong with it.
        outcome = probe(url, hello_frame("big", manifest), b"\x00" * max_frame_bytes(manifest))
        assert isinstance(outcome.messages[0], Welcome) and (outcome.error, outcome.close_code) == (
            "protocol",
            1002,
        )
        server.wait_for(r"big left; 0 connected")
        # One byte more: refused unread, "message too big".
        outcome = probe(url, hello_frame("big", manifest), b"\x00" * (max_frame_bytes(manifest) + 1))
        assert isinstance(outcome.messages[0], Welcome) and (outcome.error, outcome.close_code) == (
            None,
            1009,
        )
        server.wait_for(r"big left")


def test_a_silent_connection_is_closed_after_the_hello_timeout(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    """A peer that connects and says nothing does not hold a connection open for ever."""
    import asyncio

    from websockets.asyncio.client import connect as async_connect

    from edgesplit.server.server import Server, ServerConfig

    async def scenario() -> tuple[str | None, int | None]:
        server = Server(
            ServerConfig(artifacts=tiny_artifacts("llama", 1), port=0, rounds=1, min_clients=1, hello_timeout_s=1.0)
        )
        ready = asyncio.Event()
        serving = asyncio.create_task(server.serve(ready))
        await ready.wait()
        code = None
        try:
            async with async_connect(f"ws://127.0.0.1:{server.port}") as ws:
                try:
                    while True:
                        message = decode(await asyncio.wait_for(ws.recv(), 60))
                        code = message.code if isinstance(message, Error) else code
                except ConnectionClosed as closed:
                    return code, closed.rcvd.code if closed.rcvd is not None else None
        finally:
            server.finished.set()
            await serving

    assert asyncio.run(scenario()) == ("protocol", 1008)


def test_connections_waiting_for_hello_are_capped_and_a_client_retries_when_busy(setup) -> None:  # type: ignore[no-untyped-def]
    """Strangers cannot hold more than --max-pending-hellos connections open before the token check; a real
    client that finds the server busy retries with backoff and trains once a place is free."""
    artifacts, work = setup
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    extra = ["--max-pending-hellos", "2"]

    async def hold_two_then_probe_a_third(client_started: Any) -> tuple[str | None, int | None]:
        silent = [await async_connect(url, open_timeout=60) for _ in range(2)]
        try:
            async with async_connect(url, open_timeout=60) as third:
                code = None
                try:
                    while True:
                        message = decode(await asyncio.wait_for(third.recv(), 60))
                        code = message.code if isinstance(message, Error) else code
                except ConnectionClosed as closed:
                    outcome = code, closed.rcvd.code if closed.rcvd is not None else None
            client_started()
            await asyncio.sleep(3)  # the client is refused as busy meanwhile, and retries
            return outcome
        finally:
            for connection in silent:
                await connection.close()

    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, work, rounds=1, min_clients=1, extra=extra))
        server.wait_for("listening on")
        started: list[Any] = []

        def start_client() -> None:
            started.append(run.start("a", client_command(url, artifacts, work / "a.jsonl", "a", work)))

        assert asyncio.run(hold_two_then_probe_a_third(start_client)) == ("busy", 1013)
        client = started[0]
        assert client.wait() == 0, client.output
        assert "the server is busy" in client.output
        assert "trained 4 steps in 1 rounds" in client.output
        assert server.wait() == 0, server.output
