"""FedLLM and KD-FedLLM on the same server and transport: two real clients, two rounds, tiny model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from loopback import free_port, serve_command, write_task

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.metrics import read_jsonl
from edgesplit.server.aggregate import fedavg
from edgesplit.server.checkpoint import load_latest

ROUNDS, STEPS, TOP_K = 2, 3, 4


def run_framework(framework: str, artifacts, work):  # type: ignore[no-untyped-def]
    write_task(work / "a.jsonl", seed=1, count=12)
    write_task(work / "b.jsonl", seed=2, count=20)
    write_task(work / "eval.jsonl", seed=3, count=4)
    write_task(work / "proxy.jsonl", seed=4, count=5)
    port = free_port()
    cli = [sys.executable, "-m", "edgesplit.cli"]
    extra = ["--framework", framework, "--proxy-data", str(work / "proxy.jsonl"), "--kd-top-k", str(TOP_K),
             "--eval-data", str(work / "eval.jsonl")]  # fmt: skip
    server = subprocess.Popen(
        serve_command(artifacts, port, work, rounds=ROUNDS, steps=STEPS, extra=extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    clients = {
        name: subprocess.Popen(
            [
                *cli,
                "client",
                "--server",
                f"ws://127.0.0.1:{port}",
                "--artifacts",
                str(artifacts),
                "--data",
                str(work / f"{name}.jsonl"),
                "--client-id",
                name,
                "--metrics-out",
                str(work / f"{name}.metrics.jsonl"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    }
    try:
        outputs = {name: process.communicate(timeout=300)[0] for name, process in clients.items()}
        server_output = server.communicate(timeout=60)[0]
    finally:
        for process in [server, *clients.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()
    for name, process in clients.items():
        assert process.returncode == 0, outputs[name]
    assert server.returncode == 0, server_output
    return outputs, server_output


@pytest.mark.parametrize("framework", ["fedllm", "kd"])
def test_whole_model_frameworks_train_to_completion(tiny_artifacts, tmp_path, framework) -> None:
    artifacts = tiny_artifacts("llama", full_model=True)
    outputs, server_output = run_framework(framework, artifacts, tmp_path)
    assert f"round {ROUNDS}/{ROUNDS} closed with 2 clients" in server_output
    checkpoint = load_latest(tmp_path / "ckpt")
    assert checkpoint is not None and sorted(checkpoint.updates) == ["a", "b"]
    manifest = load_manifest(artifacts, verify=False)
    records = {name: read_jsonl(tmp_path / f"{name}.metrics.jsonl") for name in ("a", "b")}
    steps = [r for r in records["a"] if r["event"] == "step"]
    assert len(steps) == ROUNDS * STEPS and all(r["bytes_up"] == 0 for r in steps)  # local training: no traffic
    server_records = read_jsonl(tmp_path / "server.jsonl")
    finished = next(r for r in server_records if r["event"] == "finished")
    upload = finished["bytes_received"]["ADAPTER_UPDATE"] / (2 * ROUNDS)  # per client per round
    if framework == "fedllm":
        samples = checkpoint.extra["num_samples"]
        expected = fedavg([(checkpoint.updates[c], samples[c]) for c in ("a", "b")])
        for name, value in expected.items():
            np.testing.assert_allclose(checkpoint.global_adapters[name], value, rtol=1e-6, atol=1e-7)
        analytic = sum(int(np.prod(shape)) * 4 for shape in manifest.lora.matrices.values())
    else:
        update = checkpoint.updates["a"]
        assert set(update) == {"proxy_values", "proxy_indices"}
        assert update["proxy_values"].shape == (5, manifest.max_seq_len, TOP_K)
        analytic = 5 * manifest.max_seq_len * TOP_K * (4 + 8)  # float32 values and int64 indices
    # Communication per round equals its analytic size: the frame's header and metadata are the rest.
    assert analytic <= upload <= analytic * 1.05 + 2048
