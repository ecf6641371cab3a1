"""The report of a mixed-cut federation shows each device's cut beside its time per step, memory and bytes."""

from __future__ import annotations

import json
from pathlib import Path

from edgesplit.server.report import collect, report_markdown, terminal_report


def write(path: Path, records: list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_each_client_is_reported_at_its_own_cut(tmp_path: Path) -> None:
    server = [
        {"event": "step", "client_id": "pi4", "round": 0, "step": 0, "loss": 2.0, "cut_layer": 2},
        {"event": "step", "client_id": "orin", "round": 0, "step": 0, "loss": 2.5, "cut_layer": 8},
        {"event": "round", "round": 0, "eval_loss": 1.5, "seconds": 2.0, "clients": ["orin", "pi4"]},
        {"event": "finished", "bytes_received": {"pi4": 10, "orin": 20}, "bytes_sent": {"pi4": 5, "orin": 6}},
    ]
    write(tmp_path / "server.jsonl", server)
    for number, (name, up, down, seconds, peak) in enumerate([("pi4", 10, 5, 0.3, 180.0), ("orin", 20, 6, 0.9, 420.0)]):
        step = {"event": "step", "round": 0, "loss": 2.0, "bytes_up": up, "bytes_down": down,
                "seconds": {"head_forward": seconds}}  # fmt: skip
        summary = {"event": "summary", "client_id": name, "bytes_up": up, "bytes_down": down, "peak_rss_mb": peak}
        write(tmp_path / f"client-{number}.jsonl", [step, summary])
    metrics = collect(tmp_path)
    assert {name: client["cut_layer"] for name, client in metrics["clients"].items()} == {"pi4": 2, "orin": 8}
    summary = {
        "config": {"clients": 2, "rounds": 1, "steps_per_round": 1, "learning_rate": 0.1, "out": str(tmp_path)},
        "model": {"source": "m", "family": "llama", "num_layers": 30, "cut_layer": 2, "cut_layers": [2, 8],
                  "batch_size": 1, "max_seq_len": 16, "quantize": "none"},
        "split": "IID", "data_fit": {}, "client_groups": {}, "seconds": {"total": 1.0}, "before": None,
        "after": None, "eval_loss": [None, 1.5], "metrics": metrics,
        "checkpoint": str(tmp_path / "checkpoints" / "round-0001"), "plots": [],
    }  # fmt: skip
    markdown, terminal = report_markdown(summary), terminal_report(summary)
    assert "| pi4 | 2 |" in markdown and "| orin | 8 |" in markdown
    assert "pi4: cut 2," in terminal and "orin: cut 8," in terminal
    assert "900 ms/step" in terminal and "peak RSS 420 MB" in terminal
