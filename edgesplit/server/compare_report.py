"""compare's outputs: compare.csv, compare.json, compare.md and plots/compare.png, from the results of
edgesplit.server.compare (one dict of figures per framework). No I/O but the files it writes, and nothing
from compare itself: compare imports this module.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

COLUMNS = [  # (csv key, markdown header, format)
    ("framework", "framework", "{}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("bleu", "BLEU-4", "{:.2f}"),
    ("chrf", "chrF", "{:.2f}"),
    ("nist", "NIST", "{:.2f}"),
    ("rouge_l", "ROUGE-L F1", "{:.4f}"),
    ("exact_match", "exact match", "{:.1%}"),
    ("bytes_up_per_client_round", "up / client / round (B)", "{:,.0f}"),
    ("analytic_up", "analytic up (B)", "{:,}"),
    ("up_vs_analytic", "up vs analytic", "{:+.2%}"),
    ("bytes_down_per_client_round", "down / client / round (B)", "{:,.0f}"),
    ("analytic_down", "analytic down (B)", "{:,}"),
    ("down_vs_analytic", "down vs analytic", "{:+.2%}"),
    ("bytes_up_total", "up total, all clients (B)", "{:,}"),
    ("bytes_down_total", "down total, all clients (B)", "{:,}"),
    ("client_flops_per_step", "client GFLOP / step", "{:.1e}"),
    ("client_seconds_per_step", "client s / step (median)", "{:.3f}"),
    ("peak_rss_mb", "client peak RSS (MB)", "{:.0f}"),
    ("energy_j_per_client", "energy / client (J)", "{:.1f}"),
    ("energy_label", "energy is", "{}"),
]


def _cell(value: Any, form: str) -> str:
    if value is None:
        return "-"
    if form == "{:.1e}":
        return f"{value / 1e9:.2f}"
    return form.format(value)


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float] | None:
    if "split" not in results or "fedllm" not in results:
        return None
    s, f = results["split"], results["fedllm"]
    return {
        "layers (cut / L)": s["layers_on_device"] / s["num_layers"],
        "client FLOPs": s["client_flops_per_step"] / f["client_flops_per_step"],
        "client time per step": s["client_seconds_per_step"] / f["client_seconds_per_step"],
        "client peak memory": s["peak_rss_mb"] / f["peak_rss_mb"],
    }


def write_comparison(
    out: Path,
    results: dict[str, dict[str, Any]],
    command: str,
    seconds: float,
    notes: list[str],
    about: dict[str, Any],
    caption: str = "",
) -> str:
    """compare.csv, compare.json (with `about`), compare.md (`caption`: the run's settings; the table, then
    `notes`, then the plot) and plots/compare.png into `out`; returns the markdown table."""
    columns = [c for c in COLUMNS if any(c[0] in r for r in results.values())]
    with (out / "compare.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([c[0] for c in columns])
        for r in results.values():
            writer.writerow([r.get(c[0]) for c in columns])
    summary = {"command": command, "seconds": seconds, "results": results, **about}
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=str))
    lines = [f"| {' | '.join(h for _, h, _ in columns)} |", "|" + "---|" * len(columns)]
    for r in results.values():
        lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |")
    ratio = ratios(results)
    if ratio:
        lines += ["", "split / fedllm: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items())]
    lines += ["", *notes]
    table = "\n".join(lines)
    settings = f"{caption}\n\n" if caption else ""
    (out / "compare.md").write_text(
        f"# edgesplit compare\n\n`{command}`\n\n{settings}wall time {seconds:.0f} s\n\n{table}\n\n"
        "![loss, traffic, client compute, time, memory and task score per framework](plots/compare.png)\n"
    )
    plot_compare(out / "plots" / "compare.png", results, caption)
    return table


PANELS = [  # (title, result key, y-axis label, log scale)
    ("held-out eval loss", "eval_loss", "loss (lower is better)", False),
    ("bytes up per client per round", "bytes_up_per_client_round", "bytes (log scale)", True),
    ("client compute per step", "client_flops_per_step", "GFLOP", False),
    ("client time per step (median)", "client_seconds_per_step", "seconds", False),
    ("client peak memory", "peak_rss_mb", "RSS (MB)", False),
]
COLORS = {"split": "tab:blue", "fedllm": "tab:orange", "kd": "tab:green"}


def run_caption(config: Any) -> str:
    """The settings a reader of the plot needs, in one line, from an edgesplit.server.compare.CompareConfig."""
    return (
        f"{Path(config.model).name}: {config.clients} clients x {config.rounds} rounds x {config.steps_per_round} "
        f"steps, batch {config.batch_size} x {config.max_seq_len} tokens, split cut at layer {config.cut_layer}, "
        f"LoRA rank {config.lora_rank}, learning rate {config.learning_rate:g}, {config.partition} partition, "
        f"{config.eval_examples} eval inputs"
    )


def plot_compare(path: Path, results: dict[str, dict[str, Any]], caption: str = "") -> None:
    """compare's charts on a 2 x 3 grid: one panel per figure, one bar per framework, values on the bars,
    the task score (BLEU-4, chrF and ROUGE-L, or exact match) in the last panel, `caption` (the run's settings)
    above them all."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    names = list(results)
    colors = [COLORS.get(n, "tab:gray") for n in names]
    figure, grid = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = list(grid.flat)
    for axis, (title, key, label, log_scale) in zip(axes, PANELS, strict=False):
        values = [results[n].get(key) or 0.0 for n in names]
        if key == "client_flops_per_step":
            values = [v / 1e9 for v in values]
        bars = axis.bar(names, values, color=colors)
        axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set(title=title, xlabel="framework", ylabel=label)
        if log_scale and all(v > 0 for v in values):
            axis.set_yscale("log")
        axis.margins(y=0.15)
    score_panel(axes[len(PANELS)], results, names)
    if caption:
        figure.suptitle(caption, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def score_panel(axis: Any, results: dict[str, dict[str, Any]], names: list[str]) -> None:
    """BLEU-4, chrF and ROUGE-L (x 100) side by side per framework (a text task), or exact match (codes), all
    on a 0-100 scale."""
    text_metrics = (("bleu", "BLEU-4", 1.0), ("chrf", "chrF", 1.0), ("rouge_l", "ROUGE-L F1 x 100", 100.0))
    metrics = [(key, header, scale) for key, header, scale in text_metrics if any(key in results[n] for n in names)]
    if not metrics:
        metrics = [("exact_match", "exact match (%)", 100.0)]
    width = 0.8 / len(metrics)
    for index, (key, header, scale) in enumerate(metrics):
        positions = [p + (index - (len(metrics) - 1) / 2) * width for p in range(len(names))]
        # Colours of their own: the framework colours of the other panels would read as frameworks here.
        color = ("tab:purple", "tab:gray", "tab:olive")[index]
        values = [(results[n].get(key) or 0.0) * scale for n in names]
        bars = axis.bar(positions, values, width=width, label=header, color=color)
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(range(len(names)), names)
    axis.set(title="task score on the held-out inputs", xlabel="framework", ylabel="score (0-100, higher is better)")
    axis.set_ylim(0, 110)
    axis.legend(fontsize=8)
