"""Prometheus metrics of a running server: `edgesplit serve --metrics-port PORT` serves them on
http://HOST:PORT/metrics (HOST is --host). prometheus-client is an optional extra: `pip install 'edgesplit[metrics]'`.

    edgesplit_steps_total                  clients' training steps the tail took (rate: steps/s)
    edgesplit_tail_passes_total            passes of the tail they took: fewer than the steps when batched
    edgesplit_tail_busy_seconds_total      seconds the tail worker was busy (rate: its utilisation, 0 to 1)
    edgesplit_step_queue_seconds_total     the steps' waits for the tail, summed (over steps_total: the mean)
    edgesplit_step_compute_seconds_total   the steps' compute, summed (a batch's counted once per step)
    edgesplit_tail_queue_depth             pieces of work waiting for the tail (steps, evaluation, ...)
    edgesplit_clients_connected            clients that are members of the run
    edgesplit_round                        the open round, counted from 1; rounds_total once finished
    edgesplit_rounds_total                 the rounds of the run
    edgesplit_round_steps_taken            steps the tail took in the open round, all clients together
    edgesplit_round_updates_received       adapter updates the open round has
    edgesplit_worker_busy_seconds_total    with --workers N: seconds each rank (label `rank`) spent on its shares
                                           of the steps (rate: that rank's utilisation)

The numbers are read when scraped: the worker's counters directly (each written by the worker thread only),
the round's progress from a snapshot the event loop refreshes (`RoundProgress`), so the HTTP thread never
walks the round engine's dictionaries while the loop changes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

from edgesplit.errors import EdgesplitError
from edgesplit.server.workers import WorkerStats


def check_metrics_available() -> None:
    """Refuse --metrics-port, before anything loads, where prometheus-client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise EdgesplitError(
            "--metrics-port needs the prometheus-client package: pip install 'edgesplit[metrics]' "
            "(or pip install prometheus-client), or leave --metrics-port out"
        ) from None


@dataclass(frozen=True)
class RoundProgress:
    """Where the run stands, as the event loop last saw it."""

    round: int = 0  # counted from 0, as the engine does
    rounds_total: int = 0
    clients_connected: int = 0
    round_steps_taken: int = 0
    round_updates_received: int = 0


def round_progress(state: Any, rounds_total: int) -> RoundProgress:
    """The round engine's state (rounds.RoundState) -> RoundProgress; on the event loop."""
    taken = sum(steps for round_index, steps in state.steps_taken.values() if round_index == state.round)
    return RoundProgress(state.round, rounds_total, len(state.members), taken, len(state.updates))


@dataclass
class StepTimes:
    """The steps' queue and compute seconds, summed (written on the event loop only)."""

    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


class _Collector:
    def __init__(
        self,
        stats: WorkerStats,
        queue_depth: Callable[[], int],
        progress: Callable[[], RoundProgress],
        times: StepTimes,
    ) -> None:
        self.stats = stats
        self.queue_depth = queue_depth
        self.progress = progress
        self.times = times

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats, progress = self.stats, self.progress()
        counters = (
            ("edgesplit_steps", "clients' training steps the tail took", stats.steps),
            ("edgesplit_tail_passes", "passes of the tail the steps took (fewer when batched)", stats.batches),
            ("edgesplit_tail_busy_seconds", "seconds the tail worker was busy", stats.busy_seconds),
            ("edgesplit_step_queue_seconds", "the steps' waits for the tail, summed", self.times.queue_seconds),
            ("edgesplit_step_compute_seconds", "the steps' compute on the tail, summed", self.times.compute_seconds),
        )
        for name, text, value in counters:
            yield CounterMetricFamily(name, text, value=value)
        if stats.rank_busy_seconds:
            ranks = CounterMetricFamily(
                "edgesplit_worker_busy_seconds", "seconds each tail worker rank spent on its shares", labels=["rank"]
            )
            for rank, seconds in enumerate(list(stats.rank_busy_seconds)):
                ranks.add_metric([str(rank)], seconds)
            yield ranks
        gauges = (
            ("edgesplit_tail_queue_depth", "pieces of work waiting for the tail", self.queue_depth()),
            ("edgesplit_clients_connected", "clients that are members of the run", progress.clients_connected),
            ("edgesplit_round", "the open round, from 1", min(progress.round + 1, progress.rounds_total)),
            ("edgesplit_rounds_total", "the rounds of the run", progress.rounds_total),
            ("edgesplit_round_steps_taken", "steps taken in the open round", progress.round_steps_taken),
            ("edgesplit_round_updates_received", "updates the open round has", progress.round_updates_received),
        )
        for name, text, value in gauges:
            yield GaugeMetricFamily(name, text, value=value)


class MetricsEndpoint:
    """The /metrics HTTP endpoint, on a thread of its own (prometheus-client's server)."""

    def __init__(
        self,
        host: str,
        port: int,
        stats: WorkerStats,
        queue_depth: Callable[[], int],
        progress: Callable[[], RoundProgress],
        times: StepTimes,
    ) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        # Any: the collector has prometheus-client's Collector shape without importing it at module level.
        registry.register(cast(Any, _Collector(stats, queue_depth, progress, times)))
        self.http_server, self.thread = start_http_server(port, addr=host, registry=registry)
        self.port = int(self.http_server.server_port)

    def close(self) -> None:
        self.http_server.shutdown()
        self.http_server.server_close()
