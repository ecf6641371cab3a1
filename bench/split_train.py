"""Split training against centralised training of the same model, on this machine, in one run. Prints JSON.

    python bench/split_train.py [--steps 24] [--cut-layer 4] [--work-dir runs/bench-split]

- Centralised: the whole model with PEFT LoRA (the same rank, alpha and targets) trained in PyTorch in this
  process on the same batches: tokens per second, median over the steps after the first.
- Split: a real `edgesplit serve` and one real `edgesplit client` process on loopback, for each wire format
  (default fp32, fp16, int8, int4; --wires picks, int4k among them): tokens per second from the client's
  per-step wall time, bytes per step up and down, and the eval loss on E2E test examples after the run.
- int8 head: the same split run (fp32 wire) with the head exported `--quantize int8`, against the fp32 head:
  what the int8 head's weights and its LoRA gradients (about 10% off fp32's, bench/head_step.py) cost in
  training. The tail is float32 in both.
- --group-by-length: the head exported --dynamic-seq, run twice on the fp32 wire, on random batches and on
  batches grouped by length (client --group-by-length): what grouping does to the whole split step's real
  tokens per second and to the eval loss, against each other and against the fixed-length head.
Bars (issue 4): split throughput >= 0.8x centralised; int8 wire's final eval loss within 2% of fp32's.
int4 and int4k wires: at least 8x fewer bytes up than fp32 at no more than 1% higher eval loss.

    python bench/split_train.py --steps 24 --wires fp32,int4 --no-baselines   # the wires alone, no PyTorch run
    python bench/split_train.py --steps 12 --wires fp32,int4k,int4,int8 --no-baselines
    python bench/split_train.py --steps 40 --wires fp32 --no-baselines --group-by-length
Client and server share this machine's cores, as they would not in a deployment; they take turns (each
waits for the other), so the split run's figure includes no contention beyond that.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import export_command, free_port, serve_command

from edgesplit.server.orchestrate import ClientCommand, command_line

REPO = Path(__file__).resolve().parent.parent
E2E = REPO.parent / "shared" / "data" / "e2e"


def ensure_artifacts(work: Path, cut_layer: int, quantize: str = "none", dynamic_seq: bool = False) -> Path:
    name = f"artifacts-cut{cut_layer}" + ("" if quantize == "none" else f"-{quantize}")
    artifacts = work / (name + ("-dynamic" if dynamic_seq else ""))
    if not (artifacts / "manifest.json").exists():
        command = export_command(artifacts, cut_layer, quantize) + (["--dynamic-seq"] if dynamic_seq else [])
        subprocess.run(command, check=True, stdout=sys.stderr)
    return artifacts


def write_subsets(work: Path, train_lines: int, eval_lines: int) -> tuple[Path, Path]:
    if not E2E.is_dir():
        sys.exit(f"the E2E data set is expected at {E2E}")
    train, test = work / "train.jsonl", work / "eval.jsonl"
    # Every 7th line: many distinct contexts rather than the references of a few.
    lines = (E2E / "train.jsonl").read_text().splitlines()
    train.write_text("\n".join(lines[::7][:train_lines]) + "\n")
    lines = (E2E / "test.jsonl").read_text().splitlines()
    test.write_text("\n".join(lines[::9][:eval_lines]) + "\n")
    return train, test


def split_run(
    artifacts: Path,
    train: Path,
    test: Path,
    wire: str,
    steps: int,
    work: Path,
    lr: float,
    tag: str = "",
    client_extra: tuple[str, ...] = (),
    eval_batches: int = 8,
) -> dict:
    """One real server and one real client on loopback; `client_extra` adds client flags (bench/inversion.py's
    --activation-noise)."""
    port = free_port()
    name = tag or wire
    server_metrics, client_metrics = work / f"server-{name}.jsonl", work / f"client-{name}.jsonl"
    for path in (server_metrics, client_metrics):
        path.unlink(missing_ok=True)
    server = subprocess.Popen(
        serve_command(
            artifacts,
            port,
            server_metrics,
            steps=steps,
            extra=[
                "--wire",
                wire,
                "--learning-rate",
                str(lr),
                "--eval-data",
                str(test),
                "--eval-batches",
                str(eval_batches),
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client_command = ClientCommand(
        server=f"ws://127.0.0.1:{port}",
        artifacts=artifacts,
        data=train,
        client_id="bench",
        metrics_out=client_metrics,
        quiet=True,
        extra=client_extra,
    )
    client = subprocess.run(
        command_line(client_command),
        capture_output=True,
        text=True,
    )
    server.wait(timeout=600)
    if client.returncode != 0:
        raise RuntimeError(f"client failed: {client.stdout}{client.stderr}")
    records = [json.loads(line) for line in client_metrics.read_text().splitlines()]
    step_records = [r for r in records if r["event"] == "step"][1:]  # the first step warms up
    rates = [r["tokens"] / sum(r["seconds"].values()) for r in step_records]
    # Over the whole run: the real tokens over the steps' summed wall time, and the share of the computed
    # tokens (B x the length each batch was cut to) that were real.
    real = sum(r["tokens"] for r in step_records)
    computed = sum(r.get("computed_tokens", r["tokens"]) for r in step_records)
    server_records = [json.loads(line) for line in server_metrics.read_text().splitlines()]
    rounds = [r for r in server_records if r["event"] == "round"]
    before = next(r["eval_loss"] for r in server_records if r["event"] == "eval")
    return {
        "tokens_per_second_median": statistics.median(rates),
        "real_tokens_per_second_overall": real / sum(sum(r["seconds"].values()) for r in step_records),
        "real_share_of_computed": real / computed,
        "step_seconds_median": statistics.median(sum(r["seconds"].values()) for r in step_records),
        "phase_seconds_median": {
            k: statistics.median(r["seconds"][k] for r in step_records) for k in step_records[0]["seconds"]
        },
        "bytes_up_per_step": statistics.median(r["bytes_up"] for r in step_records),
        "bytes_down_per_step": statistics.median(r["bytes_down"] for r in step_records),
        "losses": [r["loss"] for r in records if r["event"] == "step"],
        "eval_loss_before": before,
        "eval_loss_after": rounds[-1]["eval_loss"],
    }


def centralized_run(artifacts: Path, train: Path, steps: int, lr: float) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer

    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.data import encode_examples, iterate_batches, read_jsonl
    from edgesplit.export.families import prepare_for_training
    from edgesplit.export.models import load_model
    from edgesplit.server.tail import causal_lm_loss

    manifest = load_manifest(artifacts, verify=False)
    model = load_model("smollm2-135m").model
    prepare_for_training(model)
    model = get_peft_model(
        model,
        LoraConfig(
            r=manifest.lora.rank,
            lora_alpha=manifest.lora.alpha,
            target_modules=list(manifest.lora.targets),
            lora_dropout=0.0,
        ),
    )
    model.train()
    tokenizer = Tokenizer.from_file(str(artifacts / "tokenizer.json"))
    encoded = encode_examples(
        tokenizer, read_jsonl(train), manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    rates, seconds = [], []
    for batch in itertools.islice(iterate_batches(encoded, manifest.batch_size, seed=0), steps):
        started = time.perf_counter()
        logits = model(
            input_ids=torch.from_numpy(batch.input_ids),
            attention_mask=torch.from_numpy(batch.attention_mask),
            use_cache=False,
        ).logits
        loss = causal_lm_loss(logits, torch.from_numpy(batch.labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - started
        seconds.append(elapsed)
        rates.append(int(batch.attention_mask.sum()) / elapsed)
    return {
        "tokens_per_second_median": statistics.median(rates[1:]),
        "step_seconds_median": statistics.median(seconds[1:]),
    }


def grouping_runs(args: argparse.Namespace, work: Path, train: Path, test: Path, fixed: dict) -> dict:
    """The --dynamic-seq head on the fp32 wire, on random and on length-grouped batches, against `fixed` (the
    fixed-length head's fp32 run): the whole step's real tokens per second, and the eval loss."""
    dynamic = ensure_artifacts(work, args.cut_layer, dynamic_seq=True)

    def run(tag: str, extra: tuple[str, ...] = ()) -> dict:
        return split_run(dynamic, train, test, "fp32", args.steps, work, args.learning_rate, tag, extra)

    runs = {"dynamic": run("dynamic"), "dynamic_grouped": run("dynamic-grouped", ("--group-by-length",))}
    for result in runs.values():
        result["vs_fixed_length"] = {
            "real_tokens_per_second_ratio": result["real_tokens_per_second_overall"]
            / fixed["real_tokens_per_second_overall"],
            "eval_loss_relative_change": (result["eval_loss_after"] - fixed["eval_loss_after"])
            / fixed["eval_loss_after"],
        }
    grouped, plain = runs["dynamic_grouped"], runs["dynamic"]
    runs["grouped_over_random"] = {
        "real_tokens_per_second_ratio": grouped["real_tokens_per_second_overall"]
        / plain["real_tokens_per_second_overall"],
        "eval_loss_relative_change": (grouped["eval_loss_after"] - plain["eval_loss_after"]) / plain["eval_loss_after"],
    }
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--cut-layer", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--train-lines", type=int, default=400)
    parser.add_argument("--eval-lines", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-split"))
    parser.add_argument("--wires", default="fp32,fp16,int8,int4", help="wire formats to run; fp32 always runs")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the centralised run and the int8-head run (wires only)"
    )
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="also a --dynamic-seq head on the fp32 wire, on random batches and on batches grouped by length",
    )
    args = parser.parse_args(argv)
    wires = ["fp32", *(w.strip() for w in args.wires.split(",") if w.strip() and w.strip() != "fp32")]
    if not args.no_baselines and "int8" not in wires:
        wires.append("int8")  # the int8 bar needs it
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_before = [round(x, 2) for x in os.getloadavg()]
    artifacts = ensure_artifacts(work, args.cut_layer)
    train, test = write_subsets(work, args.train_lines, args.eval_lines)
    split = {wire: split_run(artifacts, train, test, wire, args.steps, work, args.learning_rate) for wire in wires}
    fp32_loss = split["fp32"]["eval_loss_after"]
    by_wire = {
        wire: {
            "bytes_up_fp32_over_this": split["fp32"]["bytes_up_per_step"] / run["bytes_up_per_step"],
            "bytes_down_fp32_over_this": split["fp32"]["bytes_down_per_step"] / run["bytes_down_per_step"],
            "eval_loss_relative_change": (run["eval_loss_after"] - fp32_loss) / fp32_loss,
        }
        for wire, run in split.items()
    }
    bars: dict[str, bool] = {}
    for wire in ("int4", "int4k"):
        if wire in by_wire:
            bars[f"{wire}_8x_fewer_bytes_up"] = by_wire[wire]["bytes_up_fp32_over_this"] >= 8
            bars[f"{wire}_eval_loss_at_most_1pct_higher"] = by_wire[wire]["eval_loss_relative_change"] <= 0.01
    common = {
        "benchmark": "split_train",
        "model": "smollm2-135m",
        "cut_layer": args.cut_layer,
        "steps": args.steps,
        "machine": {
            "cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "load_average_before": load_before,
        },
        "split": split,
        "vs_fp32_wire": by_wire,
    }
    if args.group_by_length:
        common["group_by_length"] = grouping_runs(args, work, train, test, split["fp32"])
    if args.no_baselines:
        print(json.dumps(common | {"bars": bars, "wall_seconds": time.time() - started}, indent=2))
        return 0
    int8_head = split_run(
        ensure_artifacts(work, args.cut_layer, "int8"),
        train,
        test,
        "fp32",
        args.steps,
        work,
        args.learning_rate,
        tag="int8-head",
    )
    central = centralized_run(artifacts, train, args.steps, args.learning_rate)
    ratio = split["fp32"]["tokens_per_second_median"] / central["tokens_per_second_median"]
    int8_gap = abs(split["int8"]["eval_loss_after"] - fp32_loss) / fp32_loss
    result = common | {
        "centralized": central,
        "split_over_centralized_throughput": ratio,
        "int8_vs_fp32_eval_loss_relative_gap": int8_gap,
        "int8_head": int8_head,
        "int8_head_vs_fp32_head_eval_loss_relative_gap": abs(int8_head["eval_loss_after"] - fp32_loss) / fp32_loss,
        "bars": bars | {"throughput_at_least_0.8x": ratio >= 0.8, "int8_eval_loss_within_2pct": int8_gap <= 0.02},
        "wall_seconds": time.time() - started,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
