"""A federation of mixed devices against uniform ones, on this machine. Prints JSON.

    python bench/hetero.py [--model smollm2-135m] [--cuts 2,4,8] [--rounds 2] [--steps 4]
                           [--work-dir runs/bench-hetero] [--batch-size 4] [--max-seq-len 128]

One `edgesplit export --cut-layers 2,4,8`, then three runs of a real server and three real client processes
on loopback, each client on its own slice of E2E (or of a generated task with --model pointing at a tiny
model directory and --data-lines):

- mixed:    the clients at cuts 2, 4 and 8 (the devices of one mixed federation)
- all-min:  every client at the smallest cut (2)
- all-max:  every client at the largest cut (8)

Per run: each client's time per step (its phases, from its metrics), peak RSS and bytes up and down; the
server's compute seconds per step at each cut; the eval loss before and after. The three clients and the
server share this machine's cores, so the absolute times are this machine's, under that contention; the
bench prints the load average before and after. A uniform run of the smallest cut is exactly a single-cut
export's run at that cut (tests/server/test_mixed_cuts.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import free_port, machine, serve_command

from edgesplit.server.orchestrate import ClientCommand, command_line

REPO = Path(__file__).resolve().parent.parent
E2E = REPO.parent / "shared" / "data" / "e2e"
NAMES = ("dev-a", "dev-b", "dev-c")


def ensure_artifacts(work: Path, model: str, cuts: tuple[int, ...], batch_size: int, max_seq_len: int) -> Path:
    artifacts = work / f"artifacts-{'-'.join(map(str, cuts))}-b{batch_size}x{max_seq_len}"
    if not (artifacts / "manifest.json").exists():
        command = [
            sys.executable, "-m", "edgesplit", "export", "--model", model, "--out", str(artifacts), "--force",
            "--cut-layers", ",".join(map(str, cuts)), "--batch-size", str(batch_size),
            "--max-seq-len", str(max_seq_len),
        ]  # fmt: skip
        subprocess.run(command, check=True, stdout=sys.stderr)
    return artifacts


def write_data(work: Path, lines: int, eval_lines: int) -> tuple[list[Path], Path]:
    """Each client's slice of E2E's training set, and an eval subset."""
    if not E2E.is_dir():
        sys.exit(f"the E2E data set is expected at {E2E}")
    train = (E2E / "train.jsonl").read_text().splitlines()[::7]
    slices = []
    for index, name in enumerate(NAMES):
        path = work / f"{name}.jsonl"
        path.write_text("\n".join(train[index * lines : (index + 1) * lines]) + "\n")
        slices.append(path)
    test = work / "eval.jsonl"
    test.write_text("\n".join((E2E / "test.jsonl").read_text().splitlines()[::9][:eval_lines]) + "\n")
    return slices, test


def run(
    artifacts: Path, cuts: tuple[int, int, int], data: list[Path], test: Path, rounds: int, steps: int, out: Path
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server_metrics = out / "server.jsonl"
    server_metrics.unlink(missing_ok=True)
    extra = ["--eval-data", str(test), "--eval-batches", "4", "--threads", "1"]
    server = subprocess.Popen(
        serve_command(artifacts, port, server_metrics, rounds=rounds, min_clients=3, steps=steps, extra=extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    clients = []
    for name, cut, path in zip(NAMES, cuts, data, strict=True):
        (out / f"{name}.jsonl").unlink(missing_ok=True)
        command = ClientCommand(
            server=f"ws://127.0.0.1:{port}",
            artifacts=artifacts,
            data=path,
            client_id=name,
            metrics_out=out / f"{name}.jsonl",
            threads=1,
            quiet=True,
            connect_timeout_s=300,
            extra=("--cut-layer", str(cut)),
        )
        with (out / f"{name}.log").open("w") as log:  # the child keeps its own copy of the descriptor
            clients.append(subprocess.Popen(command_line(command), stdout=log, stderr=subprocess.STDOUT))
    try:
        # One client that stops (bad data, say) leaves the others waiting for it at the barrier: watch them all.
        deadline = time.monotonic() + 3600
        while any(client.poll() is None for client in clients) and time.monotonic() < deadline:
            for name, client in zip(NAMES, clients, strict=True):
                if client.poll() not in (None, 0):
                    raise RuntimeError(f"client {name} failed:\n{(out / f'{name}.log').read_text()}")
            time.sleep(1)
        server.wait(timeout=600)
    finally:
        for process in (server, *clients):
            if process.poll() is None:
                process.kill()
    server_records = [json.loads(line) for line in server_metrics.read_text().splitlines()]
    per_client = {}
    for name, cut in zip(NAMES, cuts, strict=True):
        records = [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
        steps_taken = [r for r in records if r["event"] == "step"][1:]  # the first step warms up
        summary = next(r for r in records if r["event"] == "summary")
        per_client[name] = {
            "cut_layer": cut,
            "step_seconds_median": round(statistics.median(sum(r["seconds"].values()) for r in steps_taken), 4),
            "phase_seconds_median": {
                k: round(statistics.median(r["seconds"][k] for r in steps_taken), 4) for k in steps_taken[0]["seconds"]
            },
            "peak_rss_mb": summary.get("peak_rss_mb"),
            "bytes_up": summary.get("bytes_up"),
            "bytes_down": summary.get("bytes_down"),
        }
    server_steps = [r for r in server_records if r["event"] == "step"]
    by_cut: dict[int, list[float]] = {}
    for record in server_steps:
        by_cut.setdefault(int(record["cut_layer"]), []).append(float(record["compute_seconds"]))
    rounds_done = [r for r in server_records if r["event"] == "round"]
    return {
        "cuts": list(cuts),
        "clients": per_client,
        "server_compute_seconds_median_by_cut": {c: round(statistics.median(v), 4) for c, v in sorted(by_cut.items())},
        "eval_loss_before": next((r["eval_loss"] for r in server_records if r["event"] == "eval"), None),
        "eval_loss_after": rounds_done[-1]["eval_loss"] if rounds_done else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cuts", default="2,4,8", help="three cuts, the mixed federation's (default 2,4,8)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps per round (default 4)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--data-lines", type=int, default=200, help="E2E training lines per client (default 200)")
    parser.add_argument("--eval-lines", type=int, default=32)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-hetero"))
    args = parser.parse_args(argv)
    cuts = tuple(sorted(int(c) for c in args.cuts.split(",")))
    if len(cuts) != 3:
        parser.error("--cuts takes three cuts")
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    load_before = [round(x, 2) for x in os.getloadavg()]
    artifacts = ensure_artifacts(work, args.model, cuts, args.batch_size, args.max_seq_len)
    data, test = write_data(work, args.data_lines, args.eval_lines)
    scenarios = {"mixed": cuts, "all-min": (cuts[0],) * 3, "all-max": (cuts[-1],) * 3}
    results = {
        name: run(artifacts, scenario, data, test, args.rounds, args.steps, work / name)  # type: ignore[arg-type]
        for name, scenario in scenarios.items()
    }
    report = {
        "bench": "hetero",
        "command": " ".join(["python", "bench/hetero.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "model": args.model,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len,
            "data_lines": args.data_lines,
        },  # fmt: skip
        "runs": results,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
