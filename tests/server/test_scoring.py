"""Scoring through the run's PEFT adapter (whole model, KV cache) gives the split model's own generations.

A short real run (a server and one client over websockets) trains both halves of a tiny model; the old
scoring path (the ONNX head with the global adapters, the tail with its LoRA, the whole window rerun per
token) and the new one (edgesplit.server.scoring) must generate the same tokens, score the same and report
the same eval loss, before training and after, greedy and fp32.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import FAMILIES
from loopback import federated_run, write_task

from edgesplit.client.data import encode_examples, load_tokenizer, read_jsonl
from edgesplit.client.head import Head
from edgesplit.server.adapter import export_adapter
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.generate import SplitGenerator, eval_loss_and_tokens, score
from edgesplit.server.scoring import AdapterGenerator
from edgesplit.server.tail import Tail

ROUNDS, STEPS, LEARNING_RATE = 2, 3, 0.05


@dataclass
class Paths:
    untrained: SplitGenerator  # the split model as the export left it (the head's initial adapters)
    trained: SplitGenerator  # its tail with the run's LoRA (the head's adapters: `adapters`)
    adapters: dict[str, np.ndarray]
    fast: AdapterGenerator  # the whole model; None runs the base model, "trained" the run's adapter
    root: Path


def both_paths(artifacts: Path, root: Path) -> Paths:
    """After a short run: the split model before and after it, and the adapter generator."""
    asyncio.run(federated_run(artifacts, root / "train.jsonl", root / "ckpt", ROUNDS, STEPS, LEARNING_RATE))
    checkpoint = load_latest(root / "ckpt")
    assert checkpoint is not None
    head, tokenizer = Head(artifacts), load_tokenizer(artifacts)
    untrained_tail, tail = Tail(artifacts), Tail(artifacts)
    tail.load_state_dict({"lora": checkpoint.tail_lora, "optimizer": checkpoint.tail_optimizer})
    untrained_tail.model.eval()
    tail.model.eval()
    fast = AdapterGenerator(artifacts, batch_size=3)  # batches other than the head's 2: padding differs too
    export_adapter(root / "ckpt", artifacts, root / "adapter")
    fast.add_adapter("trained", root / "adapter")
    return Paths(
        SplitGenerator(head, untrained_tail, tokenizer),
        SplitGenerator(head, tail, tokenizer),
        dict(checkpoint.global_adapters),
        fast,
        root,
    )


@pytest.fixture(scope="module")
def runs(tiny_artifacts, tmp_path_factory):  # type: ignore[no-untyped-def]
    made = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"scoring-{family}")
        write_task(root / "train.jsonl", seed=0, count=16)
        write_task(root / "eval.jsonl", seed=1, count=7)
        made[family] = both_paths(tiny_artifacts(family, 1), root)
    return made


@pytest.mark.parametrize("family", FAMILIES)
def test_the_adapter_path_generates_the_split_models_tokens(runs, family) -> None:  # type: ignore[no-untyped-def]
    paths: Paths = runs[family]
    window = paths.trained.max_seq_len
    # Lengths 1 to past the window: the long ones stop where the split model's window stops them.
    prompts = [[5, 9, 14], [20, 21, 22, 23, 24, 25, 26], [7], list(range(3, window)), list(range(3, window + 8))]
    before = paths.untrained.generate(prompts, paths.untrained.head.initial_adapters(), max_new_tokens=8)
    after = paths.trained.generate(prompts, paths.adapters, max_new_tokens=8)
    assert paths.fast.generate(prompts, None, max_new_tokens=8) == before
    assert paths.fast.generate(prompts, "trained", max_new_tokens=8) == after
    assert after != before  # the run changed what the model says: the adapter is not a no-op here
    assert len(after[-1]) <= 2  # past the window: the prompt's last window - 1 tokens, then room for 2


@pytest.mark.parametrize("family", FAMILIES)
def test_the_demos_score_and_eval_loss_are_the_same_on_both_paths(runs, family) -> None:  # type: ignore[no-untyped-def]
    paths: Paths = runs[family]
    examples = read_jsonl(paths.root / "eval.jsonl")
    initial = paths.untrained.head.initial_adapters()
    cases = ((paths.untrained, initial, None), (paths.trained, paths.adapters, "trained"))
    for split, old_adapters, new_adapter in cases:
        old, new = score(split, examples, old_adapters), score(paths.fast, examples, new_adapter)
        assert new.generations == old.generations
        assert (new.exact_match, new.token_accuracy) == (old.exact_match, old.token_accuracy)

        manifest = split.head.manifest
        encoded = encode_examples(
            split.tokenizer, examples, manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
        )
        batches = -(-len(examples) // manifest.batch_size)
        old_loss, old_tokens = eval_loss_and_tokens(split.head, split.tail, encoded, old_adapters, batches)
        new_loss, new_tokens = paths.fast.eval_loss(encoded, new_adapter, batches, manifest.batch_size)
        assert new_tokens == old_tokens > 0
        assert new_loss == pytest.approx(old_loss, rel=1e-5)
