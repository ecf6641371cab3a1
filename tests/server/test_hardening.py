"""One peer must not stop or poison a federation: a real server, attacked by raw peers on loopback.

Strangers (no Hello yet) try to fill the disk and forge log lines; admitted peers send activations and
updates that would poison the shared tail or the global model; a failing checkpoint write must stop the
server loudly, with every client told why, rather than leave it asleep.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loopback import (
    Processes,
    activations,
    adapters,
    free_port,
    hello_frame,
    probe,
    raw_frame,
    serve_command,
)

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.metrics import read_jsonl
from edgesplit.client.protocol import PROTOCOL_VERSION, AdapterUpdate, Error, Gradients, Kind, Welcome, encode
from edgesplit.server.aggregate import fedavg
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.guards import MAX_NUM_SAMPLES
from edgesplit.server.transport import REFUSALS_LOGGED_PER_WINDOW


@pytest.fixture
def artifacts(tiny_artifacts):  # type: ignore[no-untyped-def]
    return tiny_artifacts("llama", 1)


def hello_fields(manifest: Any, **changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "client_id": "x",
        "protocol_version": PROTOCOL_VERSION,
        "manifest_hash": manifest.manifest_hash,
        "token": None,
        "num_samples": 8,
    }
    return {**fields, **changes}


def update_frame(num_samples: object, tensors: dict[str, np.ndarray], metrics: dict[str, float] | None = None) -> bytes:
    return raw_frame(Kind.ADAPTER_UPDATE, {"round": 0, "num_samples": num_samples, "metrics": metrics or {}}, tensors)


def all_finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(all_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(item) for item in value)
    if hasattr(value, "numpy"):
        value = value.detach().numpy()
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return bool(np.all(np.isfinite(value)))
    return True


def test_strangers_cannot_fill_the_log_or_forge_lines(artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = load_manifest(artifacts, verify=False)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    forged = "0" * 63 + "\n[server] round 9/9 closed with 2 clients (a, b)\x1b[2J"
    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, tmp_path, rounds=1, min_clients=1))
        server.wait_for("listening on")
        # One huge unexpected key, of characters two bytes long in UTF-8: the close reason must still fit.
        huge = probe(url, raw_frame(Kind.HELLO, hello_fields(manifest, **{"é" * 9_000: 1})))
        forging = probe(url, raw_frame(Kind.HELLO, hello_fields(manifest, manifest_hash=forged)))
        reserved = {name: probe(url, hello_frame(name, manifest)) for name in ("..", ".", "latest")}
        server.wait_for("latest")
        # A flood of refusals, some by the shell (the count) and some by the round engine (other artifacts).
        for index in range(REFUSALS_LOGGED_PER_WINDOW + 6):
            wrong = {"num_samples": MAX_NUM_SAMPLES + 1} if index % 2 else {"manifest_hash": "f" * 16}
            probe(url, raw_frame(Kind.HELLO, hello_fields(manifest, **wrong)))
        server.wait_for("not logging more")
        output = server.output
        server.process.terminate()
        server.wait(60)

    assert (huge.error, huge.close_code) == ("protocol", 1002)
    assert (forging.error, forging.close_code) == ("protocol", 1002)
    assert "sha256" in forging.messages[-1].message
    assert all((p.error, p.close_code) == ("protocol", 1002) for p in reserved.values())
    assert max(len(line) for line in output.splitlines()) < 1000
    assert "characters in all" in output  # the cut says how long the text was
    assert "\x1b" not in output and "round 9/9" not in output
    assert (tmp_path / "server.jsonl").stat().st_size < 100_000
    # The flood's refusals were printed REFUSALS_LOGGED_PER_WINDOW times in all, then suppressed.
    flood = output.count("num_samples must be between") + output.count("the client runs artifacts ffff")
    assert REFUSALS_LOGGED_PER_WINDOW - 5 <= flood <= REFUSALS_LOGGED_PER_WINDOW
    refused = [r for r in read_jsonl(tmp_path / "server.jsonl") if r["event"] == "refused"]
    assert len(refused) <= REFUSALS_LOGGED_PER_WINDOW


def test_poisoned_steps_and_updates_are_dropped_and_the_round_closes(artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = load_manifest(artifacts, verify=False)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    huge_value = activations(manifest)
    huge_value.tensors["activations"][0, 0, 0] = 2e38
    step = encode(activations(manifest))
    good = adapters(manifest, 0.01)
    attacks: dict[str, bytes] = {
        "overflowing count": update_frame(10**400, good),
        "count past the cap": update_frame(MAX_NUM_SAMPLES + 1, good),
        "fractional count": update_frame(8.5, good),
        "adapters of 1e30": update_frame(8, adapters(manifest, 1e30)),
        "adapters of 1e6": update_frame(8, adapters(manifest, 1e6)),
    }
    outcomes: dict[str, Any] = {}
    with Processes() as run:
        command = serve_command(artifacts, port, tmp_path, rounds=1, steps=1, min_clients=1, extra=["--wire", "fp16"])
        server = run.start("server", command)
        server.wait_for("listening on")
        outcomes["activation of 2e38"] = probe(url, hello_frame("poisoner", manifest), encode(huge_value))
        for index, (name, frame) in enumerate(attacks.items()):
            outcomes[name] = probe(url, hello_frame(f"attacker-{index}", manifest), step, frame)
        honest = probe(url, hello_frame("honest", manifest), step, update_frame(8, good, {"id": 1.0}))
        assert server.wait(120) == 0, server.output

    for name, outcome in outcomes.items():
        assert outcome.error == "bad_tensor" or outcome.error == "protocol", (name, outcome)
        assert outcome.close_code in (1002, 1008), (name, outcome)
    assert [type(m) for m in outcomes["activation of 2e38"].messages] == [Welcome, Error]
    assert [type(m).__name__ for m in honest.messages] == ["Welcome", "Gradients", "RoundResult"]
    assert "Traceback" not in server.output
    assert "round 1/1 closed with 1 clients (honest)" in server.output
    checkpoint = load_latest(tmp_path / "ckpt")
    assert checkpoint is not None and checkpoint.round == 1
    assert all_finite(checkpoint.global_adapters) and all_finite(checkpoint.tail_lora)
    assert all_finite(checkpoint.tail_optimizer)
    for name, array in checkpoint.global_adapters.items():
        np.testing.assert_array_equal(array, good[name])  # the one accepted update, alone
    records = read_jsonl(tmp_path / "server.jsonl")
    refused = {r["client_id"] for r in records if r["event"] == "refused"}
    assert refused == {"poisoner", *(f"attacker-{i}" for i in range(len(attacks)))}
    (update,) = [r for r in records if r["event"] == "update"]
    assert update["client_id"] == "honest"  # a client metric named "id" does not replace it


def test_the_checkpoint_is_the_average_of_the_updates_the_metrics_record_as_accepted(artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two updates accepted with different counts, one dropped in the same round: the checkpoint's global
    adapters are FedAvg of exactly those the `round` record names, with its counts."""
    manifest = load_manifest(artifacts, verify=False)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    step = encode(activations(manifest))
    sent = {"a": (adapters(manifest, 0.01), 8), "b": (adapters(manifest, 0.03), 24)}

    def join(name: str, frame: bytes) -> threading.Thread:
        thread = threading.Thread(target=probe, args=(url, hello_frame(name, manifest), step, frame))
        thread.start()
        return thread

    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, tmp_path, rounds=1, steps=1, min_clients=2))
        server.wait_for("listening on")
        # "evil" and "a" make the quorum; evil's update is dropped before "b" joins, so the round holds all three.
        evil, first = join("evil", update_frame(8, adapters(manifest, 1e30))), join("a", update_frame(8, sent["a"][0]))
        evil.join(120)
        second = join("b", update_frame(24, sent["b"][0]))
        first.join(120)
        second.join(120)
        assert server.wait(120) == 0, server.output

    records = read_jsonl(tmp_path / "server.jsonl")
    (closed,) = [r for r in records if r["event"] == "round"]
    dropped = [r for r in records if r["event"] == "refused" and r["code"] == "bad_tensor"]
    assert sorted(closed["clients"]) == ["a", "b"] and closed["num_samples"] == {"a": 8, "b": 24}
    assert [(r["client_id"], r["round"]) for r in dropped] == [("evil", 0)]
    checkpoint = load_latest(tmp_path / "ckpt")
    assert checkpoint is not None and set(checkpoint.updates) == {"a", "b"}
    accepted = [(checkpoint.updates[name], closed["num_samples"][name]) for name in closed["clients"]]
    expected = fedavg(accepted)
    for name, array in checkpoint.global_adapters.items():
        np.testing.assert_array_equal(array, expected[name])
        np.testing.assert_allclose(array, (0.01 * 8 + 0.03 * 24) / 32, rtol=1e-6)  # not either client's alone


def test_a_failed_checkpoint_write_stops_the_server_and_tells_the_clients(artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = load_manifest(artifacts, verify=False)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, tmp_path, rounds=2, steps=1, min_clients=1))
        server.wait_for("listening on")
        # The checkpoint directory becomes a file: every write into it fails, as on a read-only disk.
        shutil.rmtree(tmp_path / "ckpt", ignore_errors=True)
        (tmp_path / "ckpt").write_text("not a directory")
        step = encode(activations(manifest))
        outcome = probe(url, hello_frame("a", manifest), step, encode(AdapterUpdate(0, 8, adapters(manifest), {})))
        code = server.wait(60)

    assert code != 0, server.output
    assert "round 1 could not close" in server.output
    assert [type(m) for m in outcome.messages] == [Welcome, Gradients, Error]
    assert outcome.error == "failed" and "could not close" in outcome.messages[-1].message


def test_a_step_that_is_not_finite_leaves_the_tail_as_it_was(artifacts) -> None:  # type: ignore[no-untyped-def]
    from edgesplit.errors import TrainingError
    from edgesplit.server.tail import OptimizerSettings, Tail

    manifest = load_manifest(artifacts, verify=False)
    tail = Tail(artifacts, OptimizerSettings(learning_rate=0.02, weight_decay=0.0), seed=0, threads=1)
    good = activations(manifest).tensors
    tail.train_step(good["activations"], good["attention_mask"], good["labels"])  # AdamW has state now
    before = tail.state_dict()
    poisoned = good["activations"].copy()
    poisoned[0, 0, 0] = 3e38  # finite, but the layer norm's mean of squares overflows
    with pytest.raises(TrainingError, match="not finite"):
        tail.train_step(poisoned, good["attention_mask"], good["labels"])
    after = tail.state_dict()
    for name, array in before["lora"].items():
        np.testing.assert_array_equal(after["lora"][name], array)
    for key, state in before["optimizer"]["state"].items():
        for field, value in state.items():
            assert bool((after["optimizer"]["state"][key][field] == value).all()), (key, field)
    loss, _ = tail.train_step(good["activations"], good["attention_mask"], good["labels"])
    assert np.isfinite(loss)


def test_peer_text_is_escaped_and_cut_and_close_reasons_fit() -> None:
    from edgesplit.server.transport import CLOSE_REASON_MAX_BYTES, close_reason, peer_text

    assert peer_text("a\nb\x1b[2J") == "a\\nb\\x1b[2J"
    cut = peer_text("x" * 10_000, limit=50)
    assert cut.startswith("x" * 50) and "10000 characters in all" in cut and len(cut) < 100
    reason = close_reason("é" * 200)
    assert len(reason.encode()) <= CLOSE_REASON_MAX_BYTES and set(reason) == {"é"}


def test_a_step_the_server_itself_fails_on_stops_the_client_with_a_line_instead_of_a_reconnection_loop(
    artifacts, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """A bug in the server's step (here a KeyError, as a U-shaped step once met) is not the client's fault and
    not a lost link: the client is told, in an Error it stops on, and the server's log keeps the traceback."""
    import asyncio
    import contextlib

    from websockets.asyncio.client import connect

    from edgesplit.client.protocol import Activations, Hello, Role, Session
    from edgesplit.server.server import Server, ServerConfig
    from edgesplit.server.strategies.split import SplitStrategy

    manifest = load_manifest(artifacts, verify=False)
    shape = manifest.activations_shape
    tensors = {
        "activations": np.full(shape, 0.1, np.float32),
        "attention_mask": np.ones(shape[:2], np.int64),
        "labels": np.ones(shape[:2], np.int64),
    }

    async def scenario() -> Any:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise KeyError("labels")

        monkeypatch.setattr(SplitStrategy, "train_step", broken)
        monkeypatch.setattr(SplitStrategy, "train_batch", broken)
        server = Server(ServerConfig(artifacts=artifacts, port=0, rounds=1, min_clients=1, steps_per_round=2))
        ready = asyncio.Event()
        serving = asyncio.create_task(server.serve(ready))
        await ready.wait()
        try:
            websocket = await connect(f"ws://127.0.0.1:{server.port}", max_size=None, compression=None)
            session = Session(Role.CLIENT)
            hello = Hello("raw", PROTOCOL_VERSION, manifest.manifest_hash, None, 8, cut_layer=manifest.cut_layer)
            await websocket.send(session.send(hello))
            assert isinstance(session.receive(await asyncio.wait_for(websocket.recv(), 30)), Welcome)
            await websocket.send(session.send(Activations(0, 0, dict(tensors))))
            answer = session.receive(await asyncio.wait_for(websocket.recv(), 60))
            await asyncio.wait_for(websocket.wait_closed(), 30)
            return answer, websocket.close_code
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving

    answer, close_code = asyncio.run(scenario())
    assert isinstance(answer, Error) and answer.code == "server_error", answer
    assert "KeyError" in answer.message and "server's log" in answer.message
    assert close_code == 1011
    log = capsys.readouterr().out
    assert "step 0 failed on the server" in log and "Traceback" in log and "KeyError: 'labels'" in log
