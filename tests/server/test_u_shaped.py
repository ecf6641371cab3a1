"""The U-shaped split (`edgesplit export --top-layers K`): a real server and real client processes.

The client talks to the server through a relay in this test that records every frame the client sends, so
that the test can decode each one and check that the labels never left the device. The refusals are
checked too: a --top-layers that leaves the server no middle, a negative one, and a client whose artifacts
are of the other kind (plain against U-shaped, and the other way round).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from loopback import Processes, client_command, free_port, serve_command, write_task
from test_integration import torch_blocker

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.head import Head
from edgesplit.client.metrics import read_jsonl
from edgesplit.client.protocol import (
    Activations,
    AdapterUpdate,
    Gradients,
    Hello,
    SessionSettings,
    Wire,
    decode,
)
from edgesplit.client.top import Top
from edgesplit.client.trainers import trainer_for
from edgesplit.errors import EdgesplitError, ExportError
from edgesplit.export import cli
from edgesplit.export.exporter import ExportConfig
from edgesplit.lora_names import parse_adapter_name
from edgesplit.server.adapter import check_adapters_fit
from edgesplit.server.checkpoint import load_latest

ROUNDS, STEPS = 2, 4


class RecordingRelay:
    """A websocket relay, client <-> relay <-> server, on its own thread, keeping every frame the client sends."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = f"ws://127.0.0.1:{upstream_port}"
        self.port = free_port()
        self.frames: list[bytes] = []
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Future[None] | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)

    async def _serve(self) -> None:
        from websockets.asyncio.client import connect
        from websockets.asyncio.server import serve

        async def relay(downstream) -> None:  # type: ignore[no-untyped-def]
            async with connect(self.upstream, max_size=None, compression=None) as upstream:

                async def up() -> None:
                    async for frame in downstream:
                        self.frames.append(bytes(frame))
                        await upstream.send(frame)

                async def down() -> None:
                    async for frame in upstream:
                        await downstream.send(frame)

                pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                for pump in pumps:
                    pump.cancel()

        self._stop = self._loop.create_future()
        async with serve(relay, "127.0.0.1", self.port, max_size=None, compression=None):
            self._ready.set()
            await self._stop

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


@pytest.fixture(scope="module")
def u_run(tiny_artifacts, tmp_path_factory):  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1, top_layers=1)
    plain = tiny_artifacts("llama", 1)
    work = tmp_path_factory.mktemp("u_run")
    write_task(work / "a.jsonl", seed=1, count=24)
    write_task(work / "eval.jsonl", seed=3, count=8)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{torch_blocker(work / 'blocker')}{os.pathsep}{Path.cwd()}")
    with Processes() as processes:
        server = processes.start(
            "server",
            serve_command(
                artifacts,
                port,
                work,
                rounds=ROUNDS,
                steps=STEPS,
                min_clients=1,
                extra=["--eval-data", str(work / "eval.jsonl"), "--eval-batches", "2"],
            ),
        )
        server.wait_for("listening on")
        url = f"ws://127.0.0.1:{port}"
        # First, a client with a plain split's artifacts: refused at the handshake, before it trains anything
        # (alongside the real client it could come after the run and find no server).
        stranger = processes.start("plain-client", client_command(url, plain, work / "a.jsonl", "plain", work))
        stranger_code = stranger.wait(120)
        relay = RecordingRelay(port)
        try:
            client = processes.start(
                "client",
                client_command(f"ws://127.0.0.1:{relay.port}", artifacts, work / "a.jsonl", "a", work),
                env=env,
            )
            client_code = client.wait(240)
            server_code = server.wait(60)
        finally:
            relay.close()
        yield {
            "artifacts": artifacts,
            "work": work,
            "codes": (server_code, client_code, stranger_code),
            "stranger": stranger.output,
            "frames": relay.frames,
        }


def test_a_u_shaped_run_trains_to_a_lower_loss(u_run) -> None:  # type: ignore[no-untyped-def]
    assert u_run["codes"][:2] == (0, 0)
    records = read_jsonl(u_run["work"] / "server.jsonl")
    evals = [r["eval_loss"] for r in records if r.get("event") == "eval" or "eval_loss" in r]
    evals = [loss for loss in evals if loss is not None]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals  # the whole model, evaluated by the server
    steps = [r for r in records if r.get("event") == "step"]
    assert len(steps) == ROUNDS * STEPS and all(np.isfinite(r["loss"]) for r in steps)
    checkpoint = load_latest(u_run["work"] / "ckpt")
    assert checkpoint is not None
    manifest = load_manifest(u_run["artifacts"], verify=False)
    top = set(manifest.top_matrices)
    assert top and top <= set(checkpoint.global_adapters)  # the device's top adapters were averaged and kept
    assert all(np.abs(checkpoint.global_adapters[name]).max() > 0 for name in top if "lora_B" in name)
    # The PEFT adapter out of the run covers the whole model: head and top from the devices, middle from the server.
    check_adapters_fit(manifest, checkpoint.global_adapters, checkpoint.tail_lora)
    layers = {parse_adapter_name(name).layer for name in (*checkpoint.global_adapters, *checkpoint.tail_lora)}
    assert layers == set(range(manifest.num_layers))


def test_no_frame_the_client_sends_carries_labels(u_run) -> None:  # type: ignore[no-untyped-def]
    manifest = load_manifest(u_run["artifacts"], verify=False)
    hidden = (manifest.batch_size, manifest.max_seq_len, manifest.hidden_size)
    allowed = {*manifest.lora.matrices, *manifest.top_matrices}
    messages = [decode(frame) for frame in u_run["frames"]]
    kinds = [type(message).__name__ for message in messages]
    assert kinds.count("Activations") == kinds.count("Gradients") == ROUNDS * STEPS, kinds
    for message in messages:
        tensors = getattr(message, "tensors", {})
        for name, tensor in tensors.items():
            assert "label" not in name and manifest.vocab_size not in tensor.shape, (name, tensor.shape)
            assert not (np.issubdtype(tensor.dtype, np.integer) and np.any(tensor == -100)), name
        if isinstance(message, Activations):  # only the lower cut's activations and the mask go up
            assert message.stage == "lower" and set(tensors) == {"activations", "attention_mask"}
            assert tensors["activations"].shape == hidden
            assert set(np.unique(tensors["attention_mask"])) <= {0, 1}
        elif isinstance(message, Gradients):  # the gradient at the upper cut, (B, T, H), and the loss
            assert message.stage == "upper" and set(tensors) == {"activation_grads"}
            assert tensors["activation_grads"].shape == hidden
        elif isinstance(message, AdapterUpdate):
            assert set(tensors) == allowed
        else:
            assert isinstance(message, Hello) or not tensors


def test_a_plain_client_is_refused_by_a_u_shaped_server_in_one_line(u_run) -> None:  # type: ignore[no-untyped-def]
    assert u_run["codes"][2] != 0
    errors = [line for line in u_run["stranger"].splitlines() if "manifest" in line]
    assert errors and "Traceback" not in u_run["stranger"], u_run["stranger"]


def test_a_trainer_refuses_artifacts_of_the_other_kind(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    plain, u_shaped = tiny_artifacts("llama", 1), tiny_artifacts("llama", 1, top_layers=1)
    settings = dict(steps_per_round=1, learning_rate=0.01, wire=Wire.FP32, batch_size=2, max_seq_len=16)
    head = Head(plain, verify=False)
    with pytest.raises(EdgesplitError, match="U-shaped split .* plain split export"):
        trainer_for(head, head.initial_adapters(), SessionSettings(**settings, exchange="u_shaped"))  # type: ignore[arg-type]
    head, top = Head(u_shaped, verify=False), Top(u_shaped, verify=False)
    with pytest.raises(EdgesplitError, match="plain split, these artifacts are a U-shaped export"):
        trainer_for(head, head.initial_adapters(), SessionSettings(**settings), top)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("top_layers", "message"), [("-1", "is negative"), ("3", "leaves no middle"), ("2", "leaves no middle")]
)
def test_top_layers_that_leave_no_middle_are_refused_before_loading(tmp_path: Path, top_layers, message) -> None:  # type: ignore[no-untyped-def]
    directory = tmp_path / "four-layers"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    (directory / "model.safetensors").write_bytes(b"not weights: a refusal after loading would fail differently")
    with pytest.raises(ExportError, match=message):
        out = str(tmp_path / "out")
        cli.main(["--out", out, "--model", str(directory), "--cut-layer", "2", "--top-layers", top_layers])


def test_sequence_buckets_with_a_top_are_refused_before_loading(tmp_path: Path) -> None:
    directory = tmp_path / "four-layers"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    (directory / "model.safetensors").write_bytes(b"not weights: a refusal after loading would fail differently")
    argv = ["--out", str(tmp_path / "out"), "--model", str(directory), "--cut-layer", "1", "--top-layers", "1"]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--max-seq-len", "16", "--seq-buckets", "8"])
    with pytest.raises(ExportError, match="--seq-buckets does not go with --top-layers"):
        ExportConfig(model=str(directory), cut_layer=1, top_layers=1, max_seq_len=16, seq_buckets=(8,))


def test_a_u_shaped_export_is_refused_by_several_tail_worker_ranks(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    from edgesplit.server.config import ServerConfig
    from edgesplit.server.scaleout import plan_workers

    u_shaped = tiny_artifacts("llama", 1, top_layers=1)
    with pytest.raises(EdgesplitError, match=r"U-shaped export .* \(leave --workers out\)"):
        plan_workers(ServerConfig(artifacts=u_shaped, workers=2, device="cpu"), {})
    assert plan_workers(ServerConfig(artifacts=tiny_artifacts("llama", 1), workers=2, device="cpu"), {}).spawn


def test_a_client_that_breaks_off_mid_step_resends_it_and_a_replay_is_refused(tiny_artifacts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The round engine's rules hold across a U-shaped step's two exchanges: a client that drops after the
    middle's output came down has trained nothing (its reconnection is welcomed at once, to step 0, and sends
    it again), and a step taken once is refused when sent again."""
    from websockets.asyncio.client import connect

    from edgesplit.client.protocol import PROTOCOL_VERSION, Error, Role, Session
    from edgesplit.server.server import Server, ServerConfig

    artifacts = tiny_artifacts("llama", 1, top_layers=1)
    manifest = load_manifest(artifacts, verify=False)
    shape = manifest.activations_shape
    lower = {
        "activations": np.full(shape, 0.1, np.float32),
        "attention_mask": np.ones(shape[:2], np.int64),
    }

    async def join(url: str) -> tuple[object, Session, object]:
        websocket = await connect(url, max_size=None, compression=None)
        session = Session(Role.CLIENT)
        hello = Hello("raw", PROTOCOL_VERSION, manifest.manifest_hash, None, 8, cut_layer=manifest.cut_layer)
        await websocket.send(session.send(hello))
        welcome = session.receive(await asyncio.wait_for(websocket.recv(), 30))
        return websocket, session, welcome

    async def scenario() -> None:
        config = ServerConfig(
            artifacts=artifacts, port=0, rounds=1, min_clients=1, steps_per_round=2, checkpoint_dir=tmp_path / "ck"
        )
        server = Server(config)
        ready = asyncio.Event()
        serving = asyncio.create_task(server.serve(ready))
        await ready.wait()
        url = f"ws://127.0.0.1:{server.port}"
        try:
            websocket, session, _ = await join(url)
            await websocket.send(session.send(Activations(0, 0, dict(lower), "lower")))  # type: ignore[attr-defined]
            upper = session.receive(await websocket.recv())  # type: ignore[attr-defined]
            assert isinstance(upper, Activations) and upper.stage == "upper"
            await websocket.close()  # type: ignore[attr-defined]  # gone before its upper gradient

            websocket, session, welcome = await join(url)  # not held back by a step that will never finish
            assert welcome.settings.resume_step == 0  # type: ignore[attr-defined]  # nothing was taken
            await websocket.send(session.send(Activations(0, 0, dict(lower), "lower")))  # type: ignore[attr-defined]
            upper = session.receive(await websocket.recv())  # type: ignore[attr-defined]
            grads = {"activation_grads": np.full(shape, 1e-3, np.float32)}
            await websocket.send(session.send(Gradients(0, 0, 4.5, 0.1, grads, "upper")))  # type: ignore[attr-defined]
            down = session.receive(await websocket.recv())  # type: ignore[attr-defined]
            assert isinstance(down, Gradients) and down.stage == "lower" and down.loss == 4.5
            assert down.tensors["activation_grads"].shape == shape
            assert np.abs(down.tensors["activation_grads"]).max() > 0

            replay = Activations(0, 0, dict(lower), "lower")  # the same step again
            await websocket.send(session.send(replay))  # type: ignore[attr-defined]
            refusal = session.receive(await websocket.recv())  # type: ignore[attr-defined]
            assert isinstance(refusal, Error) and "again" in refusal.message
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving

    asyncio.run(scenario())
