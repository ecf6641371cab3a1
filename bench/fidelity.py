"""Centralised LoRA, split learning (IID and non-IID), FedLLM and KD-FedLLM on E2E at one budget. Prints JSON.

    python bench/fidelity.py --out /work/fidelity-run          # every run whose result OUT lacks, in order
    python bench/fidelity.py --out DIR --frameworks kd          # one run (or a comma-separated subset)
    python bench/fidelity.py --out DIR --report-only            # the JSON, table and plot again from OUT

Runs, in this order: centralised (PyTorch LoRA of the whole model in this process, from the split run's
initial adapters), split (IID), split-noniid (compare's Dirichlet partition), fedllm, kd. Each run but
centralised is `edgesplit compare`'s machinery: its data preparation (seeded sample, partition, held-out
proxy), its exports (OUT/artifacts, made once and reused), its serve + client processes and its measurement of
bytes and client compute. Every run takes the same number of optimiser steps on training batches of the same
shape, clients x rounds x steps-per-round, so it sees the same number of training examples: the tail's steps
for split (one per client batch), the clients' local steps summed for fedllm and kd (kd's distillation steps on
the proxy come on top and are counted in its client compute), the one process's steps for centralised.
Every run's model is scored the same way: its PEFT adapter on the whole base model (edgesplit/server/scoring.py),
greedy generation on the first --eval-examples test inputs against all their references (BLEU, chrF, NIST,
ROUGE-L from edgesplit/server/text_scores.py), eval loss on those inputs' first references.

Each run goes in a fresh interpreter (so a run started later uses the code as it is then), leaves its result
in OUT/results/NAME.json and its generations and references in OUT/results/NAME.texts.json, and is skipped
when its result is already there. The report (--json, --plot, --table) recomputes the scores from the
stored texts, so a change of metric needs no training.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import machine

from edgesplit.server.compare import (
    CompareConfig,
    CompareData,
    ensure_artifacts,
    generate_texts,
    measure,
    prepare_data,
    run_framework,
)
from edgesplit.server.demo import Scorer
from edgesplit.server.orchestrate import Children

REPO = Path(__file__).resolve().parent.parent
E2E = REPO.parent / "shared" / "data" / "e2e"
RUNS = ("centralised", "split", "split-noniid", "fedllm", "kd")
COLORS = {
    "centralised": "black",
    "split": "tab:blue",
    "split-noniid": "tab:cyan",
    "fedllm": "tab:orange",
    "kd": "tab:green",
}


def say(text: str) -> None:
    print(f"[fidelity] {text}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/fidelity"), help="runs, exports, results (outside git)")
    p.add_argument("--frameworks", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--report-only", action="store_true", help="no training: the report from OUT/results")
    p.add_argument(
        "--score-finished",
        action="store_true",
        help="a run whose server log in OUT says it finished without failure is scored, not trained again "
        "(after an interruption during scoring); its result says so",
    )
    p.add_argument("--data", type=Path, default=E2E / "train.jsonl")
    p.add_argument("--eval-data", type=Path, default=E2E / "test.jsonl")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps-per-round", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=96)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--cut-layer", type=int, default=4)
    p.add_argument("--alpha", type=float, default=0.5, help="split-noniid: Dirichlet concentration")
    p.add_argument("--train-examples", type=int, default=4000, help="seeded sample of --data; the rest: kd proxy")
    p.add_argument("--eval-examples", type=int, default=200, help="test inputs scored, all references each")
    p.add_argument("--eval-batches", type=int, default=16, help="the server's per-round eval loss (the curve)")
    p.add_argument("--proxy-examples", type=int, default=16)
    p.add_argument("--kd-top-k", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: the longest reference + EOS")
    p.add_argument("--threads", type=int, default=2, help="PyTorch threads (server, centralised, scoring)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "fidelity_e2e.json")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "results" / "fidelity_e2e.png")
    p.add_argument("--table", type=Path, default=REPO / "docs" / "results" / "fidelity_e2e.md")
    return p


def compare_config(args: argparse.Namespace, partition: str) -> CompareConfig:
    """compare's settings for one partition; the non-IID one keeps its data and runs under OUT/noniid."""
    return CompareConfig(
        data=args.data,
        eval_data=args.eval_data,
        model=args.model,
        clients=args.clients,
        rounds=args.rounds,
        steps_per_round=args.steps_per_round,
        partition=partition,
        alpha=args.alpha,
        cut_layer=args.cut_layer,
        out=args.out if partition == "iid" else args.out / "noniid",
        max_seq_len=args.max_seq_len,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lora_rank=args.lora_rank,
        eval_examples=args.eval_examples,
        train_examples=args.train_examples,
        proxy_examples=args.proxy_examples,
        kd_top_k=args.kd_top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        threads=args.threads,
        eval_batches=args.eval_batches,
    )


def total_steps(args: argparse.Namespace) -> int:
    return int(args.clients * args.rounds * args.steps_per_round)


# ---------------------------------------------------------------------------------------------- centralised


def train_centralised(config: CompareConfig, artifacts: Path, data: CompareData, steps: int, adapter_dir: Path) -> dict:
    """PyTorch LoRA of the whole model on all the clients' lines, `steps` batches, from the split run's initial
    adapters (edgesplit/server/centralized.py); its adapter written as the federated runs' are."""
    import numpy as np
    import torch

    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.data import encode_examples, iterate_batches, load_tokenizer, read_jsonl
    from edgesplit.export.families import family_by_name, prepare_for_training
    from edgesplit.export.models import load_model
    from edgesplit.lora_names import from_peft_key
    from edgesplit.server.adapter import write_adapter
    from edgesplit.server.centralized import reference_for_artifacts, train_centralized
    from edgesplit.server.tail import OptimizerSettings, causal_lm_loss

    torch.set_num_threads(config.threads)
    manifest = load_manifest(artifacts, verify=False)
    model = load_model(manifest.model_source).model
    prepare_for_training(model)
    reference = reference_for_artifacts(model, artifacts, seed=config.seed)
    tokenizer = load_tokenizer(artifacts)

    def encode(path: Path) -> Any:
        return encode_examples(
            tokenizer, read_jsonl(path), manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
        )

    train, held_out = encode(data.demo_data.train), encode(data.demo_data.eval)
    rows = min(len(held_out), config.eval_batches * config.batch_size)

    def eval_loss() -> float:  # the servers' per-round figure: the first eval_batches batches of eval.jsonl
        reference.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for start in range(0, rows, config.batch_size):
                ids, mask, labels = (
                    torch.from_numpy(a[start : min(start + config.batch_size, rows)])
                    for a in (held_out.input_ids, held_out.attention_mask, held_out.labels)
                )
                counted = int((labels[:, 1:] != -100).sum())
                logits = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
                total += float(causal_lm_loss(logits, labels)) * counted
                tokens += counted
        reference.train()
        return total / tokens

    batches = iterate_batches(train, config.batch_size, seed=config.seed)
    per_round = config.clients * config.steps_per_round
    curve, started = [eval_loss()], time.monotonic()

    def steps_with_evals() -> Any:  # one optimiser for the whole run; the curve at the federated rounds' ends
        for step, batch in enumerate(itertools.islice(batches, steps)):
            if step and step % per_round == 0:
                curve.append(eval_loss())
                say(f"centralised: {step}/{steps} steps, eval loss {curve[-1]:.4f}")
            yield batch.input_ids, batch.attention_mask, batch.labels

    losses = train_centralized(reference, steps_with_evals(), OptimizerSettings(learning_rate=config.learning_rate))
    curve.append(eval_loss())
    seconds = time.monotonic() - started
    family = family_by_name(manifest.family)
    adapters = {}
    for peft_name, parameter in reference.named_parameters():
        name = from_peft_key(peft_name, family.layers_path)
        if parameter.requires_grad and name is not None:
            adapters[str(name)] = parameter.detach().numpy().astype(np.float32)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    write_adapter(manifest, adapters, adapter_dir)
    return {
        "train_seconds": round(seconds, 1),
        "train_loss_first_last": [losses[0], losses[-1]],
        "eval_loss_curve": curve,  # before training, then after each clients x steps-per-round steps
        "note": "optimiser steps taken by the one process; no clients, no bytes",
    }


# ---------------------------------------------------------------------------------------------- one run


def client_totals(run: Path, config: CompareConfig, measured: dict, proxy_count: int) -> dict:
    """Client compute of the whole run, all clients: seconds of their own phases (steps; for kd also the proxy
    logits and the distillation, from the round records) and counted FLOPs."""
    from edgesplit.server.compare import SERVER_SIDE

    seconds = 0.0
    for path in sorted(run.glob("client-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["event"] == "step":
                seconds += sum(v for k, v in record["seconds"].items() if k not in SERVER_SIDE)
            elif record["event"] == "round":
                seconds += (record.get("upload_seconds") or 0.0) + (record.get("take_result_seconds") or 0.0)
    per_step = measured["client_flops_per_step"]
    flops = per_step * sum(measured["steps_per_client"])
    if measured["framework"] == "kd":  # per round and client: top-k forward, then one distillation epoch
        batches = math.ceil(proxy_count / config.batch_size)
        flops += config.rounds * config.clients * batches * (per_step / 2 + per_step)
    return {"client_seconds": round(seconds, 1), "client_gflop": flops / 1e9}


def run_one(args: argparse.Namespace, name: str) -> dict:
    partition = "dirichlet" if name == "split-noniid" else "iid"
    config = compare_config(args, partition)
    exports = compare_config(args, "iid")  # one export of each kind, under OUT/artifacts
    started = time.monotonic()
    data = prepare_data(config)
    proxy_count = sum(1 for line in data.proxy.read_text().splitlines() if line.strip()) if data.proxy else 0
    framework = "split" if name.startswith("split") else name
    result: dict[str, Any] = {"framework": name, "partition": data.demo_data.split}
    with Children(say) as children:
        artifacts = ensure_artifacts(exports, framework not in ("split", "centralised"), children)
        if name == "centralised":
            run = args.out / name
            result |= train_centralised(config, artifacts, data, total_steps(args), run / "adapter")
            result |= {"bytes_total": 0, "client_seconds": None, "client_gflop": None}
        else:
            t = time.monotonic()
            finished = finished_seconds(config.out / framework) if args.score_finished else None
            if finished is None:
                run = run_framework(config, framework, artifacts, data, children)
            else:
                run = config.out / framework
                say(f"{name}: the server log in {run} says the run finished; scored without training again")
            measured = measure(config, framework, artifacts, run, proxy_count)
            measured.pop("clients")
            seconds = time.monotonic() - t if finished is None else finished
            result |= measured | {"framework": name, "train_seconds": round(seconds, 1)}
            if finished is not None:
                result["reused_finished_run"] = True
            result["bytes_total"] = measured["bytes_up_total"] + measured["bytes_down_total"]
            result |= client_totals(run, config, measured, proxy_count)
            result["eval_loss_curve"] = server_curve(run)
            if framework == "kd":
                result["proxy"] = data.proxy_note
                result["proxy_examples"] = proxy_count
    say(f"{name}: trained; scoring {len(data.eval_inputs)} test inputs")
    scorer = Scorer(artifacts, config.demo_config(config.out))
    if name == "centralised":
        scorer.generator.add_adapter("trained", run / "adapter")
        adapter = "trained"
    else:
        adapter = scorer.load_checkpoint(run / "checkpoints", run / "adapter")
    t = time.monotonic()
    texts = generate_texts(scorer.generator, adapter, data, config.max_new_tokens)
    result["generation_seconds"] = round(time.monotonic() - t, 1)
    result["eval_loss"] = scorer.eval_loss(data.demo_data.eval_examples, adapter, max_batches=10**6)
    result |= {
        "eval_examples": len(data.eval_inputs),
        "references": sum(map(len, data.references)),
        "steps": total_steps(args),
        "examples_seen": total_steps(args) * args.batch_size,
        "wall_seconds": round(time.monotonic() - started, 1),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine(),
    }
    texts_file = args.out / "results" / f"{name}.texts.json"
    texts_file.parent.mkdir(parents=True, exist_ok=True)
    texts_file.write_text(json.dumps({"inputs": data.eval_inputs, "hypotheses": texts, "references": data.references}))
    (args.out / "results" / f"{name}.json").write_text(json.dumps(result, indent=1))
    say(f"{name}: done in {result['wall_seconds']:.0f} s, eval loss {result['eval_loss']:.4f}")
    return result


def server_records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "server.jsonl").read_text().splitlines() if line.strip()]


def finished_seconds(run: Path) -> float | None:
    """The seconds from the server's first record to its `finished` record, when the run in RUN finished
    without failure; None otherwise (no log, a failure, or still running when it was stopped)."""
    if not (run / "server.jsonl").is_file() or not (run / "checkpoints" / "latest").is_file():
        return None
    records = server_records(run)
    if not records or records[-1].get("event") != "finished" or records[-1].get("failure") is not None:
        return None
    return float(records[-1]["time"] - records[0]["time"])


def server_curve(run: Path) -> list[float | None]:
    """The server's eval loss before training and after each round (its first --eval-batches batches)."""
    records = server_records(run)
    before = [r.get("eval_loss") for r in records if r["event"] == "eval"][:1]
    return before + [r.get("eval_loss") for r in records if r["event"] == "round"]


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------------------------------------- report


def load_results(out: Path) -> list[dict]:
    """Every stored run, in RUNS order, its scores recomputed from its stored generations."""
    from edgesplit.server.text_scores import text_scores

    results = []
    for name in RUNS:
        path = out / "results" / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        texts = json.loads((out / "results" / f"{name}.texts.json").read_text())
        result |= text_scores(texts["hypotheses"], texts["references"])
        result["examples"] = [
            {"input": i, "output": h, "reference": r[0]}
            for i, h, r in list(zip(texts["inputs"], texts["hypotheses"], texts["references"], strict=True))[:3]
        ]
        results.append(result)
    return results


def bleu_gap_interval(out: Path, first: str, second: str, samples: int = 200) -> tuple[float, float]:
    """The 95% paired-bootstrap interval of BLEU(first) - BLEU(second): the eval inputs drawn with replacement,
    the same draw for both runs (Koehn, 2004), `samples` times."""
    import numpy as np

    from edgesplit.server.text_scores import corpus_bleu

    a, b = (json.loads((out / "results" / f"{n}.texts.json").read_text()) for n in (first, second))
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(samples):
        pick = rng.integers(0, len(a["hypotheses"]), len(a["hypotheses"]))
        refs = [a["references"][i] for i in pick]
        first_bleu = corpus_bleu([a["hypotheses"][i] for i in pick], refs)
        gaps.append(first_bleu - corpus_bleu([b["hypotheses"][i] for i in pick], refs))
    low, high = np.percentile(gaps, [2.5, 97.5])
    return float(low), float(high)


def bars(results: list[dict], out: Path) -> dict[str, Any]:
    by = {r["framework"]: r for r in results}
    found: dict[str, Any] = {}
    for name, key, limit in (
        ("split", "split_within_1_bleu_of_centralised", 1.0),
        ("split-noniid", "split_noniid_within_2_bleu_of_centralised", 2.0),
    ):
        if "centralised" in by and name in by:
            gap = by["centralised"]["bleu"] - by[name]["bleu"]
            low, high = bleu_gap_interval(out, "centralised", name)
            found[key] = {"gap": gap, "gap_95_low": low, "gap_95_high": high, "met": gap <= limit}
    if "fedllm" in by and "kd" in by:
        ratio = by["kd"]["bleu"] / by["fedllm"]["bleu"] if by["fedllm"]["bleu"] else None
        share = by["kd"]["bytes_total"] / by["fedllm"]["bytes_total"]
        met = ratio is not None and ratio >= 0.5 and share < 0.2
        found["kd_half_fedllm_bleu_under_fifth_bytes"] = {"bleu_ratio": ratio, "bytes_ratio": share, "met": met}
    return found


TABLE = [  # (key, header, format)
    ("framework", "run", "{}"),
    ("bleu", "BLEU", "{:.2f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("nist", "NIST", "{:.2f}"),
    ("rouge_l", "ROUGE-L", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("steps", "steps", "{}"),
    ("bytes_total", "bytes, all clients", "{:,}"),
    ("client_gflop", "client GFLOP, all", "{:,.1f}"),
    ("client_seconds", "client s, all", "{:,.0f}"),
    ("train_seconds", "train wall s", "{:,.0f}"),
    ("wall_seconds", "run wall s", "{:,.0f}"),
]


BAR_TEXT = {
    "split_within_1_bleu_of_centralised": "split (IID) within 1 BLEU of centralised",
    "split_noniid_within_2_bleu_of_centralised": "split (non-IID) within 2 BLEU of centralised",
    "kd_half_fedllm_bleu_under_fifth_bytes": "KD at least half of FedLLM's BLEU at under a fifth of its bytes",
}


def table(results: list[dict], found: dict[str, Any]) -> str:
    """The markdown table of the runs, then one line per bar with its figures."""
    lines = ["| " + " | ".join(h for _, h, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for r in results:
        cells = ["-" if r.get(k) is None else f.format(r[k]) for k, _, f in TABLE]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key, bar in found.items():
        figures = ", ".join(f"{k} {v:.3f}" for k, v in bar.items() if isinstance(v, float))
        lines.append(f"- {BAR_TEXT[key]}: **{'met' if bar['met'] else 'not met'}** ({figures})")
    return "\n".join(lines) + "\n"


def plot(path: Path, results: list[dict], caption: str) -> None:
    """Eval loss (the per-round curve) against cumulative client compute and against cumulative bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_compute, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.8))
    start = None
    for r in results:
        curve = [c for c in r.get("eval_loss_curve") or []]
        name, color = r["framework"], COLORS.get(r["framework"], "tab:gray")
        if r["client_gflop"] is None:  # centralised: no clients and no link, its final loss as a line
            for axis in (by_compute, by_bytes):
                axis.axhline(curve[-1], color=color, linestyle="--", label=f"{name} (end, no clients)")
            continue
        rounds = len(curve) - 1
        xs = [i / rounds for i in range(rounds + 1)]  # even shares of the run's totals per round
        by_compute.plot([x * r["client_gflop"] / 1e3 for x in xs], curve, "o-", color=color, label=name)
        # Bytes on a log axis (KD's and split's differ by orders of magnitude): from the first round on.
        by_bytes.plot([x * r["bytes_total"] / 1e6 for x in xs[1:]], curve[1:], "o-", color=color, label=name)
        start = curve[0]
    if results and start is not None:
        by_bytes.axhline(start, color="tab:gray", linestyle=":", label="before training")
    by_compute.set(xlabel="client compute, all clients (TFLOP, counted)", ylabel="eval loss", title="loss vs compute")
    by_bytes.set(xlabel="bytes up + down, all clients (MB, log)", ylabel="eval loss", title="loss vs communication")
    by_bytes.set_xscale("log")
    for axis in (by_compute, by_bytes):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(caption, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(args: argparse.Namespace, command: str) -> dict:
    results = load_results(args.out)
    if not results:
        sys.exit(f"no results under {args.out / 'results'}: run without --report-only first")
    caption = (
        f"{args.model} on E2E, LoRA r={args.lora_rank}, {args.clients} clients x {args.rounds} rounds x "
        f"{args.steps_per_round} steps, batch {args.batch_size} x {args.max_seq_len}, split cut {args.cut_layer}; "
        f"eval loss on {args.eval_batches * args.batch_size} test inputs after each round"
    )
    document = {
        "benchmark": "fidelity",
        "command": command,
        "commit": git("rev-parse", "HEAD"),
        "machine": machine(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "bars": bars(results, args.out),
        "runs": results,
    }
    for path in (args.json, args.table):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1) + "\n")
    args.table.write_text(table(results, document["bars"]))
    plot(args.plot, results, caption)
    return document


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RUNS))
    if unknown or not names:
        sys.exit(f"--frameworks takes a comma-separated subset of {','.join(RUNS)}; got {unknown or 'nothing'}")
    command = "python bench/fidelity.py " + " ".join(argv)
    if not args.report_only:
        if not args.data.is_file() or not args.eval_data.is_file():
            sys.exit(f"the E2E data is expected at {args.data} and {args.eval_data}")
        todo = [n for n in RUNS if n in names and not (args.out / "results" / f"{n}.json").is_file()]
        for name in [n for n in RUNS if n in names and n not in todo]:
            say(f"{name}: already in {args.out / 'results'}, skipped")
        if len(todo) == 1:
            run_one(args, todo[0])
        else:
            rest, skip = [], False
            for arg in argv:  # every flag but --frameworks, passed on
                if not skip and arg != "--frameworks" and not arg.startswith("--frameworks="):
                    rest.append(arg)
                skip = arg == "--frameworks"
            for name in todo:  # each in a fresh interpreter: a run started later uses the code as it is then
                say(f"--- {name}")
                code = subprocess.run([sys.executable, __file__, *rest, "--frameworks", name]).returncode
                if code:
                    say(f"{name} failed (exit {code}); going on with the next run")
    document = report(args, command)
    print(json.dumps({"bars": document["bars"], "runs": [r["framework"] for r in document["runs"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
