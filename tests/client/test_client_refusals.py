"""The client's small refusals, with real processes: a manifest edited to a batch no device could hold or to a
number past float range, and an id taken over by another process on a server without tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from loopback import Processes, client_command, free_port, serve_command, write_task  # noqa: E402

EDGESPLIT = [sys.executable, "-m", "edgesplit.cli"]


def edited_copy(artifacts: Path, where: Path, section: str, key: str, literal: str) -> Path:
    """The artifacts with one manifest number replaced by `literal` as written (1e999 is not JSON Python writes)."""
    copy = where / "artifacts"
    shutil.copytree(artifacts, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[section][key] = "__EDITED__"
    (copy / "manifest.json").write_text(json.dumps(manifest).replace('"__EDITED__"', literal))
    return copy


@pytest.mark.parametrize(
    ("section", "key", "literal", "said"),
    [
        ("shapes", "batch_size", str(10**12), "traced for 2 x 16"),
        ("model", "num_layers", "1e999", "manifest.json is malformed (cannot convert float infinity to integer)"),
        ("lora", "alpha", "1e999", "alpha inf"),
    ],
)
def test_an_edited_manifest_is_refused_before_anything_is_allocated(  # type: ignore[no-untyped-def]
    tiny_artifacts, tmp_path: Path, section: str, key: str, literal: str, said: str
) -> None:
    artifacts = edited_copy(tiny_artifacts("llama", 1), tmp_path, section, key, literal)
    data = tmp_path / "data.jsonl"
    write_task(data, seed=0, count=4)
    command = [*EDGESPLIT, "client", "--server", "ws://127.0.0.1:9", "--artifacts", str(artifacts)]
    result = subprocess.run(
        [*command, "--data", str(data), "--client-id", "a", "--connect-timeout", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "not reachable" not in result.stdout + result.stderr  # refused before connecting


def test_a_client_whose_id_is_taken_over_says_so_and_exits(tiny_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        write_task(tmp_path / name / "data.jsonl", seed=0, count=16)
    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, tmp_path, rounds=1, steps=400, min_clients=1))
        server.wait_for("listening on")
        first = run.start(
            "first", client_command(url, artifacts, tmp_path / "first" / "data.jsonl", "pi", tmp_path / "first")
        )
        first.wait_for("round 1 step 2")
        second = run.start(
            "second", client_command(url, artifacts, tmp_path / "second" / "data.jsonl", "pi", tmp_path / "second")
        )
        started = time.monotonic()
        code = first.wait(60)
        second.kill()

    assert code != 0, first.output
    assert time.monotonic() - started < 60
    assert "another process connected as client id 'pi'" in first.output, first.output
    assert "Traceback" not in first.output
