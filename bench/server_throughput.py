"""Client steps per second the server's tail sustains against the number of concurrent clients, batched
(`serve --max-batch-clients K`) against unbatched (one step at a time), with each step's latency.

    python bench/server_throughput.py [--clients 1 8 32] [--steps 2] [--max-batch-clients 8]
                                      [--batch-window-ms 5] [--threads N] [--work-dir DIR] [--tiny]
                                      [--workers 1 2]

The server side is the real one: the split strategy (its Tail, on the CPU in fp32) behind the worker
`edgesplit serve` builds (ThreadTailWorker, or BatchingTailWorker for K > 1). The clients are simulated: N
asyncio tasks that each submit a step, await its result and submit the next at once (no think time: the
tail is never idle, so the figure is the tail's capacity, not the clients'), `--steps` steps each, replaying
activations recorded once from the real head (ONNX Runtime) on E2E batches. The websocket and the wire
are left out: they cost the same batched or not. A step's latency is from its submission to its result,
the queue included.

`--workers 1 2` also runs the batched mode over tail worker ranks (`serve --workers N`: this process is rank 0
with a DistributedTailWorker and starts the other ranks as `edgesplit serve` does, gloo on the CPU): each
batch of K steps is shared between the N ranks, whose gradients are all-reduced. The torch threads (--threads,
or torch's choice) are split evenly between the ranks, so that N workers use the cores one worker used.

The model is SmolLM2-135M cut at layer 4 with batches of 4 x 128 tokens (exported once into --work-dir);
`--tiny` takes a tiny random Llama (3 layers, hidden 32) with batches of 2 x 16, for a check in seconds. A
batch of K clients holds K times the logits (4 x 128 x 49152 floats, 100 MB, per client for SmolLM2), so
--max-batch-clients stays well under 32 on a small machine.

Prints one JSON object: the machine (CPU model, cores, the instruction-set features torch uses and the
load average before and after), the settings, one record per (clients, mode), and per client count the
batched/unbatched ratio of steps per second with the issue's bar (>= 1.5 at 32 clients on a CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import machine as common_machine

E2E_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "train.jsonl"
BAR_CLIENTS, BAR_RATIO = 32, 1.5


def machine() -> dict[str, Any]:
    """The host (bench/common.py) and what torch makes of its CPU."""
    import torch

    return {
        **common_machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------ artifacts


def tiny_model_dir(directory: Path) -> Path:
    """The tests' tiny random Llama (tests/tiny_models.py) with its word-level tokenizer, as a model directory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import save_tiny_model

    return Path(save_tiny_model("llama", directory))


def artifacts(work: Path, tiny: bool) -> Path:
    """The export this bench runs, made once per work directory."""
    from edgesplit.export.exporter import ExportConfig, export

    out = work / ("tiny-cut1" if tiny else "smollm2-cut4")
    if (out / "manifest.json").exists():
        return out
    if tiny:
        config = ExportConfig(
            model=str(tiny_model_dir(work / "tiny-model")), cut_layer=1, out=out, batch_size=2, max_seq_len=16
        )
    else:
        config = ExportConfig(cut_layer=4, out=out, batch_size=4, max_seq_len=128)  # SmolLM2-135M, the default
    export(config)
    return out


def data_file(work: Path, tiny: bool) -> Path:
    if not tiny:
        return E2E_TRAIN
    path = work / "tiny.jsonl"
    rng = np.random.default_rng(0)
    lines = [
        json.dumps({"prompt": " ".join(f"w{w}" for w in rng.integers(0, 96, 4)), "completion": f"w{i % 96} w{i % 7}"})
        for i in range(64)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def recorded_steps(strategy: Any, data: Path, count: int) -> list[dict[str, np.ndarray]]:
    """`count` steps' tensors as clients send them: the real head's activations on batches of `data`."""
    from edgesplit.client.data import encode_examples, iterate_batches, load_tokenizer, read_jsonl

    head, manifest = strategy.head, strategy.manifest
    examples = read_jsonl(data)[:2000]
    encoded = encode_examples(
        load_tokenizer(head.root), examples, manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
    )
    adapters = head.initial_adapters()
    steps = []
    for _, batch in zip(range(count), iterate_batches(encoded, manifest.batch_size, seed=0), strict=False):
        forward = head.forward(batch.input_ids, batch.attention_mask, adapters)
        steps.append(
            {"activations": forward.activations, "attention_mask": batch.attention_mask, "labels": batch.labels}
        )
    return steps


# ------------------------------------------------------------------------------------------ the load


async def drive(worker: Any, clients: int, steps: int, replay: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """`clients` simulated clients, each `steps` steps back to back; steps/s and latency percentiles."""
    from edgesplit.server.workers import StepJob

    latencies: list[float] = []
    queue: list[float] = []

    async def client(number: int) -> None:
        for step in range(steps):
            tensors = replay[(number + step) % len(replay)]
            key = ("split", tensors["activations"].shape[1:])
            job = StepJob(f"c{number}", 0, step, tensors, lambda: True, batch_key=key)
            submitted = time.perf_counter()
            result = await worker.submit_step(job)
            result.unwrap()
            latencies.append(time.perf_counter() - submitted)
            queue.append(result.queue_seconds)

    passes_before = worker.stats.batches
    started = time.perf_counter()
    await asyncio.gather(*(client(number) for number in range(clients)))
    seconds = time.perf_counter() - started
    total = clients * steps
    return {
        "steps": total,
        "seconds": round(seconds, 3),
        "steps_per_second": round(total / seconds, 3),
        "tail_passes": worker.stats.batches - passes_before,
        "latency_ms": {
            "p50": round(float(np.percentile(latencies, 50)) * 1000, 1),
            "p99": round(float(np.percentile(latencies, 99)) * 1000, 1),
            "mean_queue": round(statistics.fmean(queue) * 1000, 1),
        },
    }


def measure(
    strategy: Any, replay: list[dict[str, np.ndarray]], clients: int, steps: int, batch: int, window_s: float
) -> dict[str, Any]:
    from edgesplit.server.batching import build_worker

    async def run() -> dict[str, Any]:
        worker = build_worker(strategy, batch, window_s)
        try:
            await drive(worker, 1, 1, replay)  # warm-up: the first pass pays for allocations
            return await drive(worker, clients, steps, replay)
        finally:
            worker.close()

    return asyncio.run(run())


def measure_workers(
    strategy: Any, replay: list[dict[str, np.ndarray]], args: argparse.Namespace, workers: int, threads: int
) -> list[dict[str, Any]]:
    """The batched mode with the tail's steps shared between `workers` ranks, for each client count."""
    import torch

    from edgesplit.server.config import ServerConfig
    from edgesplit.server.distributed import DistributedTailWorker
    from edgesplit.server.scaleout import WorkerPlan, worker_ranks

    per_rank = max(1, threads // workers)
    torch.set_num_threads(per_rank)
    root = strategy.tail.root
    config = ServerConfig(artifacts=root, device="cpu", threads=per_rank, workers=workers)
    argv = ["--artifacts", str(root), "--device", "cpu", "--workers", str(workers), "--threads", str(per_rank)]
    records = []
    # The ranks' lines go to stderr with the progress: stdout is the JSON's.
    with worker_ranks(config, WorkerPlan(0, workers, 0, spawn=True), argv, output=sys.stderr) as ranks:
        window_s = args.batch_window_ms / 1000
        worker = DistributedTailWorker(strategy.tail, True, ranks, args.max_batch_clients, window_s)
        try:
            for clients in args.clients:

                async def run(clients: int = clients) -> dict[str, Any]:
                    await drive(worker, 1, 1, replay)  # warm-up, and the replicas' first sync
                    busy_before = list(worker.stats.rank_busy_seconds)
                    record = await drive(worker, clients, args.steps, replay)
                    busy = [b - a for a, b in zip(busy_before, worker.stats.rank_busy_seconds, strict=True)]
                    record["rank_busy_fraction"] = [round(b / record["seconds"], 3) for b in busy]
                    return record

                record = {"clients": clients, "mode": "batched", "max_batch_clients": args.max_batch_clients}
                records.append({**record, "workers": workers, "threads_per_rank": per_rank, **asyncio.run(run())})
                print(json.dumps(records[-1]), file=sys.stderr, flush=True)
        finally:
            worker.close()
    torch.set_num_threads(threads)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients to try")
    parser.add_argument("--steps", type=int, default=2, help="steps each client takes per measurement")
    parser.add_argument("--max-batch-clients", type=int, default=8, help="the batched runs' K")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="the batched runs' window")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--work-dir", type=Path, help="where the export is kept between runs (default: a temp dir)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, 2 x 16 tokens: a quick check")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="also the batched mode over N tail worker ranks"
    )
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.steps < 1 or args.max_batch_clients < 2 or min(args.workers) < 1:
        parser.error("--clients, --steps and --workers must be at least 1, --max-batch-clients at least 2")
    import torch

    from edgesplit.server.strategies.base import StrategyOptions
    from edgesplit.server.strategies.split import SplitStrategy

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="server-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    strategy = SplitStrategy(StrategyOptions(artifacts=artifacts(work, args.tiny), device="cpu", dtype="fp32"))
    replay = recorded_steps(strategy, data_file(work, args.tiny), 8)
    results = []
    for clients in args.clients:
        for mode, batch in (("unbatched", 1), ("batched", args.max_batch_clients)):
            record = measure(strategy, replay, clients, args.steps, batch, args.batch_window_ms / 1000)
            results.append({"clients": clients, "mode": mode, "max_batch_clients": batch, "workers": 1, **record})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress; the JSON goes to stdout
    threads = torch.get_num_threads()
    for workers in sorted(set(args.workers) - {1}):
        results += measure_workers(strategy, replay, args, workers, threads)
    per_second = {(r["clients"], r["mode"]): r["steps_per_second"] for r in results if r["workers"] == 1}
    over_one = {
        f"{r['workers']} workers, {r['clients']} clients": round(r["steps_per_second"] / one, 2)
        for r in results
        if r["workers"] > 1 and (one := per_second[r["clients"], "batched"])
    }
    ratios = {str(n): round(per_second[n, "batched"] / per_second[n, "unbatched"], 2) for n in args.clients}
    batch_size, seq, _ = strategy.manifest.activations_shape
    report = {
        "bench": "server_throughput",
        "machine": {**machine(), "load_average_before": load_before, "load_average_after": load_average()},
        "settings": {
            "model": "tiny-llama" if args.tiny else "smollm2-135m",
            "cut_layer": strategy.manifest.cut_layer,
            "batch": [batch_size, seq],
            "steps_per_client": args.steps,
            "max_batch_clients": args.max_batch_clients,
            "batch_window_ms": args.batch_window_ms,
            "device": "cpu",
            "dtype": "fp32",
            "torch_threads": threads,  # one worker's; N ranks take threads // N each
            "workers": sorted(set(args.workers)),
        },
        "results": results,
        "batched_over_unbatched": ratios,
        "workers_over_one_worker_batched": over_one,  # steps/s of N ranks over one worker, both batched
        "bar": {
            "clients": BAR_CLIENTS,
            "ratio": BAR_RATIO,
            "met": ratios[str(BAR_CLIENTS)] >= BAR_RATIO if str(BAR_CLIENTS) in ratios else None,
        },
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
