"""A real server and two real client processes on loopback, tiny model, two rounds."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from loopback import free_port, serve_command, write_task

from edgesplit.client.metrics import read_jsonl
from edgesplit.server.aggregate import fedavg
from edgesplit.server.checkpoint import load_latest

ROUNDS, STEPS = 2, 4


def torch_blocker(directory: Path) -> Path:
    """A PYTHONPATH entry under which importing torch or transformers fails loudly."""
    for name in ("torch", "transformers", "peft"):
        package = directory / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"raise ImportError('the edge client imported {name}')\n")
    return directory


@pytest.fixture(scope="module")
def run(tiny_artifacts, tmp_path_factory):  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1)
    work = tmp_path_factory.mktemp("run")
    write_task(work / "a.jsonl", seed=1, count=24)
    write_task(work / "b.jsonl", seed=2, count=40)
    write_task(work / "eval.jsonl", seed=3, count=8)
    port = free_port()
    edgesplit = [sys.executable, "-m", "edgesplit.cli"]
    server = subprocess.Popen(
        serve_command(
            artifacts, port, work, rounds=ROUNDS, steps=STEPS, extra=["--eval-data", str(work / "eval.jsonl")]
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The client processes run with torch made unimportable: the edge client must not need it.
    env = dict(os.environ, PYTHONPATH=f"{torch_blocker(work / 'blocker')}{os.pathsep}{Path.cwd()}")
    clients = {
        name: subprocess.Popen(
            [
                *edgesplit,
                "client",
                "--server",
                f"ws://127.0.0.1:{port}",
                "--artifacts",
                str(artifacts),
                "--data",
                str(work / f"{name}.jsonl"),
                "--client-id",
                name,
                "--metrics-out",
                str(work / f"{name}-metrics.jsonl"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for name in ("a", "b")
    }
    try:
        outputs = {name: process.communicate(timeout=240)[0] for name, process in clients.items()}
        codes = {name: process.returncode for name, process in clients.items()}
        server_output = server.communicate(timeout=60)[0]
    finally:  # a failed run must not leave a server or client behind
        for process in [server, *clients.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()
    return {
        "work": work,
        "outputs": outputs,
        "codes": codes,
        "server_output": server_output,
        "server_code": server.returncode,
    }


def test_both_clients_and_the_server_finish(run) -> None:  # type: ignore[no-untyped-def]
    for name, code in run["codes"].items():
        assert code == 0, f"client {name} failed:\n{run['outputs'][name]}"
    assert run["server_code"] == 0, run["server_output"]
    assert f"round {ROUNDS}/{ROUNDS} closed with 2 clients" in run["server_output"]


def test_the_client_never_imports_torch(run) -> None:  # type: ignore[no-untyped-def]
    # The clients ran with a PYTHONPATH where `import torch` raises; they finished, so nothing imported it.
    for output in run["outputs"].values():
        assert "imported torch" not in output and "trained 8 steps in 2 rounds" in output


def test_training_loss_goes_down(run) -> None:  # type: ignore[no-untyped-def]
    steps = [r for r in read_jsonl(run["work"] / "server.jsonl") if r["event"] == "step"]
    assert len(steps) == 2 * ROUNDS * STEPS
    first = np.mean([r["loss"] for r in steps[:4]])
    last = np.mean([r["loss"] for r in steps[-4:]])
    assert last < first
    evals = [r for r in read_jsonl(run["work"] / "server.jsonl") if r["event"] in ("eval", "round")]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_checkpoint_holds_the_sample_weighted_average(run) -> None:  # type: ignore[no-untyped-def]
    checkpoint = load_latest(run["work"] / "ckpt")
    assert checkpoint is not None and checkpoint.round == ROUNDS
    assert sorted(checkpoint.updates) == ["a", "b"]
    samples = checkpoint.extra["num_samples"]
    assert samples == {"a": 24, "b": 40}
    expected = fedavg([(checkpoint.updates[c], samples[c]) for c in ("a", "b")])
    for name, value in expected.items():
        np.testing.assert_allclose(checkpoint.global_adapters[name], value, rtol=1e-6, atol=1e-7)
    # The two clients trained on different data: their updates differ, so the average is not trivial.
    assert any(not np.allclose(checkpoint.updates["a"][n], checkpoint.updates["b"][n]) for n in expected)


def test_metrics_exist_and_bytes_add_up(run) -> None:  # type: ignore[no-untyped-def]
    work = run["work"]
    server_records = read_jsonl(work / "server.jsonl")
    finished = next(r for r in server_records if r["event"] == "finished")
    summaries = {}
    for name in ("a", "b"):
        records = read_jsonl(work / f"{name}-metrics.jsonl")
        steps = [r for r in records if r["event"] == "step"]
        assert len(steps) == ROUNDS * STEPS
        assert all(r["loss"] > 0 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in steps)
        assert {"head_forward", "grad_graph", "optimizer", "network", "server_queue", "server_compute"} <= set(
            steps[0]["seconds"]
        )
        # The round's close is the round's, with the server's evaluation in it, not a lump in the next step.
        rounds = [r for r in records if r["event"] == "round"]
        assert all(r["close_seconds"] >= r["server_eval_seconds"] > 0 for r in rounds)
        assert all("round_close" not in r["seconds"] for r in steps)
        summaries[name] = next(r for r in records if r["event"] == "summary")
        assert summaries[name]["energy_method"] in ("measured", "estimated")
        assert summaries[name]["peak_rss_mb"] > 10
    # Every byte a client says it sent, the server says it received, and the other way round.
    assert sum(s["bytes_up"] for s in summaries.values()) == sum(finished["bytes_received"].values())
    assert sum(s["bytes_down"] for s in summaries.values()) == sum(finished["bytes_sent"].values())


def test_client_with_wrong_artifacts_is_refused(tiny_artifacts, tmp_path) -> None:
    """A client whose artifacts differ from the server's is told so at the handshake, with the reason."""
    script = textwrap.dedent("""
        import asyncio, sys
        from pathlib import Path
        from edgesplit.server.server import Server, ServerConfig
        from edgesplit.client.client import Client, ClientConfig
        from edgesplit.errors import EdgesplitError

        async def main():
            server = Server(ServerConfig(artifacts=Path(sys.argv[1]), port=0, rounds=1, min_clients=1,
                                         steps_per_round=1))
            ready = asyncio.Event()
            task = asyncio.create_task(server.serve(ready))
            await ready.wait()
            client = Client(ClientConfig(server=f"ws://127.0.0.1:{server.port}", artifacts=Path(sys.argv[2]),
                                         data=Path(sys.argv[3]), client_id="stranger", quiet=True))
            try:
                await client.run()
            except EdgesplitError as error:
                print("REFUSED:", error)
            server.finished.set()
            await task

        asyncio.run(main())
    """)
    write_task(tmp_path / "d.jsonl", seed=0, count=4)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tiny_artifacts("llama", 1)),
            str(tiny_artifacts("llama", 2)),
            str(tmp_path / "d.jsonl"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "REFUSED:" in result.stdout, result.stdout + result.stderr
    assert "manifest_mismatch" in result.stdout and "copy the server's artifact directory" in result.stdout
