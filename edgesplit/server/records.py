"""What a running server records for its operator: the metrics file's round and end-of-run records
(--metrics-out, JSON Lines; report.py reads them) and the Prometheus endpoint (--metrics-port, metrics.py).

Written on the event loop only. The server's other records (resume, eval, step, refused, dropped updates) are
single lines written where they happen; these need the run's counters, which live here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgesplit.client.metrics import JsonlWriter
from edgesplit.server import round_events as events
from edgesplit.server.config import ServerConfig
from edgesplit.server.metrics import MetricsEndpoint, RoundProgress, StepTimes, round_progress
from edgesplit.server.workers import TailWorker


class RunRecords:
    """The run's counters for its records: evaluation seconds per round, the steps' summed times, the round's
    progress as /metrics reports it."""

    def __init__(self, config: ServerConfig, metrics: JsonlWriter, export_cut: int) -> None:
        self.config = config
        self.metrics = metrics
        self.export_cut = export_cut  # the cut of a client that named none
        self.eval_seconds: dict[int, float] = {}  # round -> the server's evaluation of it, in seconds
        # For --metrics-port: the steps' times summed, and the round's progress as of the last event.
        self.step_times = StepTimes()
        self.round_snapshot = RoundProgress(rounds_total=config.rounds)
        self.endpoint: MetricsEndpoint | None = None

    def start_endpoint(self, worker: TailWorker) -> None:
        """Serve Prometheus metrics on --metrics-port, if it was given."""
        config = self.config
        if config.metrics_port is None:
            return
        self.endpoint = MetricsEndpoint(
            config.host,
            config.metrics_port,
            worker.stats,
            worker.queue_depth,
            lambda: self.round_snapshot,
            self.step_times,
        )
        where = f"http://{config.host}:{self.endpoint.port}/metrics"
        print(f"[server] Prometheus metrics on {where}", flush=True)

    def refresh(self, state: Any) -> None:
        """The round's progress as the endpoint reports it, from the round engine's state (rounds.RoundState)."""
        self.round_snapshot = round_progress(state, self.config.rounds)

    def update_cuts(self, updates: Sequence[events.Update], client_cuts: dict[str, int]) -> dict[str, int]:
        """The cut each client of a round ran at (the export's one cut for a client that named none)."""
        return {u.client_id: client_cuts.get(u.client_id, self.export_cut) for u in updates}

    def round_closed(
        self,
        action: events.RoundClosed,
        client_cuts: dict[str, int],
        bytes_received: dict[str, int],
        bytes_sent: dict[str, int],
    ) -> None:
        clients = sorted(update.client_id for update in action.updates)
        self.metrics.write(
            "round",
            round=action.round,
            clients=clients,
            num_samples={update.client_id: update.num_samples for update in action.updates},
            eval_loss=action.eval_loss,
            seconds=action.seconds,
            eval_seconds=self.eval_seconds.get(action.round),
            bytes_received=dict(bytes_received),
            bytes_sent=dict(bytes_sent),
            client_metrics={update.client_id: dict(update.metrics) for update in action.updates},
            cut_layers=self.update_cuts(action.updates, client_cuts),
        )

    def finished(
        self,
        round_index: int,
        eval_loss: float | None,
        failure: str | None,
        bytes_received: dict[str, int],
        bytes_sent: dict[str, int],
    ) -> None:
        """The run's last record; the endpoint and the metrics file close."""
        if self.endpoint is not None:
            self.endpoint.close()
        self.metrics.write(
            "finished",
            round=round_index,
            eval_loss=eval_loss,
            failure=failure,
            bytes_received=bytes_received,
            bytes_sent=bytes_sent,
        )
        self.metrics.close()
