"""A tail worker that runs several clients' steps as one batch: one forward, one backward, one optimiser step.

`edgesplit serve --max-batch-clients K --batch-window-ms W`. The worker takes the oldest queued step; steps
of other clients already queued behind it with the same batch key join it, and while the batch has fewer than
K steps it waits until W ms after the oldest step arrived for more. A step that waited longer than W behind
other work (the usual case under load) goes at once with whatever has queued since. Other work (the
aggregation, the evaluation, the checkpoint) is a barrier: no step passes it, and none joins a batch from
behind it, so the round's order is the one submitted, as with ThreadTailWorker.

What one batched step is (the strategy's `train_batch`; split: Tail.train_batch): the clients' batches
concatenated along B, the tail's loss the token-weighted mean over all their target tokens (what the tail
would see had one client sent them all), one AdamW step on it; each client gets back its own loss and the
gradient of its own loss with respect to its activations, as its step alone against the same tail would
have given it. A batch that fails (a loss or gradient not finite) applies nothing, and its steps run again
one at a time, so that only the step at fault fails.

The batch key (`StepJob.batch_key`) keeps apart steps that cannot share a pass: the shell puts the
exchange's stage, the activations' (T, H) and the client's cut layer in it (in a mixed-cut federation each
cut runs its own layers of the tail, so only steps of one cut share a pass).

Its queue wait and compute time are measured per step: the compute is the batch's, shared by its steps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from edgesplit.server.strategies.base import StepOutcome
from edgesplit.server.workers import StepFunction, StepJob, ThreadTailWorker, WorkerStats, WorkResult

T = TypeVar("T")
BatchFunction = Callable[[Sequence[Mapping[str, np.ndarray]], int | None], list[StepOutcome]]


@dataclass
class _Item:
    """One piece of queued work: a step (`job`) or anything else (`work`), and where its result goes."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    submitted: float
    job: StepJob | None = None
    work: Callable[[], Any] | None = None
    started: float = field(default=0.0)

    def resolve(self, result: WorkResult[Any]) -> None:
        def set_result() -> None:
            if not self.future.done():  # the awaiting task may have been cancelled meanwhile
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(set_result)


class BatchingTailWorker:
    """One worker thread, like ThreadTailWorker, that batches steps of the same key (module docstring)."""

    def __init__(
        self, step_function: StepFunction, batch_function: BatchFunction, max_batch_clients: int, window_s: float
    ) -> None:
        if max_batch_clients < 1 or window_s < 0:
            raise ValueError("a batch holds at least one step, and its window is not negative")
        self.step_function = step_function
        self.batch_function = batch_function
        self.max_batch_clients = max_batch_clients
        self.window_s = window_s
        self.stats = WorkerStats()
        self._queue: deque[_Item] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="tail", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ the interface

    def submit_step(self, job: StepJob) -> asyncio.Future[WorkResult[StepOutcome]]:
        return self._put(job=job)

    def submit(self, work: Callable[[], T]) -> asyncio.Future[WorkResult[T]]:
        return self._put(work=work)

    def close(self) -> None:
        """Finish what is queued, then stop."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()

    def queue_depth(self) -> int:
        return len(self._queue)

    def _put(self, job: StepJob | None = None, work: Callable[[], Any] | None = None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        item = _Item(loop, loop.create_future(), time.perf_counter(), job, work)
        with self._condition:
            if self._closed:
                raise RuntimeError("the tail worker is closed")
            self._queue.append(item)
            self._condition.notify()
        return item.future

    # ------------------------------------------------------------------------------------------ the thread

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closed:
                    self._condition.wait()
                if not self._queue:
                    return  # closed, and nothing left
                first = self._queue.popleft()
                batch = [first] if first.job is None else self._gather(first)
            started = time.perf_counter()
            if first.job is None:
                self._run_work(first, started)
            else:
                self._run_steps(batch, started)
            self.stats.busy_seconds += time.perf_counter() - started

    def _gather(self, first: _Item) -> list[_Item]:
        """The steps that go with `first` (the lock held): same key, none from behind a barrier, at most
        max_batch_clients, waiting out the window while there is room."""
        assert first.job is not None
        key = first.job.batch_key
        batch = [first]
        deadline = first.submitted + self.window_s
        while len(batch) < self.max_batch_clients:
            for item in list(self._queue):
                if item.job is None or len(batch) >= self.max_batch_clients:
                    break  # a barrier, or full
                if item.job.batch_key == key:
                    self._queue.remove(item)
                    batch.append(item)
            barrier = any(item.job is None for item in self._queue)
            remaining = deadline - time.perf_counter()
            if len(batch) >= self.max_batch_clients or barrier or remaining <= 0 or self._closed:
                break
            self._condition.wait(remaining)
        return batch

    def _run_work(self, item: _Item, started: float) -> None:
        assert item.work is not None
        queued = started - item.submitted
        try:
            value = item.work()
        except Exception as error:  # returned to the submitter, which knows what it means
            item.resolve(WorkResult(None, error, False, queued, time.perf_counter() - started))
            return
        item.resolve(WorkResult(value, None, False, queued, time.perf_counter() - started))

    def _run_steps(self, batch: list[_Item], started: float) -> None:
        wanted: list[_Item] = []
        for item in batch:  # a client gone while its step waited gets none, and the tail does not learn from it
            assert item.job is not None
            if item.job.still_wanted():
                wanted.append(item)
            else:
                item.resolve(WorkResult(None, None, True, started - item.submitted, 0.0))
        if len(wanted) > 1:
            try:
                steps = [item.job.tensors for item in wanted if item.job is not None]
                outcomes = self.batch_function(steps, batch[0].job.cut_layer if batch[0].job else None)
            except Exception:  # nothing was applied: run them one at a time, so that only the one at fault fails
                pass
            else:
                compute = time.perf_counter() - started
                self.stats.record_batch(len(wanted))  # before any submitter hears of it
                for item, outcome in zip(wanted, outcomes, strict=True):
                    item.resolve(WorkResult(outcome, None, False, started - item.submitted, compute))
                return
        for item in wanted:
            assert item.job is not None
            job = item.job
            item.started = time.perf_counter()
            try:
                outcome = self.step_function(job.tensors, job.cut_layer)
            except Exception as error:
                result: WorkResult[StepOutcome] = WorkResult(
                    None, error, False, item.started - item.submitted, time.perf_counter() - item.started
                )
            else:
                result = WorkResult(
                    outcome, None, False, item.started - item.submitted, time.perf_counter() - item.started
                )
                self.stats.record_batch(1)  # before its submitter hears of it
            item.resolve(result)


def build_worker(strategy: Any, max_batch_clients: int, window_s: float) -> ThreadTailWorker | BatchingTailWorker:
    """The server's worker: today's one step at a time for --max-batch-clients 1 (or a strategy that cannot
    batch, such as those whose steps run on the device), else the batching one."""
    batch_function = getattr(strategy, "train_batch", None)
    if max_batch_clients == 1 or batch_function is None:
        return ThreadTailWorker(strategy.train_step)
    return BatchingTailWorker(strategy.train_step, batch_function, max_batch_clients, window_s)
