"""`edgesplit serve`: run the tail for many edge clients and average their adapters each round."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from edgesplit.client.tensors import Wire
from edgesplit.errors import EdgesplitError
from edgesplit.server.metrics import check_metrics_available
from edgesplit.server.placement import choose_placement
from edgesplit.server.robust import AGGREGATIONS
from edgesplit.server.scaleout import plan_workers, rank_config, serve_worker_rank, worker_ranks, worker_warning
from edgesplit.server.server import ServerConfig, read_tokens, run_server
from edgesplit.server.strategies import FRAMEWORKS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesplit serve", description=__doc__)
    parser.add_argument(
        "--artifacts", type=Path, required=True, help="the directory `edgesplit export` wrote (the server needs tail/)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept clients from other machines")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument(
        "--rounds", type=int, default=10, help="federated rounds; each ends with FedAvg and a checkpoint"
    )
    parser.add_argument("--min-clients", type=int, default=2, help="clients needed to start and to close a round")
    parser.add_argument("--steps-per-round", type=int, default=20, help="training steps each client takes per round")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW, for the tail and the clients")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay, tail and clients")
    parser.add_argument(
        "--wire",
        choices=tuple(wire.value for wire in Wire),
        default="fp32",
        help="how activations and gradients travel (int4k: int4 with outliers apart and padding left out)",
    )
    parser.add_argument("--eval-data", type=Path, help="JSONL evaluated after every round")
    parser.add_argument("--eval-batches", type=int, default=8, help="at most this many batches of --eval-data")
    parser.add_argument("--checkpoint-dir", type=Path, help="checkpoint every round here, and resume from it")
    parser.add_argument("--metrics-out", type=Path, help="JSON Lines file for per-step and per-round metrics")
    parser.add_argument(
        "--tokens-file",
        type=Path,
        help="'client_id token' lines; clients then need their token. Re-read on SIGHUP: a "
        "client whose line is gone or changed is disconnected",
    )
    parser.add_argument(
        "--round-deadline",
        type=float,
        default=1800.0,
        help="seconds after which a round closes with the updates it has (if --min-clients); "
        "a later update for it is dropped as stale",
    )
    parser.add_argument(
        "--max-pending-hellos",
        type=int,
        default=64,
        help="connections that have not said Hello yet, at most; more are refused at once as "
        "busy (close 1013) and their clients retry",
    )
    parser.add_argument(
        "--send-timeout",
        type=float,
        default=60.0,
        help="seconds a client may leave what the server writes to it unread before its connection is aborted",
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate (chain): serve wss:// (docs/security.md)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--seed", type=int, default=0, help="seeds the tail's LoRA and the clients' batch order")
    parser.add_argument(
        "--framework",
        choices=FRAMEWORKS,
        default="split",
        help="split: the device runs the head, the server the tail; fedllm and kd: the device trains "
        "the whole model (artifacts from `export --full-model`)",
    )
    parser.add_argument("--proxy-data", type=Path, help="kd: JSONL of shared inputs the clients' logits are on")
    parser.add_argument("--kd-top-k", type=int, default=16, help="kd: probabilities kept per position on the wire")
    parser.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        default="fedavg",
        help="how the clients' adapters are combined each round (split, fedllm): fedavg, or a robust rule "
        "against poisoned updates: median, trimmed-mean, clipped (docs/security.md)",
    )
    parser.add_argument(
        "--trim-fraction",
        type=float,
        default=0.1,
        help="trimmed-mean: the share of the clients' values dropped at each end, per entry (below 0.5)",
    )
    parser.add_argument(
        "--clip-norm",
        type=float,
        default=1.0,
        help="clipped: the largest L2 norm of one client's change to the global adapters",
    )
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: PyTorch's choice)")
    parser.add_argument(
        "--device",
        default="auto",
        help="where the tail runs: auto (a GPU if one is visible, else the CPU), cpu, cuda or cuda:N",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="precision of the tail's frozen weights; its LoRA and optimiser state stay fp32",
    )
    parser.add_argument(
        "--max-batch-clients",
        type=int,
        default=1,
        help="run up to this many clients' steps through the tail as one batch (one forward, backward and "
        "optimiser step; docs/architecture.md); 1: each step alone",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=5.0,
        help="with --max-batch-clients > 1: how long a step waits for others to join its batch",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tail worker processes (torch.distributed ranks: gloo on the CPU, one per GPU with NCCL) that "
        "share each batch of --max-batch-clients steps; under torchrun, its ranks (docs/architecture.md)",
    )
    parser.add_argument(
        "--worker-timeout",
        type=float,
        default=300.0,
        help="with --workers: seconds a rank waits on the others before the run ends, saying which",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on http://HOST:PORT/metrics (needs the prometheus-client package)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = ServerConfig(
            artifacts=args.artifacts,
            host=args.host,
            port=args.port,
            rounds=args.rounds,
            min_clients=args.min_clients,
            steps_per_round=args.steps_per_round,
            learning_rate=args.learning_rate,
            weight_decay=args.weight_decay,
            wire=args.wire,
            eval_data=args.eval_data,
            eval_batches=args.eval_batches,
            checkpoint_dir=args.checkpoint_dir,
            metrics_out=args.metrics_out,
            tokens=read_tokens(args.tokens_file) if args.tokens_file else {},
            tokens_file=args.tokens_file,
            round_deadline_s=args.round_deadline,
            seed=args.seed,
            threads=args.threads,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            framework=args.framework,
            proxy_data=args.proxy_data,
            kd_top_k=args.kd_top_k,
            max_pending_hellos=args.max_pending_hellos,
            device=args.device,
            dtype=args.dtype,
            max_batch_clients=args.max_batch_clients,
            batch_window_ms=args.batch_window_ms,
            metrics_port=args.metrics_port,
            send_timeout_s=args.send_timeout,
            aggregation=args.aggregation,
            trim_fraction=args.trim_fraction,
            clip_norm=args.clip_norm,
            workers=args.workers,
            worker_timeout_s=args.worker_timeout,
        )
    except ValueError as error:  # a flag combination the config refuses: say it as argparse would
        parser.error(str(error))
    plan = plan_workers(config)  # --workers, or the ranks torchrun started: checked before anything loads
    if plan.rank == 0:
        check_port_free(config.host, config.port)  # before the tail loads: a taken port is said in a second
        if config.metrics_port is not None:
            check_metrics_available()
            check_port_free(config.host, config.metrics_port)
    config = rank_config(config, plan)  # rank r's own GPU
    with worker_ranks(config, plan, sys.argv[2:] if argv is None else argv) as ranks:
        if plan.rank > 0:
            return serve_worker_rank(config, plan, ranks)
        if config.framework == "split":  # the frameworks that train on the device have no tail to place
            where = choose_placement(config.device, config.dtype).describe()
            print(f"[server] the tail runs on {where}{plan.describe()}", flush=True)
        warning = worker_warning(config, plan)
        if warning is not None:
            print(f"[server] warning: {warning}", flush=True)
        server = run_server(config, ranks)
    print(finished_line(server.round, server.last_eval_loss))
    return 0


def finished_line(rounds: int, eval_loss: float | None) -> str:
    """The last line of a run: the loss to 4 decimals (a float's 16 say nothing more), or n/a without eval data."""
    return f"[server] finished {rounds} rounds; final eval loss {'n/a' if eval_loss is None else f'{eval_loss:.4f}'}"


def check_port_free(host: str, port: int) -> None:
    """Refuse a --port another process listens on, before anything slow; the real bind still decides."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise EdgesplitError(f"--host {host!r}: cannot resolve it ({error.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        # As the server's own socket will be: SO_REUSEADDR lets it bind over connections still closing, never
        # over a listening socket.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise EdgesplitError(
                f"cannot listen on {host}:{port}: {error.strerror}; another process may hold the port: stop it, "
                "or choose another --port (0 picks a free one)"
            ) from None
