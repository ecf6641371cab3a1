"""A real server and one real client process on loopback, tiny model, with activations and gradients in int4
and in int4k; the tail's indifference to padding rows, which int4k leaves out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from loopback import Processes, client_command, free_port, serve_command, write_task

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.int4k import zero_padding
from edgesplit.client.metrics import read_jsonl
from edgesplit.client.protocol import Activations, Gradients, Wire, encode
from edgesplit.server.tail import Tail


def train_one_client(artifacts: Path, work: Path, wire: str, steps: int, eval_data: bool = True) -> list[dict]:  # type: ignore[type-arg]
    """A real server (one round of `steps`, `--wire WIRE`) and one real client process on a small task; the
    client's step records. The server's records are in work/server.jsonl."""
    write_task(work / "a.jsonl", seed=1, count=16)
    port = free_port()
    with Processes() as run:
        extra = ["--wire", wire, *(["--eval-data", str(work / "a.jsonl")] if eval_data else [])]
        server = run.start(
            "server", serve_command(artifacts, port, work, rounds=1, steps=steps, min_clients=1, extra=extra)
        )
        server.wait_for("listening on")
        client = run.start("client", client_command(f"ws://127.0.0.1:{port}", artifacts, work / "a.jsonl", "a", work))
        assert client.wait() == 0, client.output
        assert server.wait() == 0, server.output
    return [r for r in read_jsonl(work / "a-metrics.jsonl") if r["event"] == "step"]


def eval_losses(work: Path) -> tuple[float, float]:
    """The server's eval loss before training and after its last round."""
    records = read_jsonl(work / "server.jsonl")
    before = next(r["eval_loss"] for r in records if r["event"] == "eval")
    return before, [r["eval_loss"] for r in records if r["event"] == "round"][-1]


def test_a_session_in_int4_trains_and_sends_an_eighth_of_the_bytes(tiny_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1)
    manifest = load_manifest(artifacts, verify=False)
    steps = train_one_client(artifacts, tmp_path, "int4", 2, eval_data=False)
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


def test_a_session_in_int4k_trains_and_leaves_the_padding_rows_out(tiny_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1)
    manifest = load_manifest(artifacts, verify=False)
    steps = train_one_client(artifacts, tmp_path, "int4k", 8)
    before, after = eval_losses(tmp_path)
    assert np.isfinite(after) and after < before  # it trains
    assert len(steps) == 8
    # The frames are int4k's with only the real tokens' rows sent (`tokens` of them): the frame of the
    # bucket's width that matches them, within the metadata's spelling of the step's numbers.
    b, h = manifest.batch_size, manifest.hidden_size
    for record in steps:
        activations = np.zeros((b * manifest.max_seq_len, h), np.float32)
        activations[: record["tokens"]] = 1.0
        widths = []
        for t in manifest.seq_buckets:
            if b * t < record["tokens"]:
                continue
            ids = np.zeros((b, t), np.int64)
            rows = activations[: b * t].reshape(b, t, h)
            up = Activations(0, 0, {"activations": rows, "attention_mask": ids, "labels": ids})
            down = Gradients(0, 0, 1.0, 0.0, {"activation_grads": rows}, queue_seconds=0.0, compute_seconds=0.0)
            if abs(record["bytes_up"] - len(encode(up, Wire.INT4K))) < 64:
                assert abs(record["bytes_down"] - len(encode(down, Wire.INT4K))) < 128
                widths.append(t)
                if record["tokens"] < b * t:  # padding: fewer bytes than every row sent
                    every = Activations(0, 0, {"activations": rows + 1, "attention_mask": ids, "labels": ids})
                    assert len(encode(every, Wire.INT4K)) > record["bytes_up"] + 64
        assert len(widths) == 1, (record, widths)


def test_a_u_shaped_session_in_int4k_trains(tiny_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Four int4k exchanges a step: the lower cut's activations up, the middle's output down (its padding
    rows zeroed by the server from the step's mask), their gradients back."""
    artifacts = tiny_artifacts("llama", 1, top_layers=1)
    steps = train_one_client(artifacts, tmp_path, "int4k", 6)
    before, after = eval_losses(tmp_path)
    assert np.isfinite(after) and after < before
    assert len(steps) == 6 and all(np.isfinite(r["loss"]) for r in steps)


def test_the_tails_loss_and_real_gradients_do_not_depend_on_the_padding_rows(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    """What makes int4k's zeroing of padding rows exact: the tail masks them."""
    tail = Tail(tiny_artifacts("llama", 1))
    batch, seq, hidden = tail.manifest.activations_shape
    rng = np.random.default_rng(0)
    activations = rng.normal(size=(batch, seq, hidden)).astype(np.float32)
    mask = np.ones((batch, seq), np.int64)
    mask[0, seq // 2 :] = 0
    mask[-1, 3:] = 0
    labels = rng.integers(0, tail.manifest.vocab_size, size=(batch, seq))
    labels[mask == 0] = -100
    zeroed = zero_padding(activations, mask)
    assert not np.array_equal(zeroed, activations)
    loss, tokens = tail.eval_loss(activations, mask, labels)
    zeroed_loss, zeroed_tokens = tail.eval_loss(zeroed, mask, labels)
    assert zeroed_tokens == tokens > 0 and zeroed_loss == pytest.approx(loss, rel=1e-6)
    state = tail.state_dict()
    first, grads = tail.train_step(activations, mask, labels)
    tail.load_state_dict(state)
    second, zeroed_grads = tail.train_step(zeroed, mask, labels)
    assert grads is not None and zeroed_grads is not None and second == pytest.approx(first, rel=1e-6)
    assert np.allclose(zeroed_grads, grads, atol=1e-7)
    assert np.all(np.abs(grads[mask == 0]) < 1e-7)  # the server's gradient at padding is zero: not sent
