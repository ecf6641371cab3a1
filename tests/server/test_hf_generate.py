"""Batched, left-padded generation with a KV cache gives what a greedy loop over the full model gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgesplit.cli import main as edgesplit_main
from edgesplit.errors import ArtifactError
from edgesplit.server.hf_generate import GenerationSettings, generate, load_for_generation

PROMPTS = ["w1 w2 w3 w4 w5", "w7", "w10 w11 w12"]  # different lengths: the batch is padded on the left
MAX_NEW_TOKENS = 6


def write_random_adapter(base_dir: Path, out: Path) -> Path:
    """A PEFT adapter whose B matrices are random (not zero), so that it changes what the model says."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    targets = ["c_attn"] if model.config.model_type == "gpt2" else ["q_proj", "v_proj"]
    config = LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(model, config).save_pretrained(str(out))
    # The adapter names its base as the directory it was made from, as `edgesplit adapter` does.
    settings = json.loads((out / "adapter_config.json").read_text())
    settings["base_model_name_or_path"] = str(base_dir)
    (out / "adapter_config.json").write_text(json.dumps(settings))
    return out


def greedy_by_hand(model: torch.nn.Module, token_ids: list[int], eos: int, max_new_tokens: int) -> list[int]:
    """One prompt, no padding, no cache: the whole sequence through the model for every new token."""
    tokens = list(token_ids)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits  # (1, T, V)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            tokens.append(token)
    return new


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_cached_generation_equals_a_greedy_loop(tiny_model_dirs, tmp_path, family) -> None:
    adapter_dir = write_random_adapter(tiny_model_dirs[family], tmp_path / "adapter")
    model, tokenizer = load_for_generation(None, adapter_dir)  # the base comes from the adapter's config
    completions = generate(model, tokenizer, PROMPTS, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=2))

    reference_tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs[family])
    eos = reference_tokenizer.eos_token_id
    base_outputs = []
    for prompt, completion in zip(PROMPTS, completions, strict=True):
        token_ids = reference_tokenizer(prompt)["input_ids"]
        assert list(completion.tokens) == greedy_by_hand(model, token_ids, eos, MAX_NEW_TOKENS), prompt
        assert completion.output == reference_tokenizer.decode(list(completion.tokens), skip_special_tokens=True)
        with model.disable_adapter():
            base_outputs.append(greedy_by_hand(model, token_ids, eos, MAX_NEW_TOKENS))
    # The adapter was applied: without it the model says something else for at least one prompt.
    assert [list(c.tokens) for c in completions] != base_outputs


def test_the_command_writes_json_lines_from_a_data_file(tiny_model_dirs, tmp_path, capsys) -> None:
    family = FAMILIES[0]
    adapter_dir = write_random_adapter(tiny_model_dirs[family], tmp_path / "adapter")
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "completion": "w1"}) for p in PROMPTS) + "\n")
    out = tmp_path / "outputs.jsonl"
    argv = ["generate", "--adapter", str(adapter_dir), "--data", str(data), "--max-new-tokens", "3", "--out", str(out)]
    assert edgesplit_main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p + "\n" for p in PROMPTS]  # as training formats a prompt
    assert all(r["target"] == "w1" and isinstance(r["output"], str) for r in records)

    assert edgesplit_main(["generate", "--adapter", str(tmp_path), "--prompt", "w1"]) == 1
    assert "no PEFT adapter" in capsys.readouterr().err
    with pytest.raises(ArtifactError, match="--base"):
        load_for_generation(None, None)
