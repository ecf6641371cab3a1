"""A dynamic-length head (export --dynamic-seq): one forward and one gradient graph whose sequence axis takes
any length from 2 to max_seq_len. At every length they compute what the PyTorch head computes, a real run
cuts each batch to its longest row and trains as centralised training does, an int8 head runs at every
length, and the flags it does not go with are refused before any model loads."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from loopback import federated_run
from transformers import AutoModelForCausalLM

from edgesplit.client.artifacts import MIN_SEQ_LEN, SEQ_AXIS, Manifest, axis_size, load_manifest
from edgesplit.client.data import Batch, fit_to_bucket, iterate_batches
from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError, ExportError, TrainingError
from edgesplit.export.cli import main as export_main
from edgesplit.export.exporter import ExportConfig
from edgesplit.export.families import family_for, prepare_for_training
from edgesplit.export.lora import HeadWithLora
from edgesplit.server.centralized import reference_for_artifacts, train_centralized
from edgesplit.server.strategies import StrategyOptions, build_strategy
from edgesplit.server.tail import OptimizerSettings

FAMILY, FULL = "llama", 16  # the tiny exports' max_seq_len (tests/conftest.py)
LENGTHS = (MIN_SEQ_LEN, 5, 11, FULL)


@pytest.fixture(scope="module")
def dynamic(tiny_artifacts) -> Path:  # type: ignore[no-untyped-def]
    return tiny_artifacts(FAMILY, 1, dynamic_seq=True)  # type: ignore[no-any-return]


def test_the_manifest_names_the_axis_and_lists_every_length(dynamic: Path) -> None:
    manifest = load_manifest(dynamic)
    assert manifest.dynamic_seq and manifest.seq_lengths == tuple(range(MIN_SEQ_LEN, FULL + 1))
    assert [stage.name for stage in manifest.stages] == ["head", "head_grad", "tail"]  # one graph pair
    assert manifest.head_stage(5) == manifest.head_stage(FULL) and manifest.grad_stage(3).name == "head_grad"
    assert manifest.head_inputs[0].shape == (2, SEQ_AXIS)
    saved = [spec for spec in manifest.grad_inputs if spec.name.startswith("saved.")]
    assert all(SEQ_AXIS in "".join(str(d) for d in spec.shape) for spec in saved)  # every saved tensor varies
    assert all(all(isinstance(d, int) for d in manifest.longest_shape(spec.shape)) for spec in saved)
    assert axis_size("2*seq", 7) == 14 and axis_size("2*seq + 1", 7) == 15 and axis_size(SEQ_AXIS, 7) == 7
    assert manifest.bucket_for(1) == MIN_SEQ_LEN and manifest.bucket_for(9) == 9
    check = manifest.self_check
    assert check is not None and set(check["lengths"]) == {str(MIN_SEQ_LEN), "9"}
    assert all(entry["lora_gradients_relative_error"] < 1e-3 for entry in check["lengths"].values())
    raw = json.loads((dynamic / "manifest.json").read_text())
    assert raw["shapes"]["dynamic_seq"] is True and Manifest.from_json(raw) == manifest  # a round trip
    raw["shapes"]["seq_lengths"] = [MIN_SEQ_LEN, FULL]
    with pytest.raises(ArtifactError, match="every length from 2 to max_seq_len"):
        Manifest.from_json(raw)


def torch_head(model_dir: Path, manifest: Manifest) -> HeadWithLora:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    family = family_for(model)
    lora = manifest.lora
    return HeadWithLora(family.build_head(model, manifest.cut_layer), family, lora.rank, lora.alpha, lora.targets)


def test_the_graphs_equal_the_pytorch_head_at_every_length(dynamic: Path, tiny_model_dirs: dict[str, Path]) -> None:
    head = Head(dynamic)
    reference = torch_head(tiny_model_dirs[FAMILY], head.manifest)
    rng = np.random.default_rng(0)
    adapters = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in head.initial_adapters().items()}
    for length in LENGTHS:
        input_ids = rng.integers(0, 100, (2, length))
        mask = np.ones((2, length), dtype=np.int64)
        mask[1, max(1, length // 2) :] = 0  # the second row right-padded
        forward = head.forward(input_ids, mask, adapters)
        grads_in = rng.standard_normal(forward.activations.shape).astype(np.float32)
        grads = head.backward(forward, grads_in)

        matrices = {k: torch.from_numpy(v).requires_grad_(True) for k, v in adapters.items()}
        expected = reference(torch.from_numpy(input_ids), torch.from_numpy(mask), matrices)
        (expected * torch.from_numpy(grads_in)).sum().backward()
        np.testing.assert_allclose(forward.activations, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
        for name, matrix in matrices.items():
            assert matrix.grad is not None and matrix.grad.abs().max() > 0
            np.testing.assert_allclose(grads[name], matrix.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)
    assert len(head._graphs) == 1  # one session pair ran every length

    with pytest.raises(TrainingError, match=r"2 x 2\.\.16 tokens"):
        head.forward(np.zeros((2, 1), dtype=np.int64), np.ones((2, 1), dtype=np.int64), adapters)
    with pytest.raises(TrainingError, match=r"2 x 2\.\.16 tokens"):
        head.forward(np.zeros((2, FULL + 1), dtype=np.int64), np.ones((2, FULL + 1), dtype=np.int64), adapters)


def test_the_server_takes_any_length_the_manifest_lists(dynamic: Path, tmp_path: Path) -> None:
    (tmp_path / "eval.jsonl").write_text(json.dumps({"prompt": "w1", "completion": "w2"}) + "\n")
    strategy = build_strategy("split", StrategyOptions(dynamic, tmp_path / "eval.jsonl", 1))
    manifest = strategy.head.manifest
    rng = np.random.default_rng(0)
    for length in (MIN_SEQ_LEN, 7, FULL, 1, FULL + 1):
        tensors = {
            "activations": rng.standard_normal((2, length, manifest.hidden_size)).astype(np.float32),
            "attention_mask": np.ones((2, length), dtype=np.int64),
            "labels": rng.integers(0, manifest.vocab_size, (2, length)),
        }
        if length in manifest.seq_lengths:
            strategy.check_step(tensors)
        else:
            with pytest.raises(TrainingError, match=r"for 2 <= T <= 16"):
                strategy.check_step(tensors)


def write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(10):  # rows of 3 to 12 tokens: batches of different longest rows
        a = int(rng.integers(0, 60))
        completion = " ".join(f"w{a + 1 + i}" for i in range(int(rng.integers(1, 11))))
        lines.append(json.dumps({"prompt": f"w{a}", "completion": completion}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("group_by_length", [False, True], ids=["random-batches", "grouped-by-length"])
def test_a_run_cuts_each_batch_to_its_longest_row_and_trains_as_centralised_training(
    dynamic: Path, tiny_model_dirs: dict[str, Path], tmp_path: Path, group_by_length: bool
) -> None:
    rounds, steps, learning_rate = 1, 4, 0.01
    write_data(tmp_path / "data.jsonl")
    lengths = load_manifest(dynamic).seq_lengths
    from edgesplit.client.client import Client, ClientConfig

    config = ClientConfig(
        server="ws://unused", artifacts=dynamic, data=tmp_path / "data.jsonl", client_id="only", quiet=True
    )
    client = Client(config)

    def drawn(grouped: bool) -> list[Batch]:
        return list(itertools.islice(iterate_batches(client.encoded, 2, 0, group_by_length=grouped), rounds * steps))

    batches = drawn(group_by_length)
    widths = [fit_to_bucket(b, lengths).input_ids.shape[1] for b in batches]
    longest = [int(np.flatnonzero(b.attention_mask.any(axis=0))[-1]) + 1 for b in batches]
    assert widths == [max(n, MIN_SEQ_LEN) for n in longest] and len(set(widths)) > 1 and max(widths) < FULL

    summary: dict[str, Any] = {}
    split_losses = asyncio.run(
        federated_run(
            dynamic, tmp_path / "data.jsonl", tmp_path / "ckpt", rounds, steps, learning_rate, "only",
            group_by_length=group_by_length, summary=summary,
        )
    )  # fmt: skip
    # The client says what it computed: each batch at its own width, and how much of that was real.
    assert summary["computed_tokens"] == 2 * sum(widths) and summary["group_by_length"] is group_by_length
    assert summary["real_tokens"] == sum(int(b.attention_mask.sum()) for b in batches)
    if group_by_length:  # like lengths together: less padding than the same seed's random batches
        plain = drawn(False)
        plain_computed = sum(2 * fit_to_bucket(b, lengths).input_ids.shape[1] for b in plain)
        plain_share = sum(int(b.attention_mask.sum()) for b in plain) / plain_computed
        assert summary["real_tokens"] / summary["computed_tokens"] > plain_share
    losses = {}
    for rate in (learning_rate, 1e-12):  # the run's rate, and one that leaves the model as it was
        model = AutoModelForCausalLM.from_pretrained(
            tiny_model_dirs[FAMILY], attn_implementation="eager", dtype=torch.float32
        )
        prepare_for_training(model)
        reference = reference_for_artifacts(model, dynamic, seed=0)
        data = ((b.input_ids, b.attention_mask, b.labels) for b in batches)
        losses[rate] = train_centralized(reference, data, OptimizerSettings(rate))
    np.testing.assert_allclose(split_losses, losses[learning_rate], rtol=1e-4)
    # It learns: the steps after the first give their batches less loss than the untrained model does (in sum;
    # on random batches at the last step too, where the grouped batches' last margin is within 1e-3).
    trained, untrained = split_losses[1:], losses[1e-12][1:]
    assert sum(trained) < sum(untrained), (trained, untrained)
    assert group_by_length or trained[-1] < untrained[-1], (trained, untrained)


def test_an_int8_dynamic_head_runs_every_length_near_the_fp32_one(tiny_artifacts, dynamic: Path) -> None:  # type: ignore[no-untyped-def]
    int8 = Head(tiny_artifacts(FAMILY, 1, dynamic_seq=True, quantize="int8"))
    fp32 = Head(dynamic)
    assert int8.manifest.dynamic_seq and int8.manifest.quantize == "int8"
    check = int8.manifest.self_check
    assert check is not None and set(check["lengths"]) == {str(MIN_SEQ_LEN), "9"}
    rng = np.random.default_rng(1)
    adapters = {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in fp32.initial_adapters().items()}
    for length in LENGTHS:
        input_ids = rng.integers(0, 100, (2, length))
        mask = np.ones((2, length), dtype=np.int64)
        grads_in = rng.standard_normal((2, length, fp32.manifest.hidden_size)).astype(np.float32)
        quantised, exact = int8.forward(input_ids, mask, adapters), fp32.forward(input_ids, mask, adapters)
        difference = np.linalg.norm(quantised.activations - exact.activations) / np.linalg.norm(exact.activations)
        assert 0 < difference < 0.1, (length, difference)  # int8 weights: close, not equal
        grads, expected = int8.backward(quantised, grads_in), fp32.backward(exact, grads_in)
        for name, value in expected.items():
            error = np.linalg.norm(grads[name] - value) / np.linalg.norm(value)
            assert error < 0.25, (length, name, error)


def test_flags_a_dynamic_head_does_not_go_with_are_refused_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match="--dynamic-seq takes every length"):
        ExportConfig(max_seq_len=16, seq_buckets=(8,), dynamic_seq=True)
    with pytest.raises(ExportError, match="--dynamic-seq takes every length"):
        ExportConfig(max_seq_len=16, top_layers=1, dynamic_seq=True)
    ExportConfig(max_seq_len=16, seq_buckets=(16,), dynamic_seq=True)  # the full length alone is no bucket
    missing = str(tmp_path / "no-model-here")  # a load would fail differently
    for extra in (["--seq-buckets", "8"], ["--top-layers", "1"]):
        with pytest.raises(SystemExit):
            export_main(["--model", missing, "--cut-layer", "1", "--max-seq-len", "16", "--dynamic-seq", *extra])
        error = capsys.readouterr().err.strip().splitlines()
        assert "--dynamic-seq takes every length from 2 to --max-seq-len" in error[-1] and "Traceback" not in error
