"""The demo's report: summary.json, report.md and four PNG plots (drawn by edgesplit.server.report_plots),
all from the run's own metrics files.

    server.jsonl     step, round, finished records   ->  eval loss per round, bytes on the server's side
    client-*.jsonl   step, round, summary records    ->  loss per step, bytes, phase times, peak memory

The numbers are read back from the files the processes wrote, not from the demo's memory, so the report
shows exactly what a person would find in the run directory.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from edgesplit.client.metrics import read_jsonl as read_metrics
from edgesplit.server.report_plots import PHASES, plot_bytes, plot_loss, plot_memory, plot_step_time


def config_json(config: Any) -> dict[str, Any]:
    """A run's config record (a dataclass) as JSON values: paths as strings."""
    if not is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_json takes a dataclass instance, got {type(config).__name__}")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def _client_files(out: Path) -> list[Path]:
    def number(path: Path) -> int:
        found = re.search(r"(\d+)", path.stem)
        return int(found.group(1)) if found else 0

    return sorted(out.glob("client-*.jsonl"), key=number)


def round_means(steps: list[dict[str, Any]]) -> tuple[list[float | None], list[int], list[int]]:
    """Per round, in order: the mean loss over the steps that had target tokens (None if none had), how
    many had none (their loss is null: a mean over zero tokens is no number, and would hide the others), and
    how many steps there were."""
    by_round: dict[int, list[float | None]] = {}
    for step in steps:
        by_round.setdefault(int(step.get("round", 0)), []).append(step.get("loss"))
    means: list[float | None] = []
    without: list[int] = []
    for index in sorted(by_round):
        losses = [v for v in by_round[index] if v is not None]
        means.append(sum(losses) / len(losses) if losses else None)
        without.append(len(by_round[index]) - len(losses))
    return means, without, [len(by_round[index]) for index in sorted(by_round)]


def energy_text(client: dict[str, Any]) -> str:
    """A client's energy, with where the figure comes from: an estimate names its device profile, and says
    when that profile was guessed because the machine was not recognised."""
    if client.get("energy_j") is None:
        return "-"
    return f"{client['energy_j']:.1f} J ({energy_origin(client.get('energy_method'), client.get('energy_source'))})"


def real_share_text(client: dict[str, Any]) -> str:
    """The share of the tokens the client's head computed that were real, not padding: '-' without a count."""
    real, computed = client.get("real_tokens"), client.get("computed_tokens")
    if real is None or not computed:
        return "-"
    return f"{100 * real / computed:.0f}% of {computed:,}"


def energy_origin(method: str | None, source: str | None) -> str:
    """Where an energy figure comes from, in words: a sensor, or the device profile an estimate used."""
    source = source or ""
    if method == "estimated":
        profile = source.removeprefix("estimate:").removesuffix(" (guessed)")
        guessed = "guessed " if source.endswith("(guessed)") else ""
        return f"estimated from the {guessed}{profile}, not measured"
    return f"{method}: {source}"


def collect(out: Path) -> dict[str, Any]:
    """Everything the report shows, from server.jsonl and client-*.jsonl in `out`."""
    server = read_metrics(out / "server.jsonl")
    rounds = [r for r in server if r["event"] == "round"]
    finished = next((r for r in server if r["event"] == "finished"), {})
    # Each client's cut, as the server ran its steps (in a mixed-cut federation they differ).
    cuts = {r["client_id"]: r["cut_layer"] for r in server if r["event"] == "step" and "cut_layer" in r}
    clients: dict[str, Any] = {}
    for path in _client_files(out):
        records = read_metrics(path)
        steps = [r for r in records if r["event"] == "step"]
        summary = next((r for r in records if r["event"] == "summary"), {})
        client_id = summary.get("client_id") or path.stem
        phase_mean = {p: sum(s["seconds"].get(p, 0.0) for s in steps) / max(len(steps), 1) for p in PHASES}
        memory = summary.get("memory", {})
        round_losses, round_steps_without_targets, round_steps = round_means(steps)
        clients[client_id] = {
            "cut_layer": cuts.get(client_id),
            "steps": len(steps),
            "losses": [s["loss"] for s in steps],
            "round_losses": round_losses,
            "round_steps_without_targets": round_steps_without_targets,
            "round_ends": list(itertools.accumulate(round_steps)),  # the client's step count at each round's end
            "bytes_up": summary.get("bytes_up", 0),
            "bytes_down": summary.get("bytes_down", 0),
            "step_bytes_up": sum(s["bytes_up"] for s in steps),
            "step_bytes_down": sum(s["bytes_down"] for s in steps),
            "phase_mean_s": phase_mean,
            "step_mean_s": sum(phase_mean.values()),
            "peak_rss_mb": summary.get("peak_rss_mb"),
            "baseline_rss_mb": memory.get("baseline_bytes", 0) / 2**20,
            "steady_rss_mb": memory.get("steady_bytes", 0) / 2**20,
            "energy_j": summary.get("energy_j"),
            "energy_method": summary.get("energy_method"),
            "energy_source": summary.get("energy_source"),
            "seconds": summary.get("seconds"),
            # The tokens of the batches, and those the head computed for them (padding included).
            "real_tokens": summary.get("real_tokens"),
            "computed_tokens": summary.get("computed_tokens"),
        }
    received = sum(finished.get("bytes_received", {}).values())
    sent = sum(finished.get("bytes_sent", {}).values())
    return {
        "rounds": [
            {
                "round": r["round"] + 1,
                "eval_loss": r.get("eval_loss"),
                "seconds": r["seconds"],
                "eval_seconds": r.get("eval_seconds"),
                "clients": r["clients"],
            }
            for r in rounds
        ],
        "server": {
            "steps": sum(1 for r in server if r["event"] == "step"),
            "bytes_received": received,
            "bytes_sent": sent,
            "bytes_received_by_kind": finished.get("bytes_received", {}),
            "bytes_sent_by_kind": finished.get("bytes_sent", {}),
        },
        "clients": clients,
        # Both ends count every frame: what the clients sent is what the server received, byte for byte.
        "bytes_agree": received == sum(c["bytes_up"] for c in clients.values())
        and sent == sum(c["bytes_down"] for c in clients.values()),
    }


# ---------------------------------------------------------------------------------------------- text


def _score_json(score: Any) -> dict[str, Any] | None:
    return None if score is None else score.to_json(examples=len(score.generations))


def write_report(
    config: Any,
    artifacts: Path,
    data: Any,
    before: Any,
    after: Any,
    before_loss: float | None,
    seconds: dict[str, float],
    adapter: Path | None = None,
) -> dict[str, Any]:
    """Write summary.json, report.md and plots/*.png into config.out; return the summary. `adapter`: the
    trained model's PEFT adapter directory, which the report tells the person how to try."""
    from edgesplit.client.artifacts import load_manifest

    out = Path(config.out)
    manifest = load_manifest(artifacts, verify=False)
    metrics = collect(out)
    fit = dict(getattr(data, "fit", {}))
    eval_fit = fit.get("eval")
    if eval_fit is not None and eval_fit["without_targets"] >= eval_fit["examples"]:
        # The server's per-round figure is then a mean over zero tokens, written as 0.0: no number at all.
        for entry in metrics["rounds"]:
            entry["eval_loss"] = None
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_loss(plots / "loss.png", metrics, before_loss)
    plot_bytes(plots / "bytes.png", metrics)
    plot_step_time(plots / "step_time.png", metrics)
    plot_memory(plots / "memory.png", metrics)
    checkpoint = (out / "checkpoints" / "latest").read_text().strip()
    summary = {
        "config": config_json(config),
        "model": {
            "source": manifest.model_source,
            "family": manifest.family,
            "num_layers": manifest.num_layers,
            "cut_layer": manifest.cut_layer,
            "cut_layers": list(manifest.cut_layers),
            "hidden_size": manifest.hidden_size,
            "batch_size": manifest.batch_size,
            "max_seq_len": manifest.max_seq_len,
            "quantize": manifest.quantize,
        },
        "split": data.split,
        "data_fit": fit,
        "client_groups": {f"client-{i}": groups for i, groups in enumerate(data.client_groups)},
        "seconds": seconds,
        "before": _score_json(before),
        "after": _score_json(after),
        "eval_loss": [before_loss] + [r["eval_loss"] for r in metrics["rounds"]],
        "metrics": metrics,
        "checkpoint": str(out / "checkpoints" / checkpoint),
        "adapter": None if adapter is None else str(adapter),
        "try_adapter": None if adapter is None else try_command(adapter, data),
        "plots": sorted(str(p.relative_to(out)) for p in plots.glob("*.png")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(summary))
    return summary


def try_command(adapter: Path, data: Any) -> str:
    """The command that runs the trained adapter on one held-out prompt (or a prompt to fill in)."""
    import shlex

    prompt = next((e.prompt for e in getattr(data, "eval_examples", []) if e.prompt is not None), None)
    return f"edgesplit generate --adapter {shlex.quote(str(adapter))} --prompt {shlex.quote(prompt or 'your prompt')}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


NO_TARGETS = "n/a (no target tokens)"


def _loss(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:.4f}"


def _round_loss(client: dict[str, Any], index: int) -> str:
    """A client's mean training loss of round `index`, saying how many of its steps had no target token."""
    if index >= len(client["round_losses"]):
        return "-"
    without = client.get("round_steps_without_targets", [0] * (index + 1))[index]
    text = _loss(client["round_losses"][index], NO_TARGETS)
    if without and client["round_losses"][index] is not None:
        text += f" ({without} step{'s' if without > 1 else ''} without target tokens left out)"
    return text


def _fit_lines(fit: dict[str, dict[str, int]], window: int) -> list[str]:
    """What the window did to the data, per side; empty when nothing was cut."""
    lines = []
    for side, counts in fit.items():
        if counts["truncated"] or counts["without_targets"]:
            lines.append(
                f"{side}: {counts['truncated']} of {counts['examples']} examples longer than the {window}-token "
                f"window were cut, {counts['without_targets']} of them to no target token at all (these teach "
                f"and score nothing); the longest has {counts['longest']} tokens"
            )
    return lines


def report_markdown(summary: dict[str, Any]) -> str:
    config, model, metrics = summary["config"], summary["model"], summary["metrics"]
    before, after = summary["before"], summary["after"]
    lines = [
        "# edgesplit demo report",
        "",
        f"{config['clients']} edge clients trained LoRA adapters of `{Path(model['source']).name}` "
        f"({model['family']}, {model['num_layers']} layers) {_split_text(model)} in PyTorch, for "
        f"{config['rounds']} rounds of "
        f"{config['steps_per_round']} steps (batch {model['batch_size']} x {model['max_seq_len']} tokens, "
        f"learning rate {config['learning_rate']:g}, head weights quantize={model['quantize']}). "
        f"Data split: {summary['split']}.",
        "",
        *[f"**Window:** {line}.\n" for line in _fit_lines(summary.get("data_fit", {}), model["max_seq_len"])],
        "## Held-out score (greedy generation with the trained adapter on the whole model)",
        "",
    ]
    if before is None or after is None:
        lines.append("Not scored: the eval data has no prompt/completion examples.")
    else:
        lines += [
            "| | exact match | token accuracy | eval loss |",
            "|---|---|---|---|",
            f"| before training | {_pct(before['exact_match'])} | {_pct(before['token_accuracy'])} | "
            f"{_loss(summary['eval_loss'][0], NO_TARGETS)} |",
            f"| after {config['rounds']} rounds | {_pct(after['exact_match'])} | "
            f"{_pct(after['token_accuracy'])} | "
            f"{_loss(summary['eval_loss'][-1], NO_TARGETS)} |",
            "",
            f"On {after['count']} held-out prompts. Some of them:",
            "",
            "| prompt | target | before | after |",
            "|---|---|---|---|",
        ]
        for old, new in list(zip(before["examples"], after["examples"], strict=True))[:8]:
            lines.append(
                f"| `{old['prompt']}` | `{old['target']}` | `{_cell(old['output'])}` | "
                f"`{_cell(new['output'])}` {'✓' if new['exact'] else '✗'} |"
            )
    lines += [
        "",
        "## Rounds",
        "",
        "| round | eval loss | seconds | of which evaluation | " + " | ".join(metrics["clients"]) + " |",
        "|---|---|---|---|" + "---|" * len(metrics["clients"]),
    ]
    for index, entry in enumerate(metrics["rounds"]):
        train = [_round_loss(c, index) for c in metrics["clients"].values()]
        evaluation = "-" if entry.get("eval_seconds") is None else f"{entry['eval_seconds']:.1f}"
        lines.append(
            f"| {entry['round']} | {_loss(entry['eval_loss'], NO_TARGETS)} | {entry['seconds']:.1f} | {evaluation} | "
            + " | ".join(train)
            + " |"
        )
    lines += [
        "",
        "Client columns: mean training loss of the round, over the steps whose batch had target tokens.",
        "",
        "![loss](plots/loss.png)",
        "",
        "## Clients",
        "",
        "| client | cut | examples by group | steps | real tokens | MB up | MB down | ms/step | peak RSS MB | energy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, client in metrics["clients"].items():
        groups = summary["client_groups"].get(name, {})
        group_text = ", ".join(f"{k} {v}" for k, v in sorted(groups.items()))
        energy = energy_text(client)
        lines.append(
            f"| {name} | {_cut(client, model)} | {group_text} | {client['steps']} | {real_share_text(client)} | "
            f"{client['bytes_up'] / 1e6:.2f} | "
            f"{client['bytes_down'] / 1e6:.2f} | {client['step_mean_s'] * 1000:.0f} | "
            f"{client['peak_rss_mb'] or 0:.0f} | {energy} |"
        )
    server = metrics["server"]
    lines += [
        "",
        f"The server ran {server['steps']} tail steps, received {server['bytes_received'] / 1e6:.2f} MB "
        "and sent "
        f"{server['bytes_sent'] / 1e6:.2f} MB; the clients' own counts "
        f"{'agree byte for byte' if metrics['bytes_agree'] else 'DO NOT agree'}.",
        "",
        "`real tokens`: the share of the tokens each head computed that were the examples' own, not padding, and "
        "how many it computed.",
        "",
        "![bytes per client](plots/bytes.png)",
        "",
        "![client step time by phase](plots/step_time.png)",
        "",
        "`server_compute` is the tail's step as the server timed it; `server_queue` its wait for the one shared "
        "tail (behind the other clients' steps, the averaging and the evaluation); `network` is the rest of the "
        "wait for the answer: the link, and the frames' handling at both ends.",
        "",
        "![client memory](plots/memory.png)",
        "",
        "## Time",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {stage} | {value:.1f} |" for stage, value in summary["seconds"].items()],
        "",
        "## Files",
        "",
        "- `server.jsonl`, `client-*.jsonl`: the metrics every process wrote (JSON Lines)",
        f"- `{Path(summary['checkpoint']).relative_to(Path(config['out']))}/`: the trained adapters "
        "(`global_adapters.safetensors` for the clients' head,\n"
        "  `tail_lora.safetensors` for the server's tail)",
        *(
            [
                f"- `{Path(summary['adapter']).relative_to(Path(config['out']))}/`: the trained model as a PEFT "
                "adapter for the whole base model (docs/adapter.md); try it with\n"
                f"  `{summary['try_adapter']}`",
            ]
            if summary.get("adapter")
            else []
        ),
        "- `artifacts/`: the export (reused by the next demo with the same options)",
        "- `data/`: the generated task and each client's share; `logs/`: every process's output",
        "- `summary.json`: all of the above as numbers",
        "",
    ]
    return "\n".join(lines)


def _split_text(model: dict[str, Any]) -> str:
    cuts, cut, layers = model.get("cut_layers") or [model["cut_layer"]], model["cut_layer"], model["num_layers"]
    if len(cuts) > 1:
        return (
            f"split after layers {', '.join(map(str, cuts))}, each client at its own cut (the Clients table "
            "says which): each client ran its layers in ONNX Runtime, the server the rest"
        )
    return (
        f"split after layer {cut}: each client ran layers 0-{cut - 1} in ONNX Runtime, the server the other "
        f"{layers - cut}"
    )


def _cut(client: dict[str, Any], model: dict[str, Any]) -> str:
    """The layer a client's head ended at: its own in a mixed-cut federation, else the export's."""
    cut = client.get("cut_layer")
    return str(cut if cut is not None else model["cut_layer"])


def _cell(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")[:40]


def terminal_report(summary: dict[str, Any]) -> str:
    config, model, metrics = summary["config"], summary["model"], summary["metrics"]
    before, after = summary["before"], summary["after"]
    out = Path(config["out"])
    lines = [
        "",
        f"edgesplit demo: {config['clients']} clients x {config['rounds']} rounds x "
        f"{config['steps_per_round']} steps, {Path(model['source']).name} cut after layer "
        f"{model['cut_layer']} of {model['num_layers']}; {summary['split']}",
    ]
    if before is not None and after is not None:
        lines.append(
            f"  held-out exact match   {_pct(before['exact_match']):>7} -> {_pct(after['exact_match'])}"
            f"   ({after['count']} prompts, greedy generation)"
        )
        lines.append(
            f"  held-out token accuracy {_pct(before['token_accuracy']):>6} -> {_pct(after['token_accuracy'])}"
        )
        example = next((g for g in after["examples"] if g["exact"]), after["examples"][0])
        lines.append(f"  e.g. {example['prompt']!r} -> {example['output']!r} (target {example['target']!r})")
    lines.append(
        f"  eval loss {_loss(summary['eval_loss'][0], NO_TARGETS)} -> {_loss(summary['eval_loss'][-1], NO_TARGETS)}"
    )
    lines += [f"  WARNING {line}" for line in _fit_lines(summary.get("data_fit", {}), model["max_seq_len"])]
    for name, client in metrics["clients"].items():
        real = real_share_text(client)
        steps = f"{client['steps']} steps" + ("" if real == "-" else f" ({real} tokens real)")
        lines.append(
            f"  {name}: cut {_cut(client, model)}, {steps}, {client['bytes_up'] / 1e6:.1f} MB up, "
            f"{client['bytes_down'] / 1e6:.1f} MB down, {client['step_mean_s'] * 1000:.0f} ms/step, "
            f"peak RSS {client['peak_rss_mb'] or 0:.0f} MB, energy {energy_text(client)}"
        )
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in summary["seconds"].items() if k != "total")
    lines.append(f"  wall time {summary['seconds']['total']:.0f} s ({stages})")
    lines.append(f"  report: {out / 'report.md'}   plots: {out / 'plots'}/   adapters: {summary['checkpoint']}/")
    if summary.get("adapter"):
        lines.append(f"  your model, as a PEFT adapter: {summary['adapter']}/")
        lines.append(f"  try it: {summary['try_adapter']}")
    return "\n".join(lines)
