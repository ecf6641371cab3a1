"""Sequence buckets: the head traced for shorter lengths too, each checked, and a batch run at the shortest
that holds it gives what the full-length graphs give on the positions it keeps, in training as well."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from loopback import federated_run
from transformers import AutoModelForCausalLM

from edgesplit.client.client import Client, ClientConfig
from edgesplit.client.data import Batch, fit_to_bucket, iterate_batches
from edgesplit.client.head import Head
from edgesplit.errors import ExportError, TrainingError
from edgesplit.export.cli import main as export_main
from edgesplit.export.exporter import ExportConfig
from edgesplit.export.families import prepare_for_training
from edgesplit.server.centralized import reference_for_artifacts, train_centralized
from edgesplit.server.tail import OptimizerSettings

FAMILY, BUCKET, FULL = "llama", 8, 16


@pytest.fixture(scope="module")
def bucketed(tiny_artifacts) -> Path:  # type: ignore[no-untyped-def]
    return tiny_artifacts(FAMILY, 1, seq_buckets=(BUCKET,))  # type: ignore[no-any-return]


def test_the_manifest_lists_each_bucket_and_its_self_check(bucketed: Path) -> None:
    manifest = Head(bucketed).manifest
    assert manifest.seq_buckets == (BUCKET, FULL)
    assert [stage.name for stage in manifest.stages] == [
        "head", "head_grad", f"head.t{BUCKET}", f"head_grad.t{BUCKET}", "tail"
    ]  # fmt: skip
    assert manifest.head_stage(BUCKET).inputs[0].shape == (2, BUCKET)
    # A bucket's graph reads the full length's weights from its data file: it adds no copy of them.
    own, *shared = manifest.grad_stage(BUCKET).files[1:]
    assert own == f"head_grad.t{BUCKET}.onnx.data" and shared == ["head_grad.onnx.data"]
    assert manifest.head_stage(BUCKET).files[2:] == ("head.onnx.data",)
    own_bytes = (bucketed / f"head.t{BUCKET}.onnx.data").stat().st_size
    assert own_bytes < 0.2 * (bucketed / "head.onnx.data").stat().st_size
    check = manifest.self_check
    assert check is not None and check["buckets"][str(BUCKET)]["logits_relative_error"] < 1e-3
    assert manifest.bucket_for(5) == BUCKET and manifest.bucket_for(BUCKET + 1) == FULL


def test_a_bucket_computes_what_the_full_length_computes_on_the_positions_it_keeps(bucketed: Path) -> None:
    head = Head(bucketed)
    rng = np.random.default_rng(0)
    adapters = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in head.initial_adapters().items()}
    input_ids = rng.integers(0, 100, (2, FULL))
    mask = np.zeros((2, FULL), dtype=np.int64)
    mask[0, :6], mask[1, :3] = 1, 1
    batch = Batch(input_ids, mask, np.where(mask == 1, input_ids, -100), np.arange(2))
    cut = fit_to_bucket(batch, head.manifest.seq_buckets)
    assert cut.input_ids.shape == (2, BUCKET) and (cut.labels == batch.labels[:, :BUCKET]).all()

    full = head.forward(batch.input_ids, batch.attention_mask, adapters)
    short = head.forward(cut.input_ids, cut.attention_mask, adapters)
    grads_in = rng.standard_normal(full.activations.shape).astype(np.float32)
    grads_in[:, BUCKET:] = 0  # the loss reads no position past the cut
    full_grads = head.backward(full, grads_in)
    short_grads = head.backward(short, np.ascontiguousarray(grads_in[:, :BUCKET]))
    np.testing.assert_allclose(short.activations, full.activations[:, :BUCKET], rtol=1e-5, atol=1e-6)
    for name, value in full_grads.items():
        assert np.abs(value).max() > 0
        np.testing.assert_allclose(short_grads[name], value, rtol=1e-4, atol=1e-6)

    with pytest.raises(TrainingError, match=r"one of \[8, 16\]"):
        head.forward(input_ids[:, :9], mask[:, :9], adapters)
    longer = Batch(input_ids, np.ones_like(mask), input_ids, np.arange(2))
    assert fit_to_bucket(longer, head.manifest.seq_buckets) is longer  # nothing to cut: the full length


def test_a_bucket_outside_the_window_is_refused_before_the_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExportError, match="--seq-buckets 32 is out of range"):
        ExportConfig(max_seq_len=16, seq_buckets=(32,))
    with pytest.raises(SystemExit):
        export_main(["--cut-layer", "1", "--seq-buckets", "short"])
    assert "comma-separated token counts" in capsys.readouterr().err


def write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(10):
        a = int(rng.integers(0, 60))
        lines.append(json.dumps({"prompt": f"w{a}", "completion": f"w{a + 1} w{a + 2}" * int(rng.integers(1, 3))}))
    path.write_text("\n".join(lines) + "\n")


def test_split_training_with_buckets_equals_centralised_training_at_full_length(
    bucketed: Path, tiny_model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    rounds, steps, learning_rate = 1, 4, 0.01
    write_data(tmp_path / "data.jsonl")
    client = Client(
        ClientConfig(
            server="ws://unused", artifacts=bucketed, data=tmp_path / "data.jsonl", client_id="only", quiet=True
        )
    )
    batches = list(itertools.islice(iterate_batches(client.encoded, 2, seed=0), rounds * steps))
    widths = {fit_to_bucket(b, client.head.manifest.seq_buckets).input_ids.shape[1] for b in batches}
    assert BUCKET in widths  # the run does use the shorter graphs

    split_losses = asyncio.run(
        federated_run(bucketed, tmp_path / "data.jsonl", tmp_path / "ckpt", rounds, steps, learning_rate, "only")
    )
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs[FAMILY], attn_implementation="eager", dtype=torch.float32
    )
    prepare_for_training(model)
    reference = reference_for_artifacts(model, bucketed, seed=0)
    central = train_centralized(
        reference, ((b.input_ids, b.attention_mask, b.labels) for b in batches), OptimizerSettings(learning_rate)
    )
    np.testing.assert_allclose(split_losses, central, rtol=1e-4)
    assert central[-1] < central[0]
