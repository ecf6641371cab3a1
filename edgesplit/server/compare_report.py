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
    ("bleu", "BLEU-4", "{:.4f}"),
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
) -> str:
    """compare.csv, compare.json (with `about`), compare.md (the table, then `notes`) and plots/compare.png
    into `out`; returns the markdown table."""
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
    (out / "compare.md").write_text(f"# edgesplit compare\n\n`{command}`\n\nwall time {seconds:.0f} s\n\n{table}\n")
    plot_compare(out / "plots" / "compare.png", results)
    return table


def plot_compare(path: Path, results: dict[str, dict[str, Any]]) -> None:
    """compare's bar charts: one panel per figure, one bar per framework."""
    import matplotlib

    matplotlib.use("Agg")  # no display
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [
        ("eval loss", "eval_loss"),
        ("bytes up / client / round", "bytes_up_per_client_round"),
        ("client GFLOP / step", "client_flops_per_step"),
        ("client s / step", "client_seconds_per_step"),
        ("client peak RSS (MB)", "peak_rss_mb"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for axis, (title, key) in zip(axes, panels, strict=True):
        values = [results[n].get(key) or 0.0 for n in names]
        if key == "client_flops_per_step":
            values = [v / 1e9 for v in values]
        axis.bar(names, values, color=["tab:blue", "tab:orange", "tab:green"][: len(names)])
        axis.set_title(title)
        if key == "bytes_up_per_client_round":
            axis.set_yscale("log")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)  # the size compare.md has always shown
    plt.close(figure)
