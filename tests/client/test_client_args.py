"""What `edgesplit client` refuses from its command line alone: at once, as a usage error, with the right form."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgesplit.client.checks import check_client_id, check_server_url, check_token_window
from edgesplit.client.client_cli import build_parser, main
from edgesplit.client.data import IGNORE_INDEX, EncodedSet, Example, read_jsonl
from edgesplit.errors import DataError, EdgesplitError

EDGESPLIT = [sys.executable, "-m", "edgesplit.cli"]


def refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command in this process; it must stop with a usage error (exit 2). Returns its stderr."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    return capsys.readouterr().err


def arguments(server: str = "ws://127.0.0.1:8765", client_id: str = "a") -> list[str]:
    # Neither the artifacts nor the data exist: a refusal that mentions them came too late.
    return ["--server", server, "--artifacts", "no-such-dir", "--data", "no-such.jsonl", "--client-id", client_id]


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("127.0.0.1:8766", "did you mean ws://127.0.0.1:8766?"),
        ("pi.local", "has no scheme"),
        ("http://127.0.0.1:8766", "not http://"),
        ("tcp://127.0.0.1:8766", "not tcp://"),
        ("WSS://127.0.0.1:8766", "not WSS://"),
        ("ws://127.0.0.1", "names no port"),
        ("wss://server.example", "wss://server.example:8765"),
        ("ws://127.0.0.1:87x6", "port '87x6' is not a number"),
        ("ws://127.0.0.1:70000", "port '70000' is not a number from 1 to 65535"),
        ("ws://:8765", "names no host"),
    ],
)
def test_a_malformed_server_address_is_a_usage_error_that_shows_the_form(
    capsys: pytest.CaptureFixture[str], server: str, expected: str
) -> None:
    stderr = refusal(capsys, arguments(server=server))
    assert expected in stderr
    assert "no-such" not in stderr  # refused before the artifacts or the data were looked at
    if "scheme" in expected or "not " in expected:
        assert "ws://HOST:PORT" in stderr and "wss://" in stderr


@pytest.mark.parametrize("server", ["ws://127.0.0.1:8765", "wss://server.example:443", "ws://[::1]:8765/"])
def test_the_documented_forms_are_accepted(server: str) -> None:
    check_server_url(server)


def test_a_client_id_with_a_space_is_refused_before_anything_loads_or_connects(tmp_path: Path) -> None:
    """A real process, with a listener that notes whether anyone knocked, and no artifacts at all."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [*EDGESPLIT, "client", *arguments(f"ws://127.0.0.1:{port}", "pi kitchen")],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        seconds = time.monotonic() - started
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "A-Z a-z 0-9 . _ -" in result.stderr and "'pi-kitchen'" in result.stderr
    assert "no-such" not in result.stderr
    assert seconds < 30  # no model, no retries: a plain usage error


def test_a_server_address_without_scheme_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [*EDGESPLIT, "client", *arguments("127.0.0.1:8766")], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "ws://127.0.0.1:8766" in result.stderr


@pytest.mark.parametrize("client_id", ["pi kitchen", "", "x" * 65, "küche", "a/b"])
def test_client_ids_outside_the_protocols_rule_are_refused(client_id: str) -> None:
    with pytest.raises(EdgesplitError, match="A-Z a-z 0-9"):
        check_client_id(client_id)


def test_client_ids_inside_the_rule_pass() -> None:
    for client_id in ("pi-kitchen", "jetson_01", "host.lan", "x" * 64):
        check_client_id(client_id)


@pytest.mark.parametrize(
    ("option", "value"),
    [("--threads", "-1"), ("--batch-size", "0"), ("--max-seq-len", "x"), ("--connect-timeout", "0")],
)
def test_out_of_range_numbers_are_usage_errors(capsys: pytest.CaptureFixture[str], option: str, value: str) -> None:
    stderr = refusal(capsys, [*arguments(), option, value])
    assert f"argument {option}" in stderr and repr(value) in stderr


def test_every_option_says_what_it_is_for_and_the_description_names_no_module() -> None:
    parser = build_parser()
    options = [action for action in parser._actions if action.option_strings and action.dest != "help"]
    assert len(options) >= 15
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS and len(action.help) > 10, action.option_strings
    shapes = {action.dest: action.help or "" for action in options}
    for dest in ("batch_size", "max_seq_len"):
        assert "manifest" in shapes[dest] and "positive whole number" in shapes[dest]
    text = (parser.description or "") + (parser.epilog or "")
    assert "edgesplit." not in text and ".py" not in text
    assert "ws://" in parser.format_help()


def test_a_shape_option_that_differs_from_the_export_is_refused_with_the_exports_value(
    tiny_artifacts, tmp_path: Path
) -> None:
    artifacts = tiny_artifacts("llama", 1)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "w1 w2"}) + "\n")
    argv = ["--server", "ws://127.0.0.1:9", "--artifacts", str(artifacts), "--data", str(data), "--client-id", "a"]
    with pytest.raises(EdgesplitError, match=r"--batch-size 3 does not match the artifacts \(2\)"):
        main([*argv, "--batch-size", "3"])
    with pytest.raises(EdgesplitError, match=r"--max-seq-len 64 does not match the artifacts \(16\)"):
        main([*argv, "--max-seq-len", "64"])


# ------------------------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_a_line_separator_inside_a_json_string_stays_inside_its_line(tmp_path: Path, separator: str) -> None:
    """JSON allows these raw inside strings; str.splitlines would break the line at them."""
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps({"prompt": f"a{separator}b", "completion": "c"}, ensure_ascii=False),
        json.dumps({"text": f"d{separator}e"}, ensure_ascii=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_jsonl(path) == [Example(f"a{separator}b", "c"), Example(None, f"d{separator}e")]
    # A mistake after them is still reported at its own line number.
    path.write_text("\n".join([*lines, '{"text": 5}']) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:3: \"text\" must be a string"):
        read_jsonl(path)


# ------------------------------------------------------------------------------------- the token window


def encoded_set(lengths_and_targets: list[tuple[int, bool]], window: int = 8) -> EncodedSet:
    """A hand-made EncodedSet: per example, its length before the cut and whether a target survived it."""
    count = len(lengths_and_targets)
    labels = np.full((count, window), IGNORE_INDEX, dtype=np.int64)
    for row, (_, has_target) in enumerate(lengths_and_targets):
        if has_target:
            labels[row, -1] = 1
    return EncodedSet(
        input_ids=np.ones((count, window), dtype=np.int64),
        attention_mask=np.ones((count, window), dtype=np.int64),
        labels=labels,
        num_truncated=sum(length > window for length, _ in lengths_and_targets),
        num_without_targets=sum(not has_target for _, has_target in lengths_and_targets),
    )


def test_data_that_the_window_leaves_nothing_of_is_refused_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\.jsonl: none of its 2 examples .* 8-token window .*--max-seq-len"):
        check_token_window(tmp_path / "train.jsonl", encoded_set([(30, False), (12, False)]), "a")


def test_data_that_the_window_cuts_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_token_window(tmp_path / "train.jsonl", encoded_set([(30, False), (12, True), (5, True)]), "a")
    warning = capsys.readouterr().err
    assert "2 of 3 examples are longer than the export's 8-token window" in warning
    assert "1 of them keep no completion token" in warning
    check_token_window(tmp_path / "train.jsonl", encoded_set([(5, True)]), "a")
    assert capsys.readouterr().err == ""  # nothing cut, nothing said


def test_a_client_whose_window_holds_no_completion_stops_before_connecting(tiny_artifacts, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    long_prompt = " ".join(f"w{i}" for i in range(40))  # far beyond the tiny export's 16 tokens
    data.write_text("".join(json.dumps({"prompt": long_prompt, "completion": "w1"}) + "\n" for _ in range(3)))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        command = ["--server", f"ws://127.0.0.1:{port}", "--artifacts", str(tiny_artifacts("llama", 1))]
        result = subprocess.run(
            [*EDGESPLIT, "client", *command, "--data", str(data), "--client-id", "a"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{data}: none of its 3 examples" in result.stderr and "Traceback" not in result.stderr
