"""Clients' steps batched through the tail: what one batched step computes (against steps alone), how the
batching worker groups steps (window, cap, key, barriers, a failed batch), and a real server batching."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from edgesplit.errors import TrainingError
from edgesplit.server.batching import BatchingTailWorker
from edgesplit.server.strategies import StepOutcome
from edgesplit.server.tail import OptimizerSettings, Tail
from edgesplit.server.workers import StepJob, WorkResult

# ------------------------------------------------------------------------------------------ the batched step


def client_batch(tail: Tail, seed: int, masked: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch_size, seq, hidden = tail.manifest.activations_shape
    activations = rng.normal(0, 1, (batch_size, seq, hidden)).astype(np.float32)
    mask = np.ones((batch_size, seq), dtype=np.int64)
    labels = rng.integers(0, tail.manifest.vocab_size, (batch_size, seq)).astype(np.int64)
    labels[:, : 1 + masked] = -100  # clients with different numbers of target tokens
    return activations, mask, labels


def test_a_batched_step_is_each_clients_own_step_and_one_step_on_their_joint_loss(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1)
    batched = Tail(artifacts, OptimizerSettings(learning_rate=0.01), seed=0)
    reference = Tail(artifacts, OptimizerSettings(learning_rate=0.01), seed=0)
    initial = reference.state_dict()  # each step alone starts from the tail the batch started from
    steps = [client_batch(batched, seed, masked) for seed, masked in ((1, 0), (2, 9), (3, 4))]
    results = batched.train_batch(steps)
    for (activations, mask, labels), (loss, grads) in zip(steps, results, strict=True):
        reference.load_state_dict(initial)
        alone_loss, alone_grads = reference.train_step(activations, mask, labels)
        assert loss == pytest.approx(alone_loss, rel=1e-5)
        assert grads is not None and alone_grads is not None and grads.shape == activations.shape
        np.testing.assert_allclose(grads, alone_grads, rtol=1e-4, atol=1e-7)
    # The tail's step is the one its loss over all the clients' tokens gives: the concatenated batch's.
    reference.load_state_dict(initial)
    reference.train_step(*(np.concatenate(parts) for parts in zip(*steps, strict=True)))
    for name, value in batched.lora_state().items():
        np.testing.assert_allclose(value, reference.lora_state()[name], rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(value, initial["lora"][name]) for name, value in batched.lora_state().items())
    with pytest.raises(TrainingError, match="no target token"):
        empty = client_batch(batched, 4)
        batched.train_batch([steps[0], (empty[0], empty[1], np.full_like(empty[2], -100))])


# ------------------------------------------------------------------------------------------ the worker


class Recorder:
    """A fake tail: each step's loss is its activations' first value; records the passes it was asked for."""

    def __init__(self, seconds: float = 0.0, failing: float | None = None) -> None:
        self.passes: list[list[float]] = []
        self.seconds = seconds
        self.failing = failing

    def step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome:
        return self.batch([tensors], cut_layer)[0]

    def batch(self, steps: Sequence[Mapping[str, np.ndarray]], cut_layer: int | None = None) -> list[StepOutcome]:
        values = [float(t["activations"][0]) for t in steps]
        time.sleep(self.seconds)
        if self.failing in values:
            raise TrainingError(f"step {self.failing} is not finite")
        self.passes.append(values)
        return [StepOutcome(v, np.array([v * 2])) for v in values]


def job(value: float, key: tuple[object, ...] = ("split",), wanted: bool = True) -> StepJob:
    return StepJob(f"c{value:g}", 0, 0, {"activations": np.array([value])}, lambda: wanted, batch_key=key)


def run_worker(recorder: Recorder, submit, max_clients: int = 4, window_s: float = 0.2) -> list[WorkResult]:  # type: ignore[no-untyped-def]
    async def scenario() -> list[WorkResult]:  # type: ignore[type-arg]
        worker = BatchingTailWorker(recorder.step, recorder.batch, max_clients, window_s)
        try:
            return list(await asyncio.gather(*submit(worker)))
        finally:
            worker.close()

    return asyncio.run(scenario())


def test_steps_within_the_window_go_as_one_batch_up_to_the_cap() -> None:
    recorder = Recorder()
    results = run_worker(recorder, lambda w: [w.submit_step(job(v)) for v in (1, 2, 3, 4, 5)], max_clients=3)
    assert recorder.passes == [[1, 2, 3], [4, 5]]
    assert [r.unwrap().loss for r in results] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(results[4].unwrap().activation_grads, [10.0])
    assert results[0].compute_seconds == results[1].compute_seconds  # the batch's, shared


def test_steps_of_another_key_and_steps_behind_other_work_do_not_join() -> None:
    recorder = Recorder()
    order: list[str] = []

    def submit(worker: BatchingTailWorker) -> list[asyncio.Future]:  # type: ignore[type-arg]
        return [
            worker.submit_step(job(1)),
            worker.submit_step(job(2, key=("split", 3))),  # another cut: its own pass
            worker.submit(lambda: order.append(f"aggregate after {len(recorder.passes)} passes")),
            worker.submit_step(job(3)),  # behind the aggregation: not pulled in front of it
        ]

    run_worker(recorder, submit)
    assert recorder.passes == [[1], [2], [3]] and order == ["aggregate after 2 passes"]


def test_a_gone_clients_step_is_skipped_and_a_failed_batch_fails_only_its_bad_step() -> None:
    recorder = Recorder(failing=2)
    submit = lambda w: [w.submit_step(job(1)), w.submit_step(job(2)), w.submit_step(job(3, wanted=False))]  # noqa: E731
    good, bad, gone = run_worker(recorder, submit)
    assert gone.skipped and good.unwrap().loss == 1.0
    assert isinstance(bad.error, TrainingError) and "step 2" in str(bad.error)
    assert recorder.passes == [[1]]  # the batch [1, 2] applied nothing; then each alone: 1 ran, 2 failed


def test_a_lone_step_waits_no_longer_than_the_window_and_queueing_is_not_compute() -> None:
    recorder = Recorder(seconds=0.05)
    started = time.perf_counter()
    (alone,) = run_worker(recorder, lambda w: [w.submit_step(job(1))], window_s=0.1)
    assert 0.1 <= time.perf_counter() - started < 1.0
    assert alone.queue_seconds >= 0.09 and 0.04 <= alone.compute_seconds < 0.5
