"""The tail worker on its own: order, skipping a gone client's step, timings, errors as results."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import numpy as np
import pytest

from edgesplit.server.strategies import StepOutcome
from edgesplit.server.workers import StepJob, ThreadTailWorker, WorkResult


def recording_step(seen: list[int], seconds: float = 0.0):  # type: ignore[no-untyped-def]
    def step(tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome:
        time.sleep(seconds)
        seen.append(int(tensors["activations"][0]))
        return StepOutcome(float(tensors["activations"][0]), tensors["activations"] * 2)

    return step


def job(client_id: str, step: int, wanted: bool = True) -> StepJob:
    return StepJob(client_id, 0, step, {"activations": np.array([step], dtype=np.float32)}, lambda: wanted)


def test_steps_run_in_the_order_submitted_and_return_their_outcomes() -> None:
    seen: list[int] = []

    async def scenario() -> list[WorkResult[StepOutcome]]:
        worker = ThreadTailWorker(recording_step(seen, 0.01))
        try:
            futures = [worker.submit_step(job(f"c{i % 2}", i)) for i in range(6)]
            return list(await asyncio.gather(*futures))
        finally:
            worker.close()

    results = asyncio.run(scenario())
    assert seen == [0, 1, 2, 3, 4, 5]
    assert [r.unwrap().loss for r in results] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    np.testing.assert_array_equal(results[3].unwrap().activation_grads, [6.0])


def test_a_step_whose_client_is_gone_when_its_turn_comes_is_skipped() -> None:
    seen: list[int] = []
    gone = threading.Event()

    async def scenario() -> tuple[WorkResult[StepOutcome], WorkResult[StepOutcome]]:
        worker = ThreadTailWorker(recording_step(seen, 0.2))
        try:
            first = worker.submit_step(job("a", 1))
            # Queued while the first runs; its client leaves before its turn.
            second = worker.submit_step(StepJob("b", 0, 2, {"activations": np.array([2.0])}, lambda: not gone.is_set()))
            gone.set()
            return await first, await second
        finally:
            worker.close()

    first, second = asyncio.run(scenario())
    assert seen == [1]
    assert not first.skipped and second.skipped
    assert second.value is None and second.error is None and second.compute_seconds == 0.0
    with pytest.raises(RuntimeError, match="skipped"):
        second.unwrap()


def test_queue_wait_and_compute_time_are_measured_apart() -> None:
    async def scenario() -> list[WorkResult[StepOutcome]]:
        worker = ThreadTailWorker(recording_step([], 0.15))
        try:
            return list(await asyncio.gather(worker.submit_step(job("a", 0)), worker.submit_step(job("b", 1))))
        finally:
            worker.close()

    first, second = asyncio.run(scenario())
    assert first.compute_seconds >= 0.14 and second.compute_seconds >= 0.14
    assert first.queue_seconds < 0.1  # the worker was idle
    assert second.queue_seconds >= 0.14  # it waited for the first step
    assert second.total_seconds == pytest.approx(second.queue_seconds + second.compute_seconds)


def test_errors_come_back_as_results_and_the_worker_carries_on() -> None:
    def failing(tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome:
        raise ValueError(f"bad step {int(tensors['activations'][0])}")

    async def scenario() -> tuple[WorkResult[StepOutcome], WorkResult[float | None]]:
        worker = ThreadTailWorker(failing)
        try:
            failed = await worker.submit_step(job("a", 7))
            evaluated = await worker.submit(lambda: None)  # work may legitimately return None
            return failed, evaluated
        finally:
            worker.close()

    failed, evaluated = asyncio.run(scenario())
    assert isinstance(failed.error, ValueError) and "bad step 7" in str(failed.error)
    assert not failed.skipped
    with pytest.raises(ValueError, match="bad step 7"):
        failed.unwrap()
    assert evaluated.error is None and not evaluated.skipped and evaluated.unwrap() is None


def test_results_and_jobs_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="count from 0"):
        job("a", -1)
    with pytest.raises(ValueError, match="negative"):
        WorkResult(1.0, None, False, -0.5, 0.0)
    with pytest.raises(ValueError, match="skipped"):
        WorkResult(1.0, None, True, 0.0, 0.0)


def test_the_server_records_queue_and_compute_time_in_its_step_metrics(tiny_artifacts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through a real server and client: each step's record splits the time the client sees into the wait
    for the worker and the tail's own compute."""
    import json

    from loopback import write_task

    from edgesplit.client.client import Client, ClientConfig
    from edgesplit.server.server import Server, ServerConfig

    artifacts = tiny_artifacts("llama", 1)
    write_task(tmp_path / "data.jsonl", seed=0, count=4)
    metrics = tmp_path / "metrics.jsonl"

    async def scenario() -> None:
        config = ServerConfig(
            artifacts=artifacts, port=0, rounds=1, min_clients=1, steps_per_round=2, metrics_out=metrics
        )
        server = Server(config)
        ready = asyncio.Event()
        serving = asyncio.create_task(server.serve(ready))
        await ready.wait()
        client = Client(
            ClientConfig(
                server=f"ws://127.0.0.1:{server.port}",
                artifacts=artifacts,
                data=tmp_path / "data.jsonl",
                client_id="only",
                quiet=True,
            )
        )
        await client.run()
        await serving

    asyncio.run(scenario())
    steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if r["event"] == "step"]
    assert len(steps) == 2
    for record in steps:
        assert record["compute_seconds"] > 0 and record["queue_seconds"] >= 0
        assert record["server_seconds"] >= record["compute_seconds"]
