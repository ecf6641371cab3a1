"""`edgesplit compare`: split learning, FedLLM and KD-FedLLM side by side on one model, one data split.

    partition --data once ──> export once per kind (split at --cut-layer; --full-model for fedllm and kd)
        ──> for each framework: `edgesplit serve --framework F` + N x `edgesplit client` processes on this
            machine (the demo's commands)
        ──> score the server's final model: eval loss, perplexity, BLEU-4 / ROUGE-L (context/completion data)
            or exact match, and read the metrics: bytes per client per round (measured vs analytic),
            client FLOPs and time per step, peak memory, energy
        ──> compare.md, compare.csv, compare.json and plots under --out

Every framework gets the same clients' shares, the same steps per round and the same (batch, sequence)
shape, so each client trains on the same number of tokens whatever the framework. Before anything runs it
prints a rough estimate of the wall time for the chosen settings; each export then shows its elapsed time and
its log's latest line. The defaults are a quick look (minutes), not a fine-tune: the fidelity benchmark runs
the frameworks at a real budget (docs/fidelity.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.client.session_settings import FRAMEWORKS  # the frameworks the protocol knows
from edgesplit.export.models import DEFAULT_MODEL
from edgesplit.server.compare_report import run_caption, write_comparison
from edgesplit.server.demo import (
    DemoConfig,
    DemoData,
    Scorer,
    artifacts_mismatch,
    export_command,
    read_records,
    serve_command,
    train,
    write_shares,
)
from edgesplit.server.orchestrate import Children, RunError, sigterm_as_interrupt
from edgesplit.server.progress import LogTicker, rough_compare_seconds
from edgesplit.server.report import energy_origin

# A step's phases that are the server's or the link's, not the device's (the last from servers that did not split it).
SERVER_SIDE = ("network", "server_queue", "server_compute", "server")


def say(text: str) -> None:
    print(f"[compare] {text}", flush=True)


class CompareError(RunError):
    """The comparison's options or data do not fit together, or one of its runs failed."""


@dataclass(frozen=True)
class CompareConfig:
    data: Path
    eval_data: Path
    model: str = DEFAULT_MODEL
    frameworks: tuple[str, ...] = FRAMEWORKS
    clients: int = 3
    rounds: int = 3
    steps_per_round: int = 4
    proxy_data: Path | None = None
    partition: str = "iid"
    alpha: float = 0.5
    cut_layer: int = 4
    out: Path = Path("runs/compare")
    max_seq_len: int = 64
    batch_size: int = 4
    learning_rate: float = 3e-3
    lora_rank: int = 8
    eval_examples: int = 32
    train_examples: int = 0  # 0: every line of --data
    proxy_examples: int = 16
    kd_top_k: int = 16
    max_new_tokens: int = 0  # 0: the longest reference + EOS, within the window
    seed: int = 0
    threads: int = 1
    eval_batches: int = 0  # the server's eval loss each round on this many batches; 0: every eval input
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.frameworks) - set(FRAMEWORKS)
        if unknown or not self.frameworks:
            raise CompareError(f"--frameworks takes a comma-separated subset of {','.join(FRAMEWORKS)}")
        if self.partition not in ("iid", "dirichlet"):
            raise CompareError("--partition is iid or dirichlet")
        if min(self.clients, self.rounds, self.steps_per_round, self.eval_examples, self.proxy_examples) < 1:
            raise CompareError("--clients, --rounds, --steps-per-round and the example counts must be at least 1")
        if self.eval_batches < 0:
            raise CompareError("--eval-batches is 0 (every eval input) or a count of batches")

    def demo_config(self, out: Path) -> DemoConfig:
        return DemoConfig(
            out=out,
            model=self.model,
            clients=self.clients,
            rounds=self.rounds,
            steps_per_round=self.steps_per_round,
            cut_layer=self.cut_layer,
            max_seq_len=self.max_seq_len,
            batch_size=self.batch_size,
            lora_rank=self.lora_rank,
            learning_rate=self.learning_rate,
            seed=self.seed,
            threads=self.threads,
            # The frameworks on one footing: FedLLM's and KD's whole-model exports have a fixed length, so the
            # split head does too (not the demo's head for every length), and the analytic bytes and FLOPs of
            # every framework are at the window's length; the batches are in random order in all three.
            dynamic_seq=False,
            group_by_length=False,
        )


def build_parser() -> argparse.ArgumentParser:
    d = CompareConfig(Path("-"), Path("-"))
    p = argparse.ArgumentParser(
        prog="edgesplit compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", type=Path, required=True, help="training JSONL, partitioned across the clients")
    p.add_argument("--eval-data", type=Path, required=True, help="held-out JSONL: eval loss and task score")
    p.add_argument(
        "--proxy-data", type=Path, help="kd: the shared labelled set (default: held-out training lines, one per input)"
    )
    p.add_argument("--model", default=d.model, help="hub id, local model directory or .gguf file (default %(default)s)")
    p.add_argument("--frameworks", default=",".join(d.frameworks), help="comma-separated: split,fedllm,kd")
    p.add_argument("--clients", type=int, default=d.clients, help="edge client processes (default %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds (default %(default)s)")
    p.add_argument(
        "--steps-per-round",
        type=int,
        default=d.steps_per_round,
        help="training steps each client takes per round, in every framework (default %(default)s)",
    )
    p.add_argument(
        "--partition",
        choices=("iid", "dirichlet"),
        default=d.partition,
        help='how --data is shared out: uniformly at random, or skewed by its "group" key (default %(default)s)',
    )
    p.add_argument("--alpha", type=float, default=d.alpha, help="Dirichlet concentration (default %(default)s)")
    p.add_argument("--cut-layer", type=int, default=d.cut_layer, help="split: layers [0, cut) on the device")
    p.add_argument(
        "--out", type=Path, default=d.out, help="run directory: compare.md, .csv, .json, plots (default %(default)s)"
    )
    p.add_argument(
        "--max-seq-len", type=int, default=d.max_seq_len, help="tokens per example, every export (default %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="examples per step, every export (default %(default)s)"
    )
    p.add_argument(
        "--learning-rate", type=float, default=d.learning_rate, help="AdamW, server and clients (default %(default)s)"
    )
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="rank of the LoRA adapters (default %(default)s)")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out inputs scored")
    p.add_argument(
        "--eval-batches",
        type=int,
        default=d.eval_batches,
        help="the server's eval loss after each round on this many batches (default 0: every eval input)",
    )
    p.add_argument(
        "--train-examples",
        type=int,
        default=d.train_examples,
        help="a seeded sample of --data's lines (default 0: all)",
    )
    p.add_argument(
        "--proxy-examples", type=int, default=d.proxy_examples, help="kd: proxy examples (input and completion)"
    )
    p.add_argument(
        "--kd-top-k", type=int, default=d.kd_top_k, help="kd: logits each client shares per token (default %(default)s)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=d.max_new_tokens,
        help="tokens generated per held-out input when scoring (default 0: the longest reference's, within the window)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="the data split, sampling and initialisation (default 0)")
    p.add_argument("--threads", type=int, default=d.threads, help="PyTorch threads of server and scoring")
    return p


# ---------------------------------------------------------------------------------------------- data


def _input_of(record: dict[str, Any]) -> str | None:
    return record.get("context", record.get("prompt"))


@dataclass
class CompareData:
    demo_data: DemoData
    eval_inputs: list[str]
    references: list[list[str]]  # per eval input, every completion the data gives for it
    text_task: bool  # context/completion data (E2E): BLEU and ROUGE-L; otherwise exact match
    proxy: Path | None
    proxy_note: str


def prepare_data(config: CompareConfig) -> CompareData:
    from edgesplit.client.data import dirichlet_partition, iid_partition, read_jsonl

    folder = config.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    records = read_records(config.data)
    chosen = list(range(len(records)))
    if 0 < config.train_examples < len(records):
        rng = np.random.default_rng(config.seed)
        chosen = sorted(rng.choice(len(records), config.train_examples, replace=False).tolist())
    train = [records[i] for i in chosen]
    held_out = [records[i] for i in sorted(set(range(len(records))) - set(chosen))]
    # Group the eval lines by input: E2E gives several references per meaning representation.
    grouped: dict[str, list[str]] = {}
    for record in read_records(config.eval_data):
        key = _input_of(record)
        if key is None:
            raise CompareError(f"{config.eval_data}: the eval data needs prompt or context lines to score")
        grouped.setdefault(key, []).append(record["completion"])
    eval_inputs = list(grouped)[: config.eval_examples]
    references = [grouped[k] for k in eval_inputs]
    text_task = all("context" in r for r in train)
    key_name = "context" if text_task else "prompt"
    eval_path = folder / "eval.jsonl"  # one line per input, its first reference: the eval loss's data
    eval_path.write_text(
        "".join(
            json.dumps({key_name: k, "completion": r[0]}) + "\n" for k, r in zip(eval_inputs, references, strict=True)
        )
    )
    # Proxy (kd): a public labelled set, held-out training lines with their completions (one per input), never
    # an eval line; when --data has no held-out lines, training lines (public data the clients also hold).
    proxy, proxy_note = config.proxy_data, f"--proxy-data {config.proxy_data}"
    if proxy is None:
        source = "held-out training lines (not sampled for training)" if held_out else "training lines"
        firsts: dict[str, dict[str, Any]] = {}
        for record in held_out or train:
            key = _input_of(record)
            if key is not None and "completion" in record:
                firsts.setdefault(key, {key_name: key, "completion": record["completion"]})
        chosen_proxy = list(firsts.values())[: config.proxy_examples]
        proxy = folder / "proxy.jsonl"
        proxy.write_text("".join(json.dumps(p) + "\n" for p in chosen_proxy))
        proxy_note = f"{len(chosen_proxy)} {source}, input and completion"
        if not chosen_proxy and "kd" in config.frameworks:
            raise CompareError(
                f"{config.data} has no prompt/context and completion lines for kd's proxy: give --proxy-data"
            )
    # Partition once, for every framework.
    labels = [str(r.get("group") or (_input_of(r) or "").split("|")[0].strip()) for r in train]
    if config.partition == "dirichlet":
        names = sorted(set(labels))
        index = {n: i for i, n in enumerate(names)}
        parts = dirichlet_partition([index[g] for g in labels], config.clients, config.alpha, config.seed)
        how = (
            f"non-IID: Dirichlet(alpha={config.alpha:g}) over {len(names)} groups "
            '("group", else the input\'s first field)'
        )
    else:
        parts = iid_partition(len(train), config.clients, config.seed)
        how = "IID (uniformly at random)"
    client_files = write_shares(folder, train, parts)
    for client, indices in enumerate(parts):
        say(f"client-{client}: {len(indices)} examples")
    train_path = folder / "train.jsonl"
    train_path.write_text("".join(json.dumps(r) + "\n" for r in train))
    say(f"{len(train)} training lines split {how}; {len(eval_inputs)} eval inputs; proxy: {proxy_note}")
    data = DemoData(train_path, eval_path, client_files, how, [], [], read_jsonl(eval_path))
    return CompareData(data, eval_inputs, references, text_task, proxy, proxy_note)


# ---------------------------------------------------------------------------------------------- artifacts


def artifacts_dir(config: CompareConfig, full_model: bool) -> Path:
    return config.out / "artifacts" / ("full" if full_model else f"split-cut{config.cut_layer}")


def reusable(config: CompareConfig, full_model: bool) -> bool:
    """Whether an earlier run left an export that fits these settings."""
    artifacts = artifacts_dir(config, full_model)
    return artifacts.exists() and artifacts_mismatch(config.demo_config(config.out), artifacts, full_model) is None


def ensure_artifacts(config: CompareConfig, full_model: bool, children: Children) -> Path:
    """An export for `full_model` (FedLLM and KD share one): an earlier run's if it fits, else made now."""
    artifacts = artifacts_dir(config, full_model)
    demo_config = config.demo_config(config.out)
    if artifacts.exists():
        reason = artifacts_mismatch(demo_config, artifacts, full_model)
        if reason is None:
            say(f"reusing {artifacts} from an earlier run (same model and export options)")
            return artifacts
        say(f"exporting again: {artifacts} differs ({reason})")
    say(f"exporting {config.model} ({artifacts.name}) for {config.batch_size} x {config.max_seq_len} tokens")
    command = export_command(demo_config, artifacts, full_model)
    log = config.out / "logs" / f"export-{artifacts.name}.log"
    ticker = LogTicker(f"exporting {artifacts.name}", log, say, bar_prefix="[compare] ")
    try:
        children.run(f"export-{artifacts.name}", command, log, on_tick=ticker)
    finally:
        seconds = ticker.close()
    say(f"exported {artifacts.name} in {seconds:.0f} s")
    return artifacts


def estimated_seconds(config: CompareConfig) -> float:
    """A rough wall-time estimate for the chosen settings, before anything runs (exports reused count 0)."""
    kinds = {framework != "split" for framework in config.frameworks}
    return rough_compare_seconds(config, [full for full in kinds if not reusable(config, full)])


# ---------------------------------------------------------------------------------------------- training


def run_framework(
    config: CompareConfig, framework: str, artifacts: Path, data: CompareData, children: Children
) -> Path:
    run = config.out / framework
    shutil.rmtree(run, ignore_errors=True)  # old checkpoints would make the server resume
    run.mkdir(parents=True)
    demo_config = config.demo_config(run)
    served = serve_command(demo_config, artifacts, data.demo_data)
    command = replace(
        served,
        eval_batches=config.eval_batches or served.eval_batches,
        framework=framework,
        kd_top_k=config.kd_top_k,
        proxy_data=data.proxy if framework == "kd" else None,
    )
    server_log = run / "logs" / "server.log"
    server = children.start(f"server-{framework}", command, server_log)
    train(demo_config, artifacts, data.demo_data, children, server, server_log, say)
    return run


# ---------------------------------------------------------------------------------------------- scoring


def trained_generator(config: CompareConfig, framework: str, artifacts: Path, run: Path) -> tuple[Any, Any]:
    """A greedy generator over the server's final model, and the adapter to run it with: the run's checkpoint
    written as a PEFT adapter into RUN/adapter and loaded on the whole base model (KV-cached generation)."""
    if not (run / "checkpoints" / "latest").is_file():
        raise CompareError(f"{framework}: the server left no checkpoint in {run / 'checkpoints'}")
    scorer = Scorer(artifacts, config.demo_config(config.out))
    return scorer.generator, scorer.load_checkpoint(run / "checkpoints", run / "adapter")


def generate_texts(generator: Any, adapter: str | None, data: CompareData, max_new_tokens: int = 0) -> list[str]:
    """Greedy completions of every eval input (an AdapterGenerator, scoring.py), as text without the EOS;
    `max_new_tokens` 0: the longest reference's tokens + EOS."""
    from edgesplit.client.data import DEFAULT_PROMPT_FORMAT

    separator = DEFAULT_PROMPT_FORMAT.separator
    encode = generator.tokenizer.encode_batch
    prompts = [list(e.ids) for e in encode([p + separator for p in data.eval_inputs], add_special_tokens=False)]
    longest = max(len(e.ids) for e in encode([r for refs in data.references for r in refs], add_special_tokens=False))
    outputs = generator.generate(prompts, adapter, max_new_tokens or longest + 1)
    eos = generator.eos_token_id
    return [generator.tokenizer.decode([t for t in o if t != eos], skip_special_tokens=True).strip() for o in outputs]


def score_texts(texts: list[str], data: CompareData) -> dict[str, Any]:
    """BLEU, chrF, NIST and ROUGE-L against all the references of each input (context/completion data), or
    exact match against any of them."""
    from edgesplit.server.text_scores import text_scores

    if data.text_task:
        return text_scores(texts, data.references)
    matched = [any(t == r.strip() for r in refs) for t, refs in zip(texts, data.references, strict=True)]
    return {"exact_match": float(np.mean(matched))}


def task_score(config: CompareConfig, framework: str, artifacts: Path, run: Path, data: CompareData) -> dict[str, Any]:
    generator, adapter = trained_generator(config, framework, artifacts, run)
    started = time.perf_counter()
    texts = generate_texts(generator, adapter, data, config.max_new_tokens)
    result: dict[str, Any] = {
        "generation_seconds": round(time.perf_counter() - started, 1),
        "examples": [
            {"input": i, "output": o, "reference": r[0]}
            for i, o, r in list(zip(data.eval_inputs, texts, data.references, strict=True))[:3]
        ],
    }
    return result | score_texts(texts, data)


# ---------------------------------------------------------------------------------------------- metrics


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def analytic_bytes(framework: str, manifest: Any, config: CompareConfig, proxy_count: int) -> tuple[int, int]:
    """Per client per round: (up, down) payload bytes of what the framework must send."""
    adapters = sum(int(np.prod(s)) * 4 for s in manifest.lora.matrices.values())
    b, t, h = manifest.batch_size, manifest.max_seq_len, manifest.hidden_size
    if framework == "split":  # activations fp32 + mask and labels int64 up, activation grads fp32 down
        steps = config.steps_per_round
        return steps * (b * t * h * 4 + 2 * b * t * 8) + adapters, steps * b * t * h * 4 + adapters
    if framework == "fedllm":
        return adapters, adapters
    logits = proxy_count * t * config.kd_top_k * (4 + 8)  # float32 values, int64 indices
    return logits, logits


def measure(config: CompareConfig, framework: str, artifacts: Path, run: Path, proxy_count: int) -> dict[str, Any]:
    from edgesplit.client.artifacts import load_manifest
    from edgesplit.server.flops import client_flops_per_step, load_shapes

    manifest = load_manifest(artifacts, verify=False)
    server = _jsonl(run / "server.jsonl")
    finished = next(r for r in server if r["event"] == "finished")
    rounds = [r for r in server if r["event"] == "round"]
    eval_loss = finished.get("eval_loss")
    received, sent = finished["bytes_received"], finished["bytes_sent"]
    per = config.clients * config.rounds
    # The handshake (HELLO, and WELCOME: for kd the proxy tokens) is paid once, not per round.
    up_round = sum(v for k, v in received.items() if k != "HELLO") / per
    down_round = sum(v for k, v in sent.items() if k != "WELCOME") / per
    up_analytic, down_analytic = analytic_bytes(framework, manifest, config, proxy_count)
    clients = {}
    for path in sorted(run.glob("client-*.jsonl")):
        records = _jsonl(path)
        steps = [r for r in records if r["event"] == "step"]
        summary = next(r for r in records if r["event"] == "summary")
        own = [sum(v for k, v in r["seconds"].items() if k not in SERVER_SIDE) for r in steps]
        clients[path.stem] = {
            "steps": len(steps),
            "tokens": sum(r["tokens"] for r in steps),
            "client_seconds_per_step": float(np.median(own)) if own else None,
            "peak_rss_mb": summary["peak_rss_mb"],
            "energy_j": summary["energy_j"],
            "energy_method": summary["energy_method"],
            "energy_source": summary["energy_source"],
            "bytes_up": summary["bytes_up"],
            "bytes_down": summary["bytes_down"],
        }
    shapes = load_shapes(artifacts, manifest.model_source)
    layers = manifest.num_layers if manifest.full_model else manifest.cut_layer
    flops = client_flops_per_step(shapes, layers, manifest.batch_size, manifest.max_seq_len, manifest.full_model)
    values = list(clients.values())
    return {
        "framework": framework,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss) if eval_loss is not None else None,
        "eval_loss_by_round": [r.get("eval_loss") for r in rounds],
        "layers_on_device": layers,
        "num_layers": manifest.num_layers,
        "bytes_up_per_client_round": up_round,
        "bytes_down_per_client_round": down_round,
        "analytic_up": up_analytic,
        "analytic_down": down_analytic,
        "up_vs_analytic": up_round / up_analytic - 1,
        "down_vs_analytic": down_round / down_analytic - 1,
        "bytes_up_total": sum(c["bytes_up"] for c in values),
        "bytes_down_total": sum(c["bytes_down"] for c in values),
        "client_flops_per_step": flops["total"],
        "client_seconds_per_step": float(np.mean([c["client_seconds_per_step"] for c in values])),
        "peak_rss_mb": max(c["peak_rss_mb"] for c in values),
        "energy_j_per_client": float(np.mean([c["energy_j"] for c in values])),
        "energy_label": energy_origin(values[0]["energy_method"], values[0]["energy_source"]),
        "tokens_per_client": [c["tokens"] for c in values],
        "steps_per_client": [c["steps"] for c in values],
        "clients": clients,
    }


# ---------------------------------------------------------------------------------------------- report


def write_outputs(
    config: CompareConfig, results: dict[str, dict[str, Any]], data: CompareData, command: str, seconds: float
) -> str:
    notes = [
        f"Partition: {data.demo_data.split}. KD proxy: {data.proxy_note}.",
        f"Tokens per client (all frameworks: {config.steps_per_round} steps x {config.rounds} rounds x "
        f"{config.batch_size} x {config.max_seq_len}; counted without padding): "
        + "; ".join(f"{k} {r['tokens_per_client']}" for k, r in results.items()),
        "Bytes per client per round are measured at the server (every frame but the one-off handshake); "
        "analytic sizes count payload only.",
    ]
    about = {"proxy": data.proxy_note, "partition": data.demo_data.split}
    return write_comparison(config.out, results, command, seconds, notes, about, run_caption(config))


# ---------------------------------------------------------------------------------------------- main


def run_compare(config: CompareConfig, command: str = "edgesplit compare") -> dict[str, dict[str, Any]]:
    started = time.monotonic()
    config.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(config)
    proxy_count = sum(1 for line in data.proxy.read_text().splitlines() if line.strip()) if data.proxy else 0
    results: dict[str, dict[str, Any]] = {}
    estimate = estimated_seconds(config)
    say(
        f"rough estimate: about {estimate / 60:.0f} min for these settings ({len(config.frameworks)} frameworks, "
        f"{config.clients} clients x {config.rounds} rounds x {config.steps_per_round} steps; timed with the "
        "default model on a 2-core machine, so only a guide)"
    )
    with Children(say) as children:
        kinds = sorted({framework != "split" for framework in config.frameworks})  # the split export first
        exports = {full: ensure_artifacts(config, full, children) for full in kinds}
        artifacts = {fw: exports[fw != "split"] for fw in config.frameworks}
        for framework in config.frameworks:
            say(f"--- {framework}: {config.clients} clients x {config.rounds} rounds x {config.steps_per_round} steps")
            t = time.monotonic()
            run = run_framework(config, framework, artifacts[framework], data, children)
            result = measure(config, framework, artifacts[framework], run, proxy_count)
            result["train_seconds"] = round(time.monotonic() - t, 1)
            loss = result["eval_loss"]
            loss_text = "n/a (no target tokens)" if loss is None else f"{loss:.4f}"
            say(f"{framework}: trained in {result['train_seconds']:.0f} s, eval loss {loss_text}; scoring")
            result.update(task_score(config, framework, artifacts[framework], run, data))
            results[framework] = result
    seconds = time.monotonic() - started
    table = write_outputs(config, results, data, command, seconds)
    print(table, flush=True)
    say(f"done in {seconds:.0f} s: {config.out / 'compare.md'}, compare.csv, compare.json, plots/compare.png")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = vars(args)
    values["frameworks"] = tuple(f.strip() for f in values["frameworks"].split(",") if f.strip())
    config = CompareConfig(**values)
    command = "edgesplit compare " + " ".join(sys.argv[2:] if argv is None else argv)
    with sigterm_as_interrupt():
        try:
            run_compare(config, command)
        except KeyboardInterrupt:
            print("[compare] interrupted: every process it started has been stopped", file=sys.stderr, flush=True)
            return 130
    return 0
