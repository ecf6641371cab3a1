"""What each aggregation rule costs in accuracy when every client is honest: one short run per rule of
`edgesplit serve --aggregation`, the same clients, data and seed, and the server's eval loss after each.
Prints one JSON object.

    python bench/aggregation.py [--rules fedavg,median,trimmed-mean,clipped] [--clients 4] [--rounds 3]
                                [--steps 8] [--repeats 1] [--model tiny | smollm2-135m] [--work-dir DIR]

- `--model tiny` (the default): the tests' tiny random Llama (as bench/load.py), each client on its own
  seeded sample of load.py's word task, evaluated on a held-out sample: seconds a run.
- `--model smollm2-135m`: the default model cut at layer 2 (batch 4, 64 tokens), each client on its own
  slice of E2E's training set, evaluated on the first 64 lines of E2E's test set (the server's --eval-data,
  --eval-batches 8): minutes a run.
- Each run: one `edgesplit serve` and --clients `edgesplit client` processes on loopback, --rounds rounds of
  --steps steps, learning rate 3e-3, --trim-fraction 0.25 (with 4 clients: one value trimmed at each end) and
  --clip-norm 1.0 (the defaults otherwise). Reported per rule and run: the eval loss before training and
  after each round, and how far each round moved the global adapters (L2 norm, from the checkpoints). The
  tail trains on the steps in the order they arrive, so two runs of one rule differ: --repeats shows by how
  much.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import free_port, machine, serve_command
from load import ensure_artifacts, write_data

from edgesplit.server.orchestrate import ClientCommand, ExportCommand, command_line

REPO = Path(__file__).resolve().parent.parent
E2E = REPO.parent / "shared" / "data" / "e2e"
RULES = ("fedavg", "median", "trimmed-mean", "clipped")


def prepare(work: Path, model: str, clients: int, examples: int) -> tuple[Path, list[Path], Path]:
    """The artifacts, each client's data and the eval data."""
    data = work / "data"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    shares = [data / f"client-{index}.jsonl" for index in range(clients)]
    if model == "tiny":
        artifacts = ensure_artifacts(work)
        for index, path in enumerate(shares):
            write_data(path, seed=index, count=examples)
        write_data(data / "eval.jsonl", seed=1000, count=64)
        return artifacts, shares, data / "eval.jsonl"
    artifacts = work / f"artifacts-{model}"
    if not (artifacts / "manifest.json").exists():
        export = ExportCommand(out=artifacts, model=model, cut_layer=2, batch_size=4, max_seq_len=64, force=True)
        subprocess.run(command_line(export), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    lines = (E2E / "train.jsonl").read_text().splitlines()
    for index, path in enumerate(shares):
        path.write_text("\n".join(lines[index * examples : (index + 1) * examples]) + "\n")
    (data / "eval.jsonl").write_text("\n".join((E2E / "test.jsonl").read_text().splitlines()[:64]) + "\n")
    return artifacts, shares, data / "eval.jsonl"


def one_rule(
    work: Path, rule: str, artifacts: Path, shares: list[Path], eval_data: Path, rounds: int, steps: int
) -> dict[str, Any]:
    from edgesplit.client.metrics import read_jsonl

    run = work / rule
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    port = free_port()
    extra = ["--threads", "1", "--aggregation", rule, "--trim-fraction", "0.25", "--clip-norm", "1.0"]
    extra += ["--eval-data", str(eval_data), "--eval-batches", "8", "--seed", "0", "--learning-rate", "3e-3"]
    extra += ["--checkpoint-dir", str(run / "ckpt")]
    command = serve_command(
        artifacts, port, run / "server.jsonl", rounds=rounds, min_clients=len(shares), steps=steps, extra=extra
    )
    with (run / "server.log").open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        clients = [
            subprocess.Popen(
                command_line(
                    ClientCommand(
                        server=f"ws://127.0.0.1:{port}",
                        artifacts=artifacts,
                        data=share,
                        client_id=share.stem,
                        threads=1,
                        seed=index,
                        connect_timeout_s=300.0,
                        quiet=True,
                    )
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            for index, share in enumerate(shares)
        ]
        codes = [client.wait(1800) for client in clients]
        server_code = server.wait(300)
    records = read_jsonl(run / "server.jsonl")
    before = [r["eval_loss"] for r in records if r["event"] == "eval" and r.get("when") == "before_training"]
    after = [r["eval_loss"] for r in records if r["event"] == "round"]
    return {
        "global_change_l2_by_round": change_norms(run / "ckpt", artifacts, rounds),
        "eval_loss_before": round(before[0], 4) if before else None,
        "eval_loss_by_round": [round(loss, 4) for loss in after],
        "client_exits": codes,
        "server_exit": server_code,
    }


def change_norms(checkpoints: Path, artifacts: Path, rounds: int) -> list[float]:
    """How far each round moved the global adapters (L2 over all of them): what --clip-norm is to exceed."""
    import numpy as np
    from safetensors.numpy import load_file

    from edgesplit.server.checkpoint import load_checkpoint

    previous = load_file(str(artifacts / "head_adapters.safetensors"))
    norms = []
    for round_number in range(1, rounds + 1):
        current = load_checkpoint(checkpoints / f"round-{round_number:04d}").global_adapters
        squares = sum(float(np.sum((current[name].astype(np.float64) - previous[name]) ** 2)) for name in current)
        norms.append(round(squares**0.5, 4))
        previous = current
    return norms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated --aggregation rules")
    parser.add_argument("--clients", type=int, default=4, help="honest client processes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each run")
    parser.add_argument("--steps", type=int, default=8, help="steps each client takes per round")
    parser.add_argument("--model", default="tiny", choices=("tiny", "smollm2-135m"), help="see above")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each rule: their spread is the noise")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-aggregation")
    args = parser.parse_args(argv)
    rules = args.rules.split(",")
    limits = 2 <= args.clients <= 8 and 1 <= args.rounds <= 10 and 1 <= args.steps <= 50 and 1 <= args.repeats <= 5
    if set(rules) - set(RULES) or not limits:
        parser.error(f"--rules from {','.join(RULES)}; --clients 2-8, --rounds 1-10, --steps 1-50, --repeats 1-5")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    examples = args.rounds * args.steps * 4  # at the export's batch size of at most 4: no example seen twice
    artifacts, shares, eval_data = prepare(work, args.model, args.clients, examples)
    load_before = machine()["load_average"]
    results = {
        rule: [one_rule(work, rule, artifacts, shares, eval_data, args.rounds, args.steps) for _ in range(args.repeats)]
        for rule in rules
    }
    report = {
        "model": args.model,
        "clients": args.clients,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "repeats": args.repeats,
        "trim_fraction": 0.25,
        "clip_norm": 1.0,
        "rules": results,
        "load_average_before": load_before,
        "machine": machine(),
    }
    print(json.dumps(report, indent=2))
    runs = [run for repeats in results.values() for run in repeats]
    return 0 if all(run["server_exit"] == 0 and not any(run["client_exits"]) for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
