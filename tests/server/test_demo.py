"""`edgesplit demo` end to end on a tiny model: real export reuse, real server and client processes, the
report, and Ctrl-C leaving nothing running."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from edgesplit.client.metrics import read_jsonl
from edgesplit.server.demo import (
    RUN_MARKER,
    DemoConfig,
    DemoError,
    artifacts_mismatch,
    export_command,
    prepare_data,
    prepare_run_dir,
)

CLIENTS, ROUNDS, STEPS = 2, 2, 3
TRAIN_EXAMPLES, EVAL_EXAMPLES = 40, 6


def demo_flags(model_dir: Path, out: Path, rounds: int = ROUNDS, steps: int = STEPS) -> list[str]:
    # The tiny_artifacts fixture's export options: the demo must find them matching and reuse the export.
    return [
        "--model", str(model_dir), "--task", "shape-codes-w", "--cut-layer", "1", "--batch-size", "2",
        "--max-seq-len", "16", "--lora-rank", "4", "--clients", str(CLIENTS), "--rounds", str(rounds),
        "--steps-per-round", str(steps), "--train-examples", str(TRAIN_EXAMPLES),
        "--eval-examples", str(EVAL_EXAMPLES), "--out", str(out), "--dynamic-seq",
    ]  # fmt: skip


@pytest.fixture
def run_dir(tiny_artifacts, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    # One head for every length up to the window (demo_flags asks for it; the default with --data).
    shutil.copytree(tiny_artifacts("llama", 1, dynamic_seq=True), out / "artifacts")
    return out


def demo_command(flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "edgesplit.cli", "demo", *flags]


def test_demo_runs_end_to_end_and_writes_a_consistent_run_directory(run_dir, tiny_model_dirs) -> None:  # type: ignore[no-untyped-def]
    # Leftovers of an earlier run must not leak in (a stale checkpoint would make the server resume).
    (run_dir / RUN_MARKER).write_text("")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "latest").write_text("round-0099")
    (run_dir / "client-7.jsonl").write_text("{}\n")

    done = subprocess.run(
        demo_command(demo_flags(tiny_model_dirs["llama"], run_dir)),
        capture_output=True, text=True, timeout=300, cwd=run_dir.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "reusing" in done.stdout
    assert "held-out exact match" in done.stdout
    assert f"try it: edgesplit generate --adapter {run_dir / 'adapter'} --prompt " in done.stdout
    # What the window does to each side's data is said, before training.
    assert "train data in the 16-token window" in done.stdout and "eval data in the 16-token window" in done.stdout

    expected = [
        "report.md",
        "summary.json",
        "server.jsonl",
        "logs/server.log",
        "data/train.jsonl",
        "data/eval.jsonl",
    ]
    expected += [f"{kind}client-{i}.{ext}" for i in range(CLIENTS) for kind, ext in (("", "jsonl"), ("logs/", "log"))]
    for name in expected:
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "client-7.jsonl").exists()
    for plot in ("loss", "bytes", "step_time", "memory"):
        assert (run_dir / "plots" / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The clients' shares partition the training set.
    shares = [(run_dir / "data" / f"client-{i}.jsonl").read_text().splitlines() for i in range(CLIENTS)]
    assert sorted(line for share in shares for line in share) == sorted(
        (run_dir / "data" / "train.jsonl").read_text().splitlines()
    )

    # Metrics add up: every step once on each side, every byte counted by both ends.
    server = read_jsonl(run_dir / "server.jsonl")
    assert sum(r["event"] == "step" for r in server) == CLIENTS * ROUNDS * STEPS
    assert [r["round"] for r in server if r["event"] == "round"] == list(range(ROUNDS))
    joined = {r["client_id"]: r["num_samples"] for r in server if r["event"] == "join"}
    assert joined == {f"client-{i}": len(shares[i]) for i in range(CLIENTS)}
    finished = next(r for r in server if r["event"] == "finished")
    clients = [read_jsonl(run_dir / f"client-{i}.jsonl") for i in range(CLIENTS)]
    summaries = [next(r for r in records if r["event"] == "summary") for records in clients]
    assert [sum(r["event"] == "step" for r in records) for records in clients] == [ROUNDS * STEPS] * CLIENTS
    assert sum(finished["bytes_received"].values()) == sum(s["bytes_up"] for s in summaries)
    assert sum(finished["bytes_sent"].values()) == sum(s["bytes_down"] for s in summaries)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["bytes_agree"] is True
    assert len(summary["eval_loss"]) == ROUNDS + 1 and all(math.isfinite(v) for v in summary["eval_loss"])
    for key in ("before", "after"):
        assert summary[key]["count"] == EVAL_EXAMPLES
        assert 0.0 <= summary[key]["exact_match"] <= 1.0 and 0.0 <= summary[key]["token_accuracy"] <= 1.0
    assert set(summary["seconds"]) == {"export", "score_before", "train", "score_after", "total"}

    # The trained adapters are the server's final checkpoint, and training moved them.
    checkpoint = Path(summary["checkpoint"])
    assert checkpoint.name == f"round-{ROUNDS:04d}"
    from safetensors.numpy import load_file

    adapters = load_file(str(checkpoint / "global_adapters.safetensors"))
    assert any(abs(value).max() > 0 for name, value in adapters.items() if name.endswith(".lora_B"))
    assert (checkpoint / "tail_lora.safetensors").is_file()

    # The trained model as a PEFT adapter, where the summary and the report say, with the command to try it.
    assert summary["adapter"] == str(run_dir / "adapter") and (run_dir / "adapter" / "adapter_config.json").is_file()
    assert summary["try_adapter"].startswith(f"edgesplit generate --adapter {run_dir / 'adapter'} --prompt ")

    # Each client's head computed its batches at their own lengths, grouped by length (the demo's default):
    # fewer tokens than the window's, and no fewer than the batches' real ones.
    for s in summaries:
        assert s["dynamic_seq"] is True and s["group_by_length"] is True
        assert 0 < s["real_tokens"] <= s["computed_tokens"] < ROUNDS * STEPS * 2 * 16
    report = (run_dir / "report.md").read_text()
    assert "## Held-out score" in report and "plots/loss.png" in report
    real_share = f"{100 * summaries[0]['real_tokens'] / summaries[0]['computed_tokens']:.0f}% of "
    assert f"| {ROUNDS * STEPS} | {real_share}{summaries[0]['computed_tokens']:,} |" in report
    assert f"{ROUNDS * STEPS} steps ({real_share}{summaries[0]['computed_tokens']:,} tokens real)" in done.stdout
    assert f"`{summary['try_adapter']}`" in report
    assert "agree byte for byte" in report


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_stops_every_process_the_demo_started(run_dir, tiny_model_dirs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Also when the demo starts with SIGINT ignored, as a non-interactive shell starts its background jobs
    (this test's process may be one: the demo inherits what it ignores)."""
    log = (tmp_path / "demo.out").open("w")
    # Far more rounds than the test waits for: the demo is interrupted mid-training.
    demo = subprocess.Popen(
        demo_command(demo_flags(tiny_model_dirs["llama"], run_dir, rounds=500, steps=20)),
        stdout=log, stderr=subprocess.STDOUT, cwd=run_dir.parent,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `demo &` in a script starts it
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "server.jsonl"
        while not (metrics.exists() and '"event": "step"' in metrics.read_text()):
            assert demo.poll() is None, (tmp_path / "demo.out").read_text()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        children = descendants(demo.pid)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert "serve" in names and names.count(" client ") == CLIENTS, names

        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(timeout=60)
        except subprocess.TimeoutExpired:  # say what was still running and what the demo last printed
            alive = [" ".join(c.cmdline()[:4]) for c in children if not gone(c)]
            tail = (tmp_path / "demo.out").read_text()[-3000:]
            status = Path(f"/proc/{demo.pid}/status")
            lines = status.read_text().splitlines() if status.exists() else []
            signals = [line for line in lines if line.startswith("Sig")]
            pytest.fail(f"the demo did not exit within 60 s of Ctrl-C; still running: {alive}; {signals}\n{tail}")
        assert code == 130
    finally:
        if demo.poll() is None:  # the test failed: do not leave the demo behind either
            demo.kill()
            demo.wait()
        log.close()
    output = (tmp_path / "demo.out").read_text()
    assert "interrupted" in output and "stopped" in output
    survivors = [c for c in children if not gone(c)]
    assert not survivors, [c.cmdline() for c in survivors]
    # Every child ran in its own process group: no group of theirs has a member left either.
    for child in children:
        with pytest.raises(ProcessLookupError):
            os.killpg(child.pid, 0)


def test_exported_artifacts_are_reused_only_when_they_match(tiny_artifacts, tiny_model_dirs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1, dynamic_seq=True)
    model = str(tiny_model_dirs["llama"])
    matching = DemoConfig(out=tmp_path, model=model, cut_layer=1, batch_size=2, max_seq_len=16, lora_rank=4,
                          dynamic_seq=True)  # fmt: skip
    assert artifacts_mismatch(matching, artifacts) is None
    # A fixed-length export is taken only for a demo that wants one: the generated task's, by default.
    fixed = tiny_artifacts("llama", 1)
    assert "dynamic_seq False instead of True" in (artifacts_mismatch(matching, fixed) or "")
    assert artifacts_mismatch(replace(matching, dynamic_seq=None), fixed) is None
    assert "dynamic_seq True instead of False" in (
        artifacts_mismatch(replace(matching, dynamic_seq=None), artifacts) or ""
    )
    other_cut = DemoConfig(out=tmp_path, model=model, cut_layer=2, batch_size=2, max_seq_len=16, lora_rank=4)
    assert "cut_layer 1 instead of 2" in (artifacts_mismatch(other_cut, artifacts) or "")
    other_model = DemoConfig(out=tmp_path, model=str(tiny_model_dirs["gpt2"]), cut_layer=1, batch_size=2,
                             max_seq_len=16, lora_rank=4)  # fmt: skip
    assert "exported from" in (artifacts_mismatch(other_model, artifacts) or "")
    assert "does not exist" in (artifacts_mismatch(matching, tmp_path / "nothing") or "")
    # compare's whole-model export (FedLLM, KD) goes through the same check.
    whole = tiny_artifacts("llama", 1, full_model=True)
    assert artifacts_mismatch(matching, whole, full_model=True) is None
    assert "full_model False instead of True" in (artifacts_mismatch(matching, fixed, full_model=True) or "")
    assert "full_model True instead of False" in (artifacts_mismatch(matching, whole) or "")


def test_export_arguments_are_ones_the_exporter_accepts(tmp_path: Path) -> None:
    from edgesplit.export.cli import build_parser

    own_data = tmp_path / "data.jsonl"
    config = DemoConfig(out=tmp_path, cut_layer=3, quantize="int8", max_seq_len=24, lora_rank=4, data=own_data,
                        eval_data=own_data)  # fmt: skip
    args = build_parser().parse_args(export_command(config, tmp_path / "artifacts").argv()[1:])
    assert (args.cut_layer, args.quantize, args.max_seq_len, args.lora_rank, args.lora_alpha) == (
        3,
        "int8",
        24,
        4,
        8.0,
    )
    assert args.force and args.dynamic_seq  # one head for every length, by default with own data
    generated = replace(config, data=None, eval_data=None)  # whose examples fill the window: a fixed head
    assert not build_parser().parse_args(export_command(generated, tmp_path / "g").argv()[1:]).dynamic_seq
    assert not generated.clients_group_by_length
    whole = build_parser().parse_args(export_command(config, tmp_path / "full", full_model=True).argv()[1:])
    assert whole.full_model and whole.cut_layer is None and not whole.dynamic_seq
    # A U-shaped split has fixed shapes: the demo exports it so, and refuses to be told otherwise.
    u_shaped = replace(config, top_layers=1)
    assert not build_parser().parse_args(export_command(u_shaped, tmp_path / "u").argv()[1:]).dynamic_seq
    assert not u_shaped.clients_group_by_length
    with pytest.raises(DemoError, match="--dynamic-seq and --top-layers"):
        replace(u_shaped, dynamic_seq=True)
    fixed = replace(config, dynamic_seq=False)
    assert not build_parser().parse_args(export_command(fixed, tmp_path / "f").argv()[1:]).dynamic_seq
    assert not fixed.clients_group_by_length  # grouping saves nothing with a fixed-length head


def write_lines(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_own_data_is_split_by_its_group_key_or_else_iid(tmp_path: Path) -> None:
    records = [{"prompt": f"w{i}", "completion": f"w{i + 1}", "group": "ab"[i % 2]} for i in range(20)]
    grouped = write_lines(tmp_path / "grouped.jsonl", records)
    plain = write_lines(tmp_path / "plain.jsonl", [{k: r[k] for k in ("prompt", "completion")} for r in records])
    evaluation = write_lines(tmp_path / "eval.jsonl", records[:3])

    data = prepare_data(DemoConfig(out=tmp_path / "a", clients=3, data=grouped, eval_data=evaluation, alpha=0.3))
    assert data.split.startswith("non-IID") and data.group_names == ["a", "b"]
    assert sum(sum(groups.values()) for groups in data.client_groups) == 20
    assert len(data.eval_examples) == 3

    data = prepare_data(DemoConfig(out=tmp_path / "b", clients=3, data=plain, eval_data=evaluation))
    assert "IID" in data.split and 'no "group" key' in data.split
    lines = [line for path in data.client_files for line in path.read_text().splitlines()]
    assert len(lines) == 20


def test_own_data_needs_its_eval_data(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="go together"):
        DemoConfig(out=tmp_path, data=tmp_path / "train.jsonl")


def test_a_directory_that_is_not_a_demo_run_is_never_cleared(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.jsonl").write_text("{}\n")
    with pytest.raises(DemoError, match="not an edgesplit demo run directory"):
        prepare_run_dir(tmp_path)
    assert (tmp_path / "data" / "precious.jsonl").exists()

    run = tmp_path / "run"
    (run / "artifacts").mkdir(parents=True)  # an export placed there beforehand is fine, and kept
    prepare_run_dir(run)
    (run / "logs").mkdir()
    prepare_run_dir(run)  # now a demo's: cleared again without complaint
    assert (run / "artifacts").is_dir() and not (run / "logs").exists()


def test_the_window_is_sized_from_own_data_or_refused_naming_the_length(run_dir, tiny_model_dirs, capsys) -> None:  # type: ignore[no-untyped-def]
    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.data import load_tokenizer, read_jsonl, sequence_lengths
    from edgesplit.server.demo import size_window

    # 19 short examples and one very long one: the window holds the short ones, not the outlier.
    records = [{"prompt": f"item {i}", "completion": " ".join(["alpha beta"] * 20)} for i in range(19)]
    records.append({"prompt": "long", "completion": " ".join(["alpha beta"] * 400)})
    train = write_lines(run_dir.parent / "train.jsonl", records)
    evaluation = write_lines(run_dir.parent / "eval.jsonl", records[:2])
    model = str(tiny_model_dirs["llama"])

    sized = size_window(DemoConfig(out=run_dir, model=model, data=train, eval_data=evaluation))
    assert sized.max_seq_len is not None and sized.max_seq_len % 16 == 0
    eos_token_id = load_manifest(run_dir / "artifacts", verify=False).eos_token_id
    lengths = sequence_lengths(load_tokenizer(run_dir / "artifacts"), read_jsonl(train), eos_token_id)
    assert lengths.truncated(sized.max_seq_len) == 1  # the outlier alone is cut
    assert lengths.truncated(sized.max_seq_len - 16) > 1  # and no shorter window would do
    # Counted, not a share rounded up to 100% beside a longest example that does not fit.
    assert f"holds 21 of your 22 examples whole (the longest has {max(lengths.total)})" in capsys.readouterr().out

    with pytest.raises(DemoError, match=rf"--max-seq-len {sized.max_seq_len}\b"):
        size_window(DemoConfig(out=run_dir, model=model, data=train, eval_data=evaluation, max_seq_len_cap=8))
    # The user's own --max-seq-len, and the generated task's window, are kept as they are.
    own = DemoConfig(out=run_dir, model=model, data=train, eval_data=evaluation, max_seq_len=8)
    assert size_window(own).max_seq_len == 8
    assert size_window(DemoConfig(out=run_dir, model=model)).max_seq_len == 16


def test_eval_examples_scores_the_first_lines_of_own_eval_data(tmp_path: Path) -> None:
    records = [{"prompt": f"w{i}", "completion": f"w{i + 1}"} for i in range(10)]
    train = write_lines(tmp_path / "train.jsonl", records)
    # A second reference for w3, as E2E gives: the same input, counted once, both lines kept.
    second_reference = {"prompt": "w3", "completion": "w9"}
    evaluation = write_lines(tmp_path / "eval.jsonl", [records[3], second_reference, *records[4:]])

    data = prepare_data(DemoConfig(out=tmp_path / "a", data=train, eval_data=evaluation, eval_examples=2))
    assert [(e.prompt, e.completion) for e in data.eval_examples] == [("w3", "w4"), ("w3", "w9"), ("w4", "w5")]
    assert len(data.eval.read_text().splitlines()) == 3  # the server's per-round evaluation sees the same lines
    data = prepare_data(DemoConfig(out=tmp_path / "b", data=train, eval_data=evaluation))
    assert len(data.eval_examples) == 8  # by default every line


def test_a_line_separator_inside_a_json_string_stays_in_its_line(tmp_path: Path) -> None:
    from edgesplit.server.demo import read_records

    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a\u2028b", "completion": "c\u0085d"}\n{"text": "e"}\n', encoding="utf-8")
    assert read_records(path) == [{"prompt": "a\u2028b", "completion": "c\u0085d"}, {"text": "e"}]


def test_round_means_leave_out_the_steps_without_target_tokens() -> None:
    from edgesplit.server.report import round_means

    steps = [
        {"round": 0, "loss": 2.0},
        {"round": 0, "loss": None},
        {"round": 0, "loss": 4.0},
        {"round": 1, "loss": None},
    ]
    assert round_means(steps) == ([3.0, None], [1, 1], [3, 1])


def test_the_report_says_no_number_where_there_were_no_target_tokens_and_where_energy_comes_from() -> None:
    from edgesplit.server.report import energy_text, report_markdown, terminal_report

    client = {
        "steps": 2, "losses": [None, 1.0], "round_losses": [1.0], "round_steps_without_targets": [1],
        "round_ends": [2], "bytes_up": 0, "bytes_down": 0, "step_mean_s": 0.1, "peak_rss_mb": 10.0,
        "energy_j": 144.9, "energy_method": "estimated", "energy_source": "estimate:laptop profile (guessed)",
    }  # fmt: skip
    fit = {"examples": 4, "truncated": 4, "without_targets": 4, "longest": 90}
    summary = {
        "config": {"clients": 1, "rounds": 1, "steps_per_round": 2, "learning_rate": 0.1, "out": "run"},
        "model": {"source": "m", "family": "llama", "num_layers": 2, "cut_layer": 1, "batch_size": 1,
                  "max_seq_len": 16, "quantize": "none"},
        "split": "IID", "data_fit": {"train": fit, "eval": fit}, "client_groups": {},
        "seconds": {"total": 1.0}, "before": None, "after": None, "eval_loss": [None, None],
        "metrics": {"rounds": [{"round": 1, "eval_loss": None, "seconds": 1.0, "clients": 1}],
                    "clients": {"client-0": client},
                    "server": {"steps": 2, "bytes_received": 0, "bytes_sent": 0}, "bytes_agree": True},
        "checkpoint": "run/checkpoints/round-0001", "plots": [],
    }  # fmt: skip

    assert energy_text(client) == "144.9 J (estimated from the guessed laptop profile, not measured)"
    markdown, terminal = report_markdown(summary), terminal_report(summary)
    assert "0.0000" not in markdown and "0.0000" not in terminal
    assert "eval loss n/a (no target tokens) -> n/a (no target tokens)" in terminal
    assert "1.0000 (1 step without target tokens left out)" in markdown
    assert "4 of 4 examples longer than the 16-token window were cut" in markdown
    assert "WARNING eval: 4 of 4" in terminal
    assert "guessed laptop profile" in markdown
