"""Greedy generation through the split model (ORT head + torch tail) matches the whole model's, and scores."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_tokenizer
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from edgesplit.client.data import Example, load_tokenizer
from edgesplit.client.head import Head
from edgesplit.server.generate import SplitGenerator, score, token_accuracy
from edgesplit.server.tail import Tail


def reference_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """The unsplit model, one full forward per token, stopping after EOS as the generator does."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1]
            tokens.append(int(logits.argmax()))
            if tokens[-1] == eos:
                break
    return tokens


@pytest.fixture(scope="module")
def generator(tiny_artifacts) -> SplitGenerator:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts("llama", 1)
    head = Head(artifacts)
    tail = Tail(artifacts)
    tail.model.eval()
    return SplitGenerator(head, tail, load_tokenizer(artifacts))


def test_a_whole_model_head_generates_alone_as_the_whole_model_does(tiny_artifacts, tiny_model_dirs) -> None:  # type: ignore[no-untyped-def]
    # FedLLM and KD export the whole model to the device: no tail, the head's output is the logits.
    artifacts = tiny_artifacts("llama", 1, full_model=True)
    whole = SplitGenerator(Head(artifacts), None, load_tokenizer(artifacts))
    prompts = [[5, 9, 14], [20, 21, 22, 23, 24, 25, 26], [7]]
    outputs = whole.generate(prompts, whole.head.initial_adapters(), max_new_tokens=6)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == reference_greedy(tiny_model_dirs["llama"], prompt, 6, whole.eos_token_id)


def test_split_greedy_generation_matches_the_whole_model(generator, tiny_model_dirs) -> None:  # type: ignore[no-untyped-def]
    # Three prompts of different lengths with a batch of two: right padding, and a filler row in batch two.
    prompts = [[5, 9, 14], [20, 21, 22, 23, 24, 25, 26], [7]]
    adapters = generator.head.initial_adapters()  # LoRA B is zero: the adapted model is the base model
    outputs = generator.generate(prompts, adapters, max_new_tokens=6)
    eos = generator.eos_token_id
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == reference_greedy(tiny_model_dirs["llama"], prompt, 6, eos)


def test_generation_stops_when_the_window_is_full(generator) -> None:  # type: ignore[no-untyped-def]
    window = generator.max_seq_len
    long_prompt = list(range(3, 3 + window + 4))  # longer than the window: its end is kept
    (output,) = generator.generate([long_prompt], generator.head.initial_adapters(), max_new_tokens=10)
    # window - 1 prompt tokens, then room for one token, whose logits give a second one.
    assert len(output) == 2 or output[-1] == generator.eos_token_id


def test_adapters_change_the_generation(generator) -> None:  # type: ignore[no-untyped-def]
    adapters = generator.head.initial_adapters()
    rng = np.random.default_rng(0)
    changed = {name: (rng.standard_normal(a.shape) * 3).astype(np.float32) for name, a in adapters.items()}
    prompts = [[5, 9, 14], [30, 31, 32]]
    assert generator.generate(prompts, adapters, 6) != generator.generate(prompts, changed, 6)


@dataclass
class CannedGenerator:
    """Stands in for SplitGenerator: answers each prompt with a fixed list of token ids."""

    answers: dict[str, list[int]]
    tokenizer: Tokenizer
    eos_token_id: int = 2

    def generate(self, prompts: list[list[int]], adapters: object, max_new_tokens: int) -> list[list[int]]:
        return [self.answers[self.tokenizer.decode(p)][:max_new_tokens] for p in prompts]


def test_score_counts_exact_matches_and_token_accuracy() -> None:
    tokenizer = build_tokenizer().backend_tokenizer
    ids = {f"w{i}": tokenizer.token_to_id(f"w{i}") for i in range(10)}
    eos = 2
    canned = CannedGenerator(
        {
            "w0 w1": [ids["w5"], ids["w6"], eos],  # right, and stops
            "w0 w2": [ids["w5"], ids["w6"], ids["w6"]],  # right text but runs on: not exact
            "w0 w3": [ids["w5"], ids["w7"], eos],  # one token wrong
        },
        tokenizer,
    )
    examples = [Example("w0 w1", "w5 w6"), Example("w0 w2", "w5 w6"), Example("w0 w3", "w5 w6")]
    result = score(canned, examples, adapters={})  # type: ignore[arg-type]
    assert [g.exact for g in result.generations] == [True, False, False]
    assert result.exact_match == pytest.approx(1 / 3)
    assert [g.token_accuracy for g in result.generations] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert result.generations[0].output == "w5 w6"
    assert result.to_json()["count"] == 3


def test_each_prompt_is_generated_once_and_matches_any_of_its_references() -> None:
    tokenizer = build_tokenizer().backend_tokenizer
    ids = {f"w{i}": tokenizer.token_to_id(f"w{i}") for i in range(10)}
    canned = CannedGenerator({"w0 w1": [ids["w7"], ids["w8"], 2], "w0 w2": [ids["w5"], 2]}, tokenizer)
    asked: list[list[int]] = []
    answer = canned.generate

    def counting_generate(prompts: list[list[int]], adapters: object, max_new_tokens: int) -> list[list[int]]:
        asked.extend(prompts)
        return answer(prompts, adapters, max_new_tokens)

    canned.generate = counting_generate  # type: ignore[method-assign]
    # Two references for "w0 w1", as E2E lists several per input; the second is what the model says.
    examples = [Example("w0 w1", "w5 w6"), Example("w0 w2", "w9"), Example("w0 w1", "w7 w8")]

    result = score(canned, examples, adapters={})  # type: ignore[arg-type]

    assert len(asked) == 2  # one generation per distinct prompt, not per line
    assert [(g.prompt, g.exact, g.target) for g in result.generations] == [
        ("w0 w1", True, "w7 w8"),
        ("w0 w2", False, "w9"),
    ]
    assert result.generations[0].token_accuracy == 1.0 and result.exact_match == 0.5


def test_token_accuracy() -> None:
    assert token_accuracy([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_accuracy([1], [1, 2]) == 0.5
    assert token_accuracy([9, 2, 3, 4], [1, 2, 3]) == pytest.approx(2 / 3)
    assert token_accuracy([], []) == 1.0


def test_score_refuses_plain_text() -> None:
    canned = CannedGenerator({}, build_tokenizer().backend_tokenizer)
    with pytest.raises(ValueError, match="prompt/completion"):
        score(canned, [Example(None, "w1 w2")], adapters={})  # type: ignore[arg-type]
