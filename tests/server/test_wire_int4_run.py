"""A real server and one real client process on loopback, tiny model, with activations and gradients in int4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from loopback import Processes, client_command, free_port, serve_command, write_task

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.metrics import read_jsonl
from edgesplit.client.protocol import Activations, Gradients, Wire, encode


def test_a_session_in_int4_trains_and_sends_an_eighth_of_the_bytes(tiny_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1)
    manifest = load_manifest(artifacts, verify=False)
    write_task(tmp_path / "a.jsonl", seed=1, count=16)
    port = free_port()
    with Processes() as run:
        command = serve_command(artifacts, port, tmp_path, rounds=1, steps=2, min_clients=1, extra=["--wire", "int4"])
        server = run.start("server", command)
        server.wait_for("listening on")
        client = run.start(
            "client", client_command(f"ws://127.0.0.1:{port}", artifacts, tmp_path / "a.jsonl", "a", tmp_path)
        )
        assert client.wait() == 0, client.output
        assert server.wait() == 0, server.output
    steps = [r for r in read_jsonl(tmp_path / "a-metrics.jsonl") if r["event"] == "step"]
    assert len(steps) == 2 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    # Each step's frames are the int4 encoding of the step's tensors.
    b, t, h = manifest.batch_size, manifest.max_seq_len, manifest.hidden_size
    ids = np.zeros((b, t), np.int64)
    up = Activations(0, 0, {"activations": np.zeros((b, t, h), np.float32), "attention_mask": ids, "labels": ids})
    grads = {"activation_grads": np.zeros((b, t, h), np.float32)}
    down = Gradients(0, 0, 1.0, 0.0, grads, queue_seconds=0.0, compute_seconds=0.0)  # as the server sends it
    # (within some bytes: the JSON metadata spells the step's numbers, the loss and three timings, at up to
    # 17 digits each; the tensors of this tiny model take 640 bytes in int4 and 4,096 in fp32)
    assert abs(steps[0]["bytes_up"] - len(encode(up, Wire.INT4))) < 64
    assert abs(steps[0]["bytes_down"] - len(encode(down, Wire.INT4))) < 128
    assert len(encode(up, Wire.INT4)) < len(encode(up, Wire.FP32)) / 3
