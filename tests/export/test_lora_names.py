"""One adapter naming: absolute layer plus the module's path in the layer, the same keys PEFT uses."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from edgesplit.export.families import family_for, prepare_for_training
from edgesplit.export.lora import HeadWithLora
from edgesplit.lora_names import (
    AdapterName,
    adapter_name,
    from_peft_key,
    gradient_name,
    is_adapter_name,
    matches_target,
    parse_adapter_name,
    to_peft_keys,
)


def load(model_dir: object) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    prepare_for_training(model)
    return model.eval()


def test_a_name_says_layer_module_path_and_matrix() -> None:
    name = adapter_name(3, "self_attn.q_proj", "A")
    assert name == "layers.3.self_attn.q_proj.lora_A"
    assert parse_adapter_name(name) == AdapterName(3, "self_attn.q_proj", "A")
    assert parse_adapter_name("layers.12.mlp.experts.0.w1.lora_B") == AdapterName(12, "mlp.experts.0.w1", "B")
    assert gradient_name(name) == "grad.layers.3.self_attn.q_proj.lora_A"
    assert not is_adapter_name(gradient_name(name))


NOT_NAMES = ["lora.0.q_proj.A", "layers.x.q.lora_A", "layers.0.lora_A", "layers.0.q.lora_C", "", "layers.-1.q.lora_A"]


@pytest.mark.parametrize("bad", NOT_NAMES)
def test_anything_else_is_not_a_name(bad: str) -> None:
    assert not is_adapter_name(bad)
    with pytest.raises(ValueError, match="not an adapter name"):
        parse_adapter_name(bad)


@pytest.mark.parametrize("fields", [(-1, "q_proj", "A"), (0, "q proj", "A"), (0, "q_proj", "C"), (True, "q", "A")])
def test_the_parts_are_checked(fields: tuple[object, str, str]) -> None:
    with pytest.raises(ValueError):
        AdapterName(*fields)  # type: ignore[arg-type]


def test_peft_keys_both_ways() -> None:
    name = AdapterName(5, "attn.c_proj", "B")
    assert name.peft_key("transformer.h") == "base_model.model.transformer.h.5.attn.c_proj.lora_B.weight"
    assert name.peft_key("model.layers", "default") == (
        "base_model.model.model.layers.5.attn.c_proj.lora_B.default.weight"
    )
    assert from_peft_key(name.peft_key("transformer.h"), "transformer.h") == name
    # A tail of layers [3, L) numbers them from 0: its layer 2 is the model's layer 5.
    tail_key = "base_model.model.transformer.h.2.attn.c_proj.lora_B.default.weight"
    assert from_peft_key(tail_key, "transformer.h", first_layer=3) == name
    assert from_peft_key("base_model.model.transformer.h.2.attn.c_proj.base_layer.weight", "transformer.h") is None
    assert from_peft_key("base_model.model.lm_head.weight", "transformer.h") is None
    assert to_peft_keys({str(name): 1}, "transformer.h") == {name.peft_key("transformer.h"): 1}
    with pytest.raises(ValueError, match="not an adapter name"):
        to_peft_keys({"lm_head.weight": 1}, "transformer.h")


def test_targets_match_by_whole_path_or_its_last_parts() -> None:
    assert matches_target("attn.c_proj", ("c_proj",)) and matches_target("mlp.c_proj", ("c_proj",))
    assert matches_target("mlp.c_proj", ("mlp.c_proj",)) and not matches_target("attn.c_proj", ("mlp.c_proj",))
    assert not matches_target("attn.xc_proj", ("c_proj",))


def test_gpt2s_two_c_proj_modules_get_distinct_names(tiny_model_dirs) -> None:
    model = load(tiny_model_dirs["gpt2"])
    family = family_for(model)
    head = HeadWithLora(family.build_head(model, 2), family, rank=4, alpha=8.0, targets=("c_proj",))
    hidden, inner = 32, 4 * 32  # GPT-2's MLP widens to 4 x n_embd
    for layer in (0, 1):
        assert head.shapes[f"layers.{layer}.attn.c_proj.lora_A"] == (4, hidden)
        assert head.shapes[f"layers.{layer}.mlp.c_proj.lora_A"] == (4, inner)  # in_features from the module
        assert head.shapes[f"layers.{layer}.mlp.c_proj.lora_B"] == (hidden, 4)
    assert len(head.shapes) == 2 * 2 * 2  # two layers, two modules, A and B: nothing collapsed into one
    # Both matrices really act: changing the MLP's B changes the output, and so does the attention's.
    lora = head.initial_lora(seed=0)
    input_ids = torch.randint(3, 128, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        base = head(input_ids, mask, lora)
        for module in ("attn", "mlp"):
            changed = dict(lora, **{f"layers.1.{module}.c_proj.lora_B": torch.ones(hidden, 4)})
            assert not torch.allclose(head(input_ids, mask, changed), base), module


@pytest.mark.parametrize("family_name", FAMILIES)
def test_names_map_onto_a_real_peft_models_keys_and_shapes(tiny_model_dirs, family_name: str) -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = load(tiny_model_dirs[family_name])
    family = family_for(model)
    targets = family.lora_targets + (("c_proj",) if family_name == "gpt2" else ("o_proj", "down_proj"))
    head = HeadWithLora(copy.deepcopy(model), family, 4, 8.0, targets, full_model=True)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8.0, target_modules=list(targets), fan_in_fan_out=family.weight_is_in_out),
    )
    saved = get_peft_model_state_dict(peft_model)  # the keys of adapter_model.safetensors
    assert to_peft_keys(head.shapes, family.layers_path) == {key: tuple(value.shape) for key, value in saved.items()}
    live = {name for name, parameter in peft_model.named_parameters() if parameter.requires_grad}
    assert {str(from_peft_key(key, family.layers_path)) for key in live} == set(head.shapes)
