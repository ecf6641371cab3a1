"""The demo's generated tasks: deterministic, held-out combinations unseen, and readable by edgesplit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import build_tokenizer

from edgesplit.client.data import dirichlet_partition, encode_examples, read_jsonl
from edgesplit.server.tasks import SHAPE_CODES, SHAPE_CODES_W, TASKS, generate, write_jsonl


def test_shape_codes_example_is_the_rule() -> None:
    example = SHAPE_CODES.example((0, 0, 0))
    assert example.prompt == "Convert to code: red circle big"
    assert example.completion == "R-C-B"
    assert example.group == 0
    purple_arrow_tiny = SHAPE_CODES.example((7, 7, 2))
    assert (purple_arrow_tiny.completion, purple_arrow_tiny.group) == ("P-A-T", 7)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_generate_is_deterministic_and_holds_out_unseen_combinations(name: str) -> None:
    task = TASKS[name]
    first = generate(task, num_train=100, num_eval=20, seed=3)
    assert first == generate(task, num_train=100, num_eval=20, seed=3)
    assert first != generate(task, num_train=100, num_eval=20, seed=4)
    assert len(first.train) == 100 and len(first.eval) == 20
    eval_prompts = {e.prompt for e in first.eval}
    assert len(eval_prompts) == 20  # distinct combinations
    assert not eval_prompts & {e.prompt for e in first.train}
    assert {e.group for e in first.train} == set(range(len(task.group_names)))


def test_more_training_examples_than_combinations_cycles() -> None:
    split = generate(SHAPE_CODES_W, num_train=500, num_eval=10, seed=0)
    assert len(split.train) == 500
    assert len({e.prompt for e in split.train}) == SHAPE_CODES_W.num_combinations - 10


def test_generate_refuses_a_split_with_nothing_left_to_train_on() -> None:
    with pytest.raises(ValueError, match="leaves none"):
        generate(SHAPE_CODES_W, num_train=10, num_eval=SHAPE_CODES_W.num_combinations, seed=0)


def test_written_files_load_as_edgesplit_data_and_split_by_group(tmp_path: Path) -> None:
    split = generate(SHAPE_CODES, num_train=120, num_eval=10, seed=0)
    path = tmp_path / "train.jsonl"
    write_jsonl(path, split.train)
    examples = read_jsonl(path)  # the "group" key is ignored by the reader
    assert [(e.prompt, e.completion) for e in examples] == [(e.prompt, e.completion) for e in split.train]
    groups = [json.loads(line)["group"] for line in path.read_text().splitlines()]
    parts = dirichlet_partition(groups, num_clients=3, alpha=0.1, seed=0)
    assert sorted(i for part in parts for i in part) == list(range(120))
    # Skewed: with alpha 0.1 a group lives mostly on one client (an IID split would give each about a third).
    shares = []
    for group in set(groups):
        members = [i for i, g in enumerate(groups) if g == group]
        shares.append(max(sum(i in part for i in members) for part in parts) / len(members))
    assert sum(shares) / len(shares) > 0.7


def test_tiny_task_tokenizes_without_unknown_words() -> None:
    tokenizer = build_tokenizer().backend_tokenizer
    split = generate(SHAPE_CODES_W, num_train=30, num_eval=5, seed=0)
    encoded = encode_examples(tokenizer, [_example(e) for e in split.train], 16, eos_token_id=2, pad_token_id=0)
    assert encoded.num_truncated == 0
    assert not (encoded.input_ids == tokenizer.token_to_id("<unk>")).any()
    assert (encoded.labels != -100).sum(axis=1).tolist() == [4] * 30  # three codes and EOS


def _example(task_example):  # type: ignore[no-untyped-def]
    from edgesplit.client.data import Example

    return Example(task_example.prompt, task_example.completion)
