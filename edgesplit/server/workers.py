"""The tail worker: where the server's heavy work runs, off the event loop, one piece at a time.

The asyncio shell submits a client's training step (or any other work on the shared model: an evaluation,
the aggregation, a state snapshot for the checkpoint) and awaits its result later; meanwhile the event loop
answers pings and other clients. A step whose client is gone by the time its turn comes is skipped, not run:
the tail must not learn from a batch whose gradients nobody will receive.

    TailWorker          the interface the server uses
    ThreadTailWorker    one worker thread (a ThreadPoolExecutor of one): calls to the model are serialised by
                        construction, which is all the shared PyTorch tail needs

    BatchingTailWorker  (batching.py) several clients' steps in one pass of the tail: --max-batch-clients > 1

A pool of processes would implement the same interface; the round engine (rounds.py) and the shell do not
change. Each worker keeps `stats` (WorkerStats) and says its `queue_depth()`, for the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from edgesplit.server.strategies.base import StepOutcome

T = TypeVar("T")
# A strategy's train_step: the step's tensors and the client's cut layer (None: the export's one cut).
StepFunction = Callable[[Mapping[str, np.ndarray], int | None], StepOutcome]


@dataclass(frozen=True)
class StepJob:
    """One client's training step: its tensors (activations (B, T, H), attention_mask and labels (B, T)) and
    a way to ask, when its turn comes, whether the client is still there to receive the gradients."""

    client_id: str
    round: int
    step: int
    tensors: Mapping[str, np.ndarray]
    still_wanted: Callable[[], bool]
    cut_layer: int | None = None  # the client's cut in a mixed-cut federation; None: the export's one cut
    # Only steps of one key may share a batch (batching.py): the stage, the activations' (T, H), and a
    # client's cut layer where clients may cut at different layers.
    batch_key: tuple[object, ...] = ()

    def __post_init__(self) -> None:
        if self.round < 0 or self.step < 0:
            raise ValueError(f"round and step count from 0, got round {self.round} step {self.step}")


@dataclass(frozen=True)
class WorkResult(Generic[T]):
    """What came of a piece of work. An error is returned, not raised, so that the caller decides what it
    means (a failed step ends one connection; a failed aggregation ends the run). `skipped`: the work was
    not run because it was no longer wanted. The queue wait and the compute time are measured apart."""

    value: T | None
    error: BaseException | None
    skipped: bool
    queue_seconds: float
    compute_seconds: float

    def __post_init__(self) -> None:
        if self.queue_seconds < 0 or self.compute_seconds < 0:
            raise ValueError("queue and compute times cannot be negative")
        if self.skipped and (self.value is not None or self.error is not None):
            raise ValueError("a skipped piece of work has neither a value nor an error")

    @property
    def total_seconds(self) -> float:
        return self.queue_seconds + self.compute_seconds

    def unwrap(self) -> T:
        """The value; the work's own exception if it raised one."""
        if self.error is not None:
            raise self.error
        if self.skipped:
            raise RuntimeError("this work was skipped and has no value")
        return self.value  # type: ignore[return-value]  # None only where T admits it


@dataclass
class WorkerStats:
    """What a worker has done, for the metrics endpoint: steps run (skipped ones not counted), the passes of
    the tail they took (fewer than steps when batched), and the seconds the worker was busy. Written by the
    worker thread only; read anywhere (a slightly stale read is fine for metrics)."""

    steps: int = 0
    batches: int = 0
    busy_seconds: float = 0.0
    # With tail worker ranks (distributed.py): the seconds each rank spent on its shares of the steps.
    rank_busy_seconds: list[float] = field(default_factory=list)

    def record_batch(self, steps: int) -> None:
        self.steps += steps
        self.batches += 1


class TailWorker(Protocol):
    stats: WorkerStats

    def submit_step(self, job: StepJob) -> asyncio.Future[WorkResult[StepOutcome]]:
        """Queue one client's step; the future resolves once it has run, or been skipped."""
        ...

    def submit(self, work: Callable[[], T]) -> asyncio.Future[WorkResult[T]]:
        """Queue any other work on the model (evaluation, aggregation, state snapshot, checkpoint write)."""
        ...

    def close(self) -> None:
        """Finish what is queued, then stop."""
        ...

    def queue_depth(self) -> int:
        """Pieces of work submitted and not yet started."""
        ...


class ThreadTailWorker:
    """Today's worker: a single thread runs everything submitted, in the order submitted."""

    def __init__(self, step_function: StepFunction) -> None:
        self.step_function = step_function
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")
        self.stats = WorkerStats()
        # Each counter written by one thread only (the event loop; the worker): their difference is the queue.
        self._submitted = 0
        self._started = 0

    def submit_step(self, job: StepJob) -> asyncio.Future[WorkResult[StepOutcome]]:
        def step() -> StepOutcome:
            outcome = self.step_function(job.tensors, job.cut_layer)
            self.stats.record_batch(1)
            return outcome

        return self._run(step, job.still_wanted)

    def submit(self, work: Callable[[], T]) -> asyncio.Future[WorkResult[T]]:
        return self._run(work, None)

    def _run(self, work: Callable[[], T], still_wanted: Callable[[], bool] | None) -> asyncio.Future[WorkResult[T]]:
        submitted = time.perf_counter()
        self._submitted += 1

        def timed() -> WorkResult[T]:
            started = time.perf_counter()
            self._started += 1
            try:
                # On the worker thread: still_wanted must only read flags that the event loop sets.
                if still_wanted is not None and not still_wanted():
                    return WorkResult(None, None, True, started - submitted, 0.0)
                try:
                    value = work()
                except Exception as error:  # returned to the submitter, which knows what it means
                    return WorkResult(None, error, False, started - submitted, time.perf_counter() - started)
                return WorkResult(value, None, False, started - submitted, time.perf_counter() - started)
            finally:
                self.stats.busy_seconds += time.perf_counter() - started

        return asyncio.get_running_loop().run_in_executor(self.executor, timed)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def queue_depth(self) -> int:
        return max(self._submitted - self._started, 0)
