"""The client as a command: what it refuses before it connects, how it backs off, what it leaves on disk."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

from edgesplit.client.client import backoff_delays, main_summary

EDGESPLIT = [sys.executable, "-m", "edgesplit.cli"]


def test_a_malformed_data_line_stops_the_client_before_it_connects(tiny_artifacts, tmp_path: Path) -> None:
    # With --group-by-length on a head traced for one length, the client first says the flag saves nothing.
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "w1 w2", "completion": "w3 w4"})
    data.write_text(f'{good}\n{good}\n{{"prompt": "w1", "completion": \n{good}\n')
    with socket.create_server(("127.0.0.1", 0)) as listener:  # a "server" that counts who knocks
        port = listener.getsockname()[1]
        result = subprocess.run(
            [
                *EDGESPLIT,
                "client",
                "--server",
                f"ws://127.0.0.1:{port}",
                "--artifacts",
                str(tiny_artifacts("llama", 1)),
                "--data",
                str(data),
                "--client-id",
                "a",
                "--group-by-length",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        listener.setblocking(False)
        try:
            listener.accept()
            connected = True
        except BlockingIOError:
            connected = False
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{data}:3:" in result.stderr  # file and line
    assert not connected and "connecting" not in result.stdout
    assert "--group-by-length saves nothing with these artifacts" in result.stdout


def test_backoff_doubles_up_to_a_cap_with_jitter() -> None:
    delays = backoff_delays(first_s=0.5, cap_s=10.0, jitter=0.2, rng=random.Random(0))
    nominal = [0.5, 1, 2, 4, 8, 10, 10, 10]
    observed = [next(delays) for _ in nominal]
    for seen, expected in zip(observed, nominal, strict=True):
        assert 0.8 * expected <= seen <= 1.2 * expected
    # Jitter: two clients cut off together do not retry in lockstep.
    other = backoff_delays(rng=random.Random(1))
    assert [next(other) for _ in nominal] != observed


def test_importing_the_client_writes_nothing_to_home(tmp_path: Path) -> None:
    """ONNX Runtime's telemetry would write a device id under ~/.cache at import; the edge client opts out."""
    env = dict(os.environ, HOME=str(tmp_path))
    for name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
        env.pop(name, None)
    subprocess.run(
        [sys.executable, "-c", "import edgesplit.client.client, onnxruntime"], env=env, check=True, timeout=120
    )
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_the_summary_line_says_how_much_of_the_computed_tokens_was_padding() -> None:
    summary = {
        **dict.fromkeys(("bytes_up", "bytes_down", "peak_rss_mb", "energy_j"), 1.0),
        **{"final_loss": 2.0, "first_loss": 3.0, "steps": 4, "rounds": 1},
        **{"energy_method": "estimated", "energy_source": "x"},
        **{"real_tokens": 300, "computed_tokens": 400, "group_by_length": False},
    }
    assert "75% of the tokens computed were real, not padding;" in main_summary(summary)
    grouped = main_summary(summary | {"real_tokens": 396, "group_by_length": True})
    assert "99% of the tokens computed were real, not padding, batches grouped by length" in grouped
    assert "tokens computed" not in main_summary(summary | {"computed_tokens": 0})  # no step, no share
    # A head that cuts each batch to its longest row, on random batches: the summary says what would help.
    assert "(--group-by-length would cut most of the rest)" in main_summary(summary | {"dynamic_seq": True})
    assert "would cut" not in main_summary(summary | {"seq_buckets": [128]})  # one length: nothing to cut
