"""The device needs only its own files of the export: a copy without the server's tail/ trains against a real
server, and the client checks exactly the files it opens."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))  # tests/server/loopback.py

from loopback import Processes, client_command, free_port, serve_command  # noqa: E402

from edgesplit.client.client import Client, ClientConfig  # noqa: E402
from edgesplit.client.metrics import read_jsonl as read_metrics  # noqa: E402
from edgesplit.errors import ArtifactError  # noqa: E402

ROUNDS, STEPS = 2, 2
# What the device runs, as a user would pick it out of the export: the head graphs with their weights,
# the initial adapters, the tokenizer and the manifest; not tail/ (the server's, 481 MB of 710 for SmolLM2).
DEVICE_PATTERNS = (
    "manifest.json",
    "tokenizer.json",
    "head_adapters.safetensors",
    "head.onnx",
    "head_grad.onnx",
    "head*.onnx.data",
)


def device_copy(artifacts: Path, destination: Path) -> Path:
    destination.mkdir()
    for pattern in DEVICE_PATTERNS:
        for file in artifacts.glob(pattern):
            shutil.copy2(file, destination / file.name)
    return destination


def write_data_with_separators(path: Path, count: int) -> None:
    """The task of loopback.write_task, with a raw U+2028 or U+0085 inside every other prompt (valid JSON)."""
    with path.open("w", encoding="utf-8") as handle:
        for index in range(count):
            a = index % 40
            separator = ("\u2028", "\u0085")[index % 2] if index % 4 < 2 else " "
            record = {"prompt": f"w{a}{separator}w{a + 1}", "completion": f"w{a + 2} w{a + 3}"}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def test_the_copy_holds_no_server_file(tiny_artifacts, tmp_path: Path) -> None:
    artifacts = tiny_artifacts("llama", 1)
    device = device_copy(artifacts, tmp_path / "device")
    manifest = json.loads((artifacts / "manifest.json").read_text())
    copied = {file.name for file in device.iterdir()}
    assert copied == {name for name in manifest["files"] if not name.startswith("tail/")} | {"manifest.json"}
    assert any(name.startswith("tail/") for name in manifest["files"])  # the export does have server files


def test_a_device_file_missing_from_the_copy_is_named(tiny_artifacts, tmp_path: Path) -> None:
    artifacts = tiny_artifacts("llama", 1)
    device = device_copy(artifacts, tmp_path / "device")
    data = tmp_path / "train.jsonl"
    write_data_with_separators(data, 4)
    config = ClientConfig(server="ws://127.0.0.1:9", artifacts=device, data=data, client_id="a", quiet=True)
    Client(config)  # the copy as it is: nothing missing
    (device / "head_grad.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"head_grad\.onnx\.data is listed in the manifest but missing"):
        Client(config)


def test_a_client_with_only_the_device_files_trains_against_a_real_server(tiny_artifacts, tmp_path: Path) -> None:
    artifacts = tiny_artifacts("llama", 1)
    device = device_copy(artifacts, tmp_path / "device")
    assert not (device / "tail").exists()
    data = tmp_path / "train.jsonl"
    write_data_with_separators(data, 12)
    port = free_port()
    with Processes() as run:
        serve = serve_command(artifacts, port, tmp_path, rounds=ROUNDS, steps=STEPS, min_clients=1)
        server = run.start("server", serve)
        server.wait_for(r"listening on")
        client = run.start("pi", client_command(f"ws://127.0.0.1:{port}", device, data, "pi", tmp_path))
        assert client.wait(240) == 0, client.output
        assert server.wait(60) == 0, server.output
    # Every line read as one example: the separators inside the strings did not split any.
    assert re.search(r"connecting to \S+ with 12 examples", client.output), client.output
    assert f"trained {ROUNDS * STEPS} steps in {ROUNDS} rounds" in client.output
    steps = [record for record in read_metrics(tmp_path / "pi-metrics.jsonl") if record["event"] == "step"]
    assert len(steps) == ROUNDS * STEPS
    assert all(record["bytes_down"] > 0 for record in steps)  # the server's gradients came back each step


def test_edgesplit_bundle_copies_what_the_device_needs_and_no_server_file(tiny_artifacts, tmp_path: Path) -> None:
    from edgesplit.cli import main as edgesplit_main

    artifacts = tiny_artifacts("llama", 1)
    assert edgesplit_main(["bundle", "--artifacts", str(artifacts), "--out", str(tmp_path / "device")]) == 0
    bundled = {str(p.relative_to(tmp_path / "device")) for p in (tmp_path / "device").rglob("*") if p.is_file()}
    # The same set as the hand-made copy the tests above train from.
    assert bundled == {p.name for p in device_copy(artifacts, tmp_path / "by-hand").iterdir()}
    data = tmp_path / "train.jsonl"
    write_data_with_separators(data, 4)
    Client(ClientConfig(server="ws://127.0.0.1:9", artifacts=tmp_path / "device", data=data, client_id="a"))


def test_edgesplit_bundle_refuses_before_writing(tiny_artifacts, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from edgesplit.cli import main as edgesplit_main

    artifacts = tiny_artifacts("llama", 1)
    (tmp_path / "taken").mkdir()
    assert edgesplit_main(["bundle", "--artifacts", str(artifacts), "--out", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err
    cut = ["--cut-layer", "2"]
    assert edgesplit_main(["bundle", "--artifacts", str(artifacts), "--out", str(tmp_path / "d"), *cut]) == 1
    assert "exported for cut 1 only" in capsys.readouterr().err and not (tmp_path / "d").exists()
    assert edgesplit_main(["bundle", "--artifacts", str(tmp_path), "--out", str(tmp_path / "e")]) == 1
    assert "not an edgesplit artifact directory" in capsys.readouterr().err
