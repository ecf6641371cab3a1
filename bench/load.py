"""Many clients against one server, on loopback: throughput, step latency, server memory, and a full audit
that no client update was lost or counted twice. Prints one JSON object.

    python bench/load.py [--clients 32] [--rounds 3] [--steps 4] [--processes 4] [--timeout 600]
                         [--work-dir DIR]

- The model is the tests' tiny random Llama (tests/tiny_models.py), exported once into the work directory:
  this measures the runtime (protocol, scheduling, aggregation, checkpoints), not a model.
- One real `edgesplit serve` process (--min-clients = --clients, so every round waits for every client) and
  --processes worker processes, each running its share of the clients as asyncio tasks (real `Client`
  objects with their own ONNX Runtime sessions and websocket connections): 32 client processes would not fit
  two cores.
- Bounded: at most 128 clients, 20 rounds, 50 steps a round, and everything is killed at --timeout. Loopback
  only: the server binds 127.0.0.1.

Reported: steps per second (all clients, first step to last), p50/p99 step latency (a client's whole step:
head forward, network, server queue and compute, backward, optimiser), the server's peak and final RSS, and
the audit: per round, the checkpointed global adapters equal FedAvg of the updates the checkpoint recorded
as accepted; every (client, round) update was accepted exactly once; every (client, round, step) reached the
tail exactly once; every client ended with the final global adapters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from common import free_port, serve_command

REPO = Path(__file__).resolve().parent.parent
LIMITS = {"clients": 128, "rounds": 20, "steps": 50}


def ensure_artifacts(work: Path) -> Path:
    artifacts = work / "artifacts"
    if (artifacts / "manifest.json").exists():
        return artifacts
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import save_tiny_model

    from edgesplit.export.exporter import ExportConfig, export

    model = save_tiny_model("llama", work / "tiny-llama")
    export(
        ExportConfig(
            model=str(model),
            cut_layer=1,
            out=artifacts,
            batch_size=2,
            max_seq_len=16,
            lora_rank=4,
            lora_alpha=8.0,
            force=True,
        )
    )
    return artifacts


def write_data(path: Path, seed: int, count: int) -> None:
    rng = np.random.default_rng(seed)
    with path.open("w") as handle:
        for _ in range(count):
            a = int(rng.integers(0, 40))
            handle.write(json.dumps({"prompt": f"w{a} w{a + 1}", "completion": f"w{a + 2} w{a + 3}"}) + "\n")


# ------------------------------------------------------------------------------------------ worker process


async def run_clients(server: str, artifacts: Path, work: Path, client_ids: list[str]) -> None:
    from safetensors.numpy import save_file

    from edgesplit.client.client import Client, ClientConfig
    from edgesplit.client.resources import MemorySampler

    clients = []
    for client_id in client_ids:
        client = Client(
            ClientConfig(
                server=server,
                artifacts=artifacts,
                data=work / "data" / f"{client_id}.jsonl",
                client_id=client_id,
                metrics_out=work / "clients" / f"{client_id}.jsonl",
                threads=1,
                quiet=True,
                connect_timeout_s=120,
            )
        )
        client.memory = MemorySampler(interval_ms=1000)  # dozens of samplers at 10 ms would load the CPU
        clients.append(client)
    await asyncio.gather(*(client.run() for client in clients))
    for client in clients:  # what each client holds at the end, for the audit
        save_file(client.adapters, str(work / "clients" / f"{client.config.client_id}.safetensors"))


# ------------------------------------------------------------------------------------------ audit


def audit(work: Path, client_ids: list[str], rounds: int, steps: int) -> dict[str, Any]:
    from safetensors.numpy import load_file

    from edgesplit.client.metrics import read_jsonl
    from edgesplit.server.aggregate import fedavg
    from edgesplit.server.checkpoint import load_checkpoint

    records = read_jsonl(work / "server.jsonl")
    updates = Counter((r["client_id"], r["round"]) for r in records if r["event"] == "update")
    step_counts = Counter((r["client_id"], r["round"], r["step"]) for r in records if r["event"] == "step")
    expected_updates = {(c, r) for c in client_ids for r in range(rounds)}
    expected_steps = {(c, r, s) for c in client_ids for r in range(rounds) for s in range(steps)}
    worst_fedavg_error = 0.0
    checkpoint_mismatches = []
    final = None
    for round_index in range(1, rounds + 1):
        checkpoint = load_checkpoint(work / "ckpt" / f"round-{round_index:04d}")
        accepted = sorted(c for c, r in updates if r == round_index - 1)
        if sorted(checkpoint.updates) != accepted:
            checkpoint_mismatches.append(round_index)
        samples = checkpoint.extra["num_samples"]
        implied = fedavg([(checkpoint.updates[c], samples[c]) for c in sorted(checkpoint.updates)])
        for name, value in implied.items():
            worst_fedavg_error = max(
                worst_fedavg_error, float(np.max(np.abs(checkpoint.global_adapters[name] - value)))
            )
        final = checkpoint
    assert final is not None
    clients_off_final = [
        c
        for c in client_ids
        if any(
            not np.array_equal(value, final.global_adapters[name])
            for name, value in load_file(str(work / "clients" / f"{c}.safetensors")).items()
        )
    ]
    return {
        "lost_updates": len(expected_updates - set(updates)),
        "duplicated_updates": sum(n - 1 for n in updates.values() if n > 1),
        "lost_steps": len(expected_steps - set(step_counts)),
        "duplicated_steps": sum(n - 1 for n in step_counts.values() if n > 1),
        "rounds_checkpointed": final.round,
        "checkpoint_vs_accepted_mismatched_rounds": checkpoint_mismatches,
        "max_abs_error_global_vs_fedavg_of_accepted": worst_fedavg_error,
        "clients_not_holding_final_global_adapters": clients_off_final,
    }


def latency_stats(work: Path, client_ids: list[str]) -> dict[str, Any]:
    from edgesplit.client.metrics import read_jsonl

    steps = [r for c in client_ids for r in read_jsonl(work / "clients" / f"{c}.jsonl") if r["event"] == "step"]
    latencies_ms = np.array([sum(r["seconds"].values()) * 1000 for r in steps])
    waits_ms = np.array([r["wait_seconds"] * 1000 for r in steps])
    times = [r["time"] for r in steps]
    span = max(times) - min(times) if len(times) > 1 else float("nan")
    return {
        "steps": len(steps),
        "steps_per_second": round((len(steps) - 1) / span, 2) if span > 0 else None,
        "step_latency_ms": {
            "p50": round(float(np.percentile(latencies_ms, 50)), 1),
            "p99": round(float(np.percentile(latencies_ms, 99)), 1),
            "max": round(float(latencies_ms.max()), 1),
        },
        "server_round_trip_ms": {
            "p50": round(float(np.percentile(waits_ms, 50)), 1),
            "p99": round(float(np.percentile(waits_ms, 99)), 1),
        },
    }


# ------------------------------------------------------------------------------------------ main


class RssSampler:
    """RSS of another process, sampled every 100 ms in a thread until it exits."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                rss = self.process.memory_info().rss
            except Exception:  # the process has exited
                return
            if rss:  # an exited, not yet reaped process reads as 0
                self.samples.append(rss)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        if not self.samples:
            return {}
        return {
            "peak": round(max(self.samples) / 2**20, 1),
            "median": round(float(np.median(self.samples)) / 2**20, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per round")
    parser.add_argument("--processes", type=int, default=4, help="worker processes the clients are spread over")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before everything is killed")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-load")
    parser.add_argument("--worker", nargs=2, metavar=("SERVER", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    if args.worker:
        server, ids = args.worker
        asyncio.run(run_clients(server, work / "artifacts", work, ids.split(",")))
        return 0
    for name, limit in LIMITS.items():
        if not 1 <= getattr(args, name) <= limit:
            parser.error(f"--{name} must be between 1 and {limit}")

    work.mkdir(parents=True, exist_ok=True)
    for stale in ("ckpt", "clients", "data"):  # a run's audit must see only its own files
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / "server.jsonl").unlink(missing_ok=True)
    (work / "data").mkdir()
    (work / "clients").mkdir()
    artifacts = ensure_artifacts(work)
    client_ids = [f"c{index:03d}" for index in range(args.clients)]
    for index, client_id in enumerate(client_ids):
        write_data(work / "data" / f"{client_id}.jsonl", seed=index, count=8 + index % 5)

    port = free_port()
    started = time.perf_counter()
    deadline = started + args.timeout
    server = subprocess.Popen(
        serve_command(
            artifacts,
            port,
            work / "server.jsonl",
            rounds=args.rounds,
            min_clients=args.clients,
            steps=args.steps,
            extra=[
                "--round-deadline",
                str(args.timeout),
                "--checkpoint-dir",
                str(work / "ckpt"),
                "--threads",
                "1",
                "--learning-rate",
                "0.02",
            ],
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    rss = RssSampler(server.pid)
    shares = [client_ids[i :: args.processes] for i in range(args.processes) if client_ids[i :: args.processes]]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--work-dir",
                str(work),
                "--worker",
                f"ws://127.0.0.1:{port}",
                ",".join(share),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
        for share in shares
    ]
    outputs: dict[str, str] = {}
    try:
        for index, worker in enumerate(workers):
            outputs[f"worker{index}"] = worker.communicate(timeout=max(deadline - time.perf_counter(), 1))[0]
        outputs["server"] = server.communicate(timeout=max(deadline - time.perf_counter(), 1))[0]
    finally:
        for process in [server, *workers]:
            if process.poll() is None:
                process.kill()
                process.wait()
        server_rss = rss.stop()
    wall = time.perf_counter() - started
    failed = {
        name: out[-2000:]
        for name, out, code in [
            (f"worker{i}", outputs.get(f"worker{i}", ""), w.returncode) for i, w in enumerate(workers)
        ]
        + [("server", outputs.get("server", ""), server.returncode)]
        if code != 0
    }
    if failed:
        print(json.dumps({"error": "a process failed", "outputs": failed}, indent=2))
        return 1

    report = {
        "clients": args.clients,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "client_processes": len(workers),
        "wall_seconds": round(wall, 1),
        **latency_stats(work, client_ids),
        "server_rss_mb": server_rss,
        "audit": audit(work, client_ids, args.rounds, args.steps),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    audit_result = report["audit"]
    report["ok"] = (
        audit_result["lost_updates"] == audit_result["duplicated_updates"] == 0
        and audit_result["lost_steps"] == audit_result["duplicated_steps"] == 0
        and not audit_result["checkpoint_vs_accepted_mismatched_rounds"]
        and audit_result["max_abs_error_global_vs_fedavg_of_accepted"] < 1e-6
        and not audit_result["clients_not_holding_final_global_adapters"]
        and audit_result["rounds_checkpointed"] == args.rounds
    )
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
