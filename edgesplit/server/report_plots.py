"""The demo report's four PNG plots, from the metrics edgesplit.server.report collects; matplotlib's Agg backend,
so no display is needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# A step's phases on the client. The server's time is two: its queue (behind other clients' steps and the
# round's evaluation) and the tail's compute, as the server measured them; `network` is the rest of the wait.
PHASES = (
    "head_forward",
    "encode",
    "network",
    "server_queue",
    "server_compute",
    "decode",
    "grad_graph",
    "optimizer",
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, figure: Any, path: Path, **options: Any) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110, **options)
    plt.close(figure)


def _scale(series: Any) -> str:
    """Log scale where the losses span decades (a task being learned), linear where they hardly move."""
    values = [v for losses in series for v in losses if v is not None and v > 0]
    return "log" if values and max(values) / min(values) > 20 else "linear"


def plot_loss(path: Path, metrics: dict[str, Any], before_loss: float | None) -> None:
    plt = _pyplot()
    figure, (per_step, per_round) = plt.subplots(1, 2, figsize=(11, 4))
    for client_id, client in metrics["clients"].items():
        per_step.plot(range(1, len(client["losses"]) + 1), client["losses"], label=client_id, linewidth=1.2)
        per_round.plot(
            range(1, len(client["round_losses"]) + 1),
            client["round_losses"],
            marker="o",
            linestyle=":",
            label=f"{client_id} train (mean)",
        )
    per_step.set(
        title="training loss per step (from the tail)",
        xlabel="client's step",
        ylabel="loss",
        yscale=_scale(c["losses"] for c in metrics["clients"].values()),
    )
    # Dotted verticals where each round ends: the adapters are averaged there, and the loss may jump.
    ends: list[int] = next((c["round_ends"] for c in metrics["clients"].values() if c.get("round_ends")), [])
    for number, end in enumerate(ends[:-1], start=1):
        per_step.axvline(end + 0.5, color="grey", linestyle=":", linewidth=1)
        per_step.annotate(
            f"end of round {number}", (end + 0.5, 1), xycoords=("data", "axes fraction"),
            rotation=90, va="top", ha="right", fontsize=7, color="grey",
        )  # fmt: skip
    per_step.legend()
    evals = [(r["round"], r["eval_loss"]) for r in metrics["rounds"] if r["eval_loss"] is not None]
    if before_loss is not None:
        evals.insert(0, (0, before_loss))
    if evals:
        per_round.plot(*zip(*evals, strict=True), marker="s", color="black", linewidth=2, label="held-out eval")
    per_round.set(
        title="loss per round (0 = untrained)",
        xlabel="round",
        ylabel="loss",
        yscale=_scale([[loss for _, loss in evals]]),
    )
    per_round.set_xticks(range(0, len(metrics["rounds"]) + 1))
    per_round.legend(fontsize=8)
    _save(plt, figure, path)


def plot_bytes(path: Path, metrics: dict[str, Any]) -> None:
    plt = _pyplot()
    names = list(metrics["clients"])
    up = [metrics["clients"][n]["bytes_up"] / 1e6 for n in names]
    down = [metrics["clients"][n]["bytes_down"] / 1e6 for n in names]
    figure, axes = plt.subplots(figsize=(6.5, 4))
    positions = range(len(names))
    bars_up = axes.bar([p - 0.2 for p in positions], up, width=0.4, label="up (activations, adapters)")
    bars_down = axes.bar([p + 0.2 for p in positions], down, width=0.4, label="down (gradients, adapters)")
    axes.bar_label(bars_up, fmt="%.1f", fontsize=8)
    axes.bar_label(bars_down, fmt="%.1f", fontsize=8)
    axes.set_xticks(list(positions), names)
    axes.set(title="bytes on the link per client", ylabel="MB", ylim=(0, max(up + down, default=1) * 1.3))
    axes.legend(loc="upper center", ncol=2, fontsize=8)
    _save(plt, figure, path)


def plot_step_time(path: Path, metrics: dict[str, Any]) -> None:
    """Grouped bars per phase and client, on a log axis when the phases span orders of magnitude (a stacked
    bar hides a 2 ms phase beside a 2 s one), and the numbers themselves in a table beside them."""
    plt = _pyplot()
    names = list(metrics["clients"])
    means = {n: [metrics["clients"][n]["phase_mean_s"][p] * 1000 for p in PHASES] for n in names}
    positive = [v for values in means.values() for v in values if v > 0]
    log_scale = bool(positive) and max(positive) / min(positive) > 50
    figure, (axes, table_axes) = plt.subplots(
        1, 2, figsize=(12, 1.8 + 0.45 * len(PHASES)), gridspec_kw={"width_ratios": [3, 2]}
    )
    height = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        positions = [p + index * height for p in range(len(PHASES))]
        axes.barh(positions, [max(v, 1e-3) if log_scale else v for v in means[name]], height=height, label=name)
    axes.set_yticks([p + 0.4 - height / 2 for p in range(len(PHASES))], PHASES)
    axes.set(
        title="client step time by phase (mean per step)",
        xlabel="ms (log scale)" if log_scale else "ms",
        xscale="log" if log_scale else "linear",
    )
    axes.invert_yaxis()
    axes.legend(fontsize=7)
    table_axes.axis("off")
    rows = [[f"{v:.1f}" for v in means[n]] + [f"{sum(means[n]):.0f}"] for n in names]
    if rows:
        table = table_axes.table(
            cellText=[list(column) for column in zip(*rows, strict=True)],
            rowLabels=[*PHASES, "step"],
            colLabels=names,
            loc="upper center",  # under its title, level with the chart's top
        )
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table_axes.set_title("ms per step", fontsize=9)
    _save(plt, figure, path, bbox_inches="tight")


def plot_memory(path: Path, metrics: dict[str, Any]) -> None:
    plt = _pyplot()
    names = list(metrics["clients"])
    figure, axes = plt.subplots(figsize=(6.5, 4))
    series = (("baseline_rss_mb", "at start"), ("steady_rss_mb", "steady"), ("peak_rss_mb", "peak"))
    for offset, (key, label) in zip((-0.27, 0.0, 0.27), series, strict=True):
        values = [metrics["clients"][n][key] or 0.0 for n in names]
        bars = axes.bar([i + offset for i in range(len(names))], values, width=0.27, label=label)
        axes.bar_label(bars, fmt="%.0f", fontsize=7)
    axes.set_xticks(range(len(names)), names)
    peak = max((metrics["clients"][n]["peak_rss_mb"] or 0.0 for n in names), default=1.0)
    axes.set(title="client process memory (RSS)", ylabel="MB", ylim=(0, peak * 1.3))
    axes.legend(loc="upper center", ncol=3, fontsize=8)
    _save(plt, figure, path)
