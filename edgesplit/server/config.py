"""`edgesplit serve`'s configuration, validated on construction, and what it tells the parts of the server."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgesplit.client.artifacts import Manifest
from edgesplit.client.protocol import Wire
from edgesplit.server.placement import check_names
from edgesplit.server.robust import AggregationRule
from edgesplit.server.round_events import RoundRules
from edgesplit.server.strategies import FRAMEWORKS, StrategyOptions


@dataclass(frozen=True)
class ServerConfig:
    artifacts: Path
    host: str = "127.0.0.1"
    port: int = 8765
    rounds: int = 10
    min_clients: int = 2
    steps_per_round: int = 20
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    wire: str = "fp32"
    eval_data: Path | None = None
    eval_batches: int = 8
    checkpoint_dir: Path | None = None
    metrics_out: Path | None = None
    tokens: dict[str, str] = field(default_factory=dict)  # client_id -> token; empty: no tokens needed
    tokens_file: Path | None = None  # where `tokens` came from: re-read on SIGHUP, to add or revoke clients
    round_deadline_s: float = 1800.0
    seed: int = 0
    threads: int = 0
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the server speaks wss://
    tls_key: Path | None = None
    hello_timeout_s: float = 30.0  # a connection that has not said Hello by then is closed
    # Connections that have not said Hello yet, at most; more are refused at once ("busy", close 1013) and
    # their clients retry. Bounds what strangers can hold open before the token check.
    max_pending_hellos: int = 64
    # A peer that leaves the server's writes unread this long is aborted (transport.BoundedConnection).
    send_timeout_s: float = 60.0
    framework: str = "split"  # a name in strategies.STRATEGIES
    proxy_data: Path | None = None  # KD-FedLLM: the shared inputs the clients' logits are computed on
    kd_top_k: int = 16
    device: str = "auto"  # where the tail runs: auto (a GPU if there is one), cpu, cuda, cuda:N
    dtype: str = "fp32"  # the tail's frozen weights: fp32, bf16, fp16 (LoRA and optimiser state stay fp32)
    batch_window_ms: float = 5.0  # how long a step waits for others to batch with (with max_batch_clients > 1)
    max_batch_clients: int = 1  # clients' steps in one pass of the tail; 1: each step alone
    metrics_port: int | None = None  # Prometheus metrics on this port (needs prometheus-client); None: off
    aggregation: str = "fedavg"  # a name in robust.AGGREGATIONS, with its parameters below
    trim_fraction: float = 0.1
    clip_norm: float = 1.0
    workers: int = 1  # tail worker ranks (torch.distributed; scaleout.py); under torchrun its world's size
    worker_timeout_s: float = 300.0  # how long a rank waits on the others before the run ends

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_clients < 1 or self.steps_per_round < 1:
            raise ValueError("--rounds, --min-clients and --steps-per-round must be at least 1")
        if not self.round_deadline_s > 0 or not self.hello_timeout_s > 0 or not self.send_timeout_s > 0:
            raise ValueError("--round-deadline, --send-timeout and the Hello timeout must be positive")
        if not all(math.isfinite(value) for value in (self.learning_rate, self.weight_decay)):
            raise ValueError("--learning-rate and --weight-decay must be finite numbers")  # 1e999 reads as inf
        if self.max_pending_hellos < 1:
            raise ValueError("--max-pending-hellos must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        Wire(self.wire)  # raises on an unknown wire format
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")
        check_names(self.device, self.dtype)
        if self.max_batch_clients < 1:
            raise ValueError(f"--max-batch-clients must be at least 1, got {self.max_batch_clients}")
        if not 0 <= self.batch_window_ms <= 10_000:
            raise ValueError(f"--batch-window-ms must be between 0 and 10000, got {self.batch_window_ms}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port must be a port number (0 picks a free one), got {self.metrics_port}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        if self.workers > 1 and self.framework != "split":
            raise ValueError(
                f"--workers spreads the server's tail over ranks; --framework {self.framework} trains on the "
                "devices only and has none: leave --workers out"
            )
        if not self.worker_timeout_s > 0:
            raise ValueError("--worker-timeout must be positive")
        self.aggregation_rule()  # raises on an unknown rule or a parameter out of range
        if self.aggregation != "fedavg" and self.framework == "kd":
            raise ValueError("--aggregation applies to the split and fedllm frameworks; kd averages probabilities")

    def strategy_options(self) -> StrategyOptions:
        return StrategyOptions(
            artifacts=self.artifacts,
            eval_data=self.eval_data,
            eval_batches=self.eval_batches,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            seed=self.seed,
            threads=self.threads,
            proxy_data=self.proxy_data,
            kd_top_k=self.kd_top_k,
            device=self.device,
            dtype=self.dtype,
            aggregation=self.aggregation_rule(),
        )

    def aggregation_rule(self) -> AggregationRule:
        return AggregationRule(self.aggregation, self.trim_fraction, self.clip_norm)

    def session_settings(self, manifest: Manifest) -> dict[str, object]:
        """What every Welcome tells a client, whatever the framework (the strategy adds its own)."""
        return {
            "steps_per_round": self.steps_per_round,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "wire": Wire(self.wire).value,
            "batch_size": manifest.batch_size,
            "max_seq_len": manifest.max_seq_len,
            "frozen_head": manifest.frozen_head,
            "seed": self.seed,
            "framework": self.framework,
        }

    def round_rules(self, manifest_hash: str, protocol_version: int) -> RoundRules:
        return RoundRules(
            total_rounds=self.rounds,
            min_clients=self.min_clients,
            steps_per_round=self.steps_per_round,
            round_deadline_s=self.round_deadline_s,
            manifest_hash=manifest_hash,
            protocol_version=protocol_version,
            checkpointing=self.checkpoint_dir is not None,
        )
