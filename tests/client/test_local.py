"""Whole-model heads (FedLLM, KD-FedLLM): exact logits, and local training equal to PyTorch LoRA training."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from edgesplit.client.data import EncodedSet, encode_examples, iterate_batches, read_jsonl
from edgesplit.client.head import Head
from edgesplit.client.local import LocalTrainer, distil_positions, eval_loss, proxy_top_k
from edgesplit.errors import ArtifactError
from edgesplit.export.families import prepare_for_training
from edgesplit.server.centralized import build_reference, train_centralized
from edgesplit.server.tail import OptimizerSettings


def encoded_task(artifacts: Path, tmp_path: Path, count: int = 10):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(count):
        a = int(rng.integers(0, 60))
        lines.append(json.dumps({"prompt": f"w{a} w{a + 3}", "completion": f"w{a + 1} w{a + 2}"}))
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    head = Head(artifacts)
    tokenizer = Tokenizer.from_file(str(artifacts / "tokenizer.json"))
    manifest = head.manifest
    return head, encode_examples(
        tokenizer,
        read_jsonl(tmp_path / "data.jsonl"),
        manifest.max_seq_len,
        manifest.eos_token_id,
        manifest.pad_token_id or 0,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_local_training_equals_pytorch_lora_training(tiny_artifacts, tiny_model_dirs, tmp_path, family) -> None:
    artifacts = tiny_artifacts(family, full_model=True)
    head, encoded = encoded_task(artifacts, tmp_path)
    assert head.manifest.full_model and head.manifest.cut_layer == head.manifest.num_layers
    assert not (artifacts / "tail").exists()
    initial = head.initial_adapters()
    trainer = LocalTrainer(head, {k: v.copy() for k, v in initial.items()}, learning_rate=0.01)
    # Two batches, three times over: enough repetition that the loss must fall, so the match is not of idle runs.
    batches = list(itertools.islice(iterate_batches(encoded, head.manifest.batch_size, seed=0), 2)) * 3
    local_losses = [trainer.cross_entropy_step(b) for b in batches]

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs[family], attn_implementation="eager", dtype=torch.float32
    )
    prepare_for_training(model)
    reference = build_reference(model, head.manifest, initial, {})
    central = train_centralized(
        reference, ((b.input_ids, b.attention_mask, b.labels) for b in batches), OptimizerSettings(learning_rate=0.01)
    )
    np.testing.assert_allclose(local_losses, central, rtol=1e-4)
    assert central[-1] < central[0]
    # eval_loss over the first batch's examples, with the initial adapters, is that batch's training loss.
    first = EncodedSet(batches[0].input_ids, batches[0].attention_mask, batches[0].labels, 0, 0)
    assert abs(eval_loss(head, initial, first, max_batches=1) - local_losses[0]) < 1e-5


def test_proxy_top_k_has_one_row_per_example(tiny_artifacts, tmp_path) -> None:
    head, encoded = encoded_task(tiny_artifacts("llama", full_model=True), tmp_path, count=5)
    values, indices = proxy_top_k(head, head.initial_adapters(), encoded, k=3)
    assert values.shape == (5, head.manifest.max_seq_len, 3) and indices.shape == values.shape
    # A labelled proxy: top-k only where the next token is the completion's (or its EOS), 0 on the prompt
    # and the padding.
    distilled = distil_positions(encoded) == 1
    assert distilled.sum() == (encoded.labels != -100).sum()
    assert np.all(values[~distilled] == 0) and np.all(values[distilled].sum(-1) > 0)
    # Plain inputs (no target anywhere): every real position.
    plain = EncodedSet(encoded.input_ids, encoded.attention_mask, np.full_like(encoded.labels, -100), 0, 0)
    values, _ = proxy_top_k(head, head.initial_adapters(), plain, k=3)
    padded = encoded.attention_mask == 0
    assert np.all(values[padded] == 0) and np.all(values[~padded].sum(-1) > 0)


def test_split_head_is_refused_for_local_training(tiny_artifacts) -> None:
    head = Head(tiny_artifacts("llama", 1))
    with pytest.raises(ArtifactError, match="--full-model"):
        LocalTrainer(head, head.initial_adapters(), learning_rate=0.01)
