"""`edgesplit serve --workers 2`: two tail worker ranks (the test's process as rank 0 and a real process as
rank 1, started as serve starts it; gloo on the CPU, loopback) train four real clients to the checkpoint one
worker trains them to, given the same schedule; and a rank of a real `serve --workers 2` that dies ends the
run with a line saying so.

The schedule: four clients, --max-batch-clients 4 and a window far longer than a step, so that each step of
the four clients goes through the tail as one batch of four in both runs (they step in lockstep: none can
send its next step before its gradients come back). One worker takes Tail.train_batch's step on the batch;
two ranks each take two of the clients and all-reduce their gradients, the same sum in another order. The
tolerance is that of floating-point order: the two runs' adapters agree to 1e-5 (measured: 8e-7, where
training moved them by 0.1).
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from loopback import Processes, free_port, serve_command, write_task

from edgesplit.client.client import Client, ClientConfig
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.config import ServerConfig
from edgesplit.server.scaleout import WorkerPlan, plan_workers, worker_ranks, worker_warning
from edgesplit.server.server import Server
from edgesplit.server.tail import Tail

CLIENTS = ("a", "b", "c", "d")
ROUNDS, STEPS = 2, 2
SCHEDULE = ("--max-batch-clients", "4", "--batch-window-ms", "10000")


async def run_clients(url: str, artifacts: Path, data: Path) -> None:
    clients = [
        Client(ClientConfig(server=url, artifacts=artifacts, data=data / f"{n}.jsonl", client_id=n, quiet=True))
        for n in CLIENTS
    ]
    await asyncio.gather(*(client.run() for client in clients))


def train(server: Server, artifacts: Path, data: Path) -> None:
    """The four clients' run against `server`, in this process."""

    async def run() -> None:
        ready = asyncio.Event()
        serving = asyncio.create_task(server.serve(ready))
        await ready.wait()
        await run_clients(f"ws://127.0.0.1:{server.port}", artifacts, data)
        await serving

    asyncio.run(run())


def test_two_gloo_workers_train_four_clients_to_the_checkpoint_one_worker_trains_them_to(  # type: ignore[no-untyped-def]
    tiny_artifacts, tmp_path, monkeypatch
) -> None:
    artifacts = tiny_artifacts("llama", 1)
    for index, name in enumerate(CLIENTS):
        write_task(tmp_path / f"{name}.jsonl", seed=index, count=12)
    one, two = tmp_path / "one", tmp_path / "two"
    config = ServerConfig(
        artifacts=artifacts,
        port=0,
        rounds=ROUNDS,
        min_clients=len(CLIENTS),
        steps_per_round=STEPS,
        learning_rate=0.02,
        checkpoint_dir=one / "ckpt",
        max_batch_clients=4,
        batch_window_ms=10_000,
        device="cpu",
    )
    train(Server(config), artifacts, tmp_path)

    # This process is rank 0, as `serve --workers 2` is (one process start less than running serve itself:
    # test_a_rank_that_dies... runs the command); rank 1 is a real process, started as serve starts it.
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.setenv(key, "")  # recorded, so that what worker_ranks sets here is undone after the test
        monkeypatch.delenv(key)
    two_workers = dataclasses.replace(config, checkpoint_dir=two / "ckpt", workers=2)
    argv = ["--artifacts", str(artifacts), "--workers", "2", *SCHEDULE, "--device", "cpu", "--learning-rate", "0.02"]
    with worker_ranks(two_workers, WorkerPlan(0, 2, 0, spawn=True), argv) as ranks:
        server = Server(two_workers, ranks)
        train(server, artifacts, tmp_path)
    assert all(seconds > 0 for seconds in server.worker.stats.rank_busy_seconds)  # both ranks took shares

    expected, got = load_latest(one / "ckpt"), load_latest(two / "ckpt")
    assert expected is not None and got is not None and expected.round == got.round == ROUNDS
    initial = Tail(artifacts, seed=config.seed)  # where training started
    moved = differ = 0.0
    for name, value in expected.tail_lora.items():
        np.testing.assert_allclose(got.tail_lora[name], value, rtol=0, atol=1e-5, err_msg=name)
        moved = max(moved, float(np.abs(value - initial.lora_state()[name]).max()))
        differ = max(differ, float(np.abs(value - got.tail_lora[name]).max()))
    for name, value in expected.global_adapters.items():
        np.testing.assert_allclose(got.global_adapters[name], value, rtol=0, atol=1e-5, err_msg=name)
        differ = max(differ, float(np.abs(value - got.global_adapters[name]).max()))
    print(f"largest difference between the runs' adapters {differ:.2e}; the tail's largest move {moved:.2e}")
    assert moved > 1e-2  # the comparison is of adapters that trained, not of two untouched ones


def test_bad_worker_settings_are_refused_before_anything_loads(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from edgesplit.errors import EdgesplitError

    with pytest.raises(ValueError, match="--workers must be at least 1"):
        ServerConfig(artifacts=tmp_path, workers=0)
    with pytest.raises(ValueError, match="--framework fedllm trains on the devices only"):
        ServerConfig(artifacts=tmp_path, workers=2, framework="fedllm")
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    with pytest.raises(EdgesplitError, match="--framework kd has no server tail"):
        plan_workers(ServerConfig(artifacts=tmp_path, framework="kd"), torchrun)
    with pytest.raises(EdgesplitError, match="--workers 3 under torchrun, which started 2 ranks"):
        plan_workers(ServerConfig(artifacts=tmp_path, workers=3, device="cpu"), torchrun)
    with pytest.raises(EdgesplitError, match="need a GPU each; this machine shows"):
        import torch

        plan_workers(ServerConfig(artifacts=tmp_path, workers=max(2, torch.cuda.device_count() + 1), device="cuda"), {})
    with pytest.raises(EdgesplitError, match="each rank takes its own GPU"):
        plan_workers(ServerConfig(artifacts=tmp_path, workers=2, device="cuda:1"), {})
    plan = plan_workers(ServerConfig(artifacts=tmp_path, device="cpu"), torchrun)
    assert (plan.rank, plan.size, plan.local_rank, plan.spawn) == (1, 2, 1, False)
    assert "use --max-batch-clients 2 or more" in str(worker_warning(ServerConfig(artifacts=tmp_path), plan))
    assert worker_warning(ServerConfig(artifacts=tmp_path, max_batch_clients=2), plan) is None
    assert plan_workers(ServerConfig(artifacts=tmp_path, workers=2, device="cpu"), {}).spawn


def test_a_rank_that_dies_ends_the_run_with_a_line_saying_so(tiny_artifacts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import psutil

    artifacts = tiny_artifacts("llama", 1)
    with Processes() as run:
        extra = ["--workers", "2", "--device", "cpu", "--worker-timeout", "4"]  # rank 0 pings every second while idle
        server = run.start("server", serve_command(artifacts, free_port(), tmp_path, rounds=1, extra=extra))
        server.wait_for(r"listening on", timeout=300)  # two processes loading torch: slow on a loaded machine
        server.wait_for(r"\[worker 1\] tail replica on", timeout=300)
        (rank_1,) = psutil.Process(server.process.pid).children()
        rank_1.kill()
        assert server.wait(30) == 1, server.output  # not a hang: within a ping or two
        assert "a tail worker rank stopped answering" in server.output
        assert "Traceback" not in server.output


def test_the_metrics_endpoint_shows_each_ranks_busy_seconds() -> None:
    pytest.importorskip("prometheus_client")
    from edgesplit.server.metrics import RoundProgress, StepTimes, _Collector
    from edgesplit.server.workers import WorkerStats

    stats = WorkerStats(rank_busy_seconds=[1.5, 2.25])
    families = {f.name: f for f in _Collector(stats, lambda: 0, RoundProgress, StepTimes()).collect()}
    samples = {s.labels.get("rank"): s.value for s in families["edgesplit_worker_busy_seconds"].samples}
    assert samples == {"0": 1.5, "1": 2.25}
    one_worker = _Collector(WorkerStats(), lambda: 0, RoundProgress, StepTimes()).collect()
    assert "edgesplit_worker_busy_seconds" not in {family.name for family in one_worker}


def test_a_batch_is_split_over_the_ranks_in_contiguous_shares_as_even_as_can_be() -> None:
    from edgesplit.server.distributed import shares, target_tokens

    steps = [{"labels": np.array([[n]])} for n in range(5)]
    assert [[int(s["labels"][0, 0]) for s in share] for share in shares(steps, 2)] == [[0, 1, 2], [3, 4]]
    assert [len(share) for share in shares(steps[:1], 3)] == [1, 0, 0]  # a lone step: the other ranks idle
    assert target_tokens(np.array([[5, 6, -100, 7], [-100, -100, 1, 2]])) == 4  # the first position is no target
