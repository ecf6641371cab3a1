"""Every family's split, in PyTorch: head (layers [0, cut)) then tail (the rest) reproduces the full model.

One cheap check per model type the adapters handle (tests/tiny_models.py PARITY_CONFIGS), for the first and
the last cut, with and without padding: the head is `Family.build_head`, the tail is built as the server
builds it, from the config and weights an export writes (`tail_config` through JSON, `tail_state_dict`),
with PEFT's LoRA on the family's default targets. The ONNX graphs are checked for a representative few in
test_export.py and by every export's self-check (edgesplit/export/selfcheck.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import PARITY_CONFIGS, tiny_model
from transformers import AutoConfig

from edgesplit.errors import ExportError
from edgesplit.export.families import GENERIC, family_for, prepare_for_training, slice_config
from edgesplit.export.lora import HeadWithLora

FAMILY_NAMES = sorted(PARITY_CONFIGS)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def split_logits(model: torch.nn.Module, cut_layer: int, input_ids: torch.Tensor, mask: torch.Tensor, tmp_path):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    family = family_for(model)
    head = family.build_head(model, cut_layer)
    family.tail_config(model, cut_layer).to_json_file(str(tmp_path / "config.json"))
    tail = family.build_tail(AutoConfig.from_pretrained(tmp_path), family.tail_state_dict(model, cut_layer))
    targets = list(family.lora_targets)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=family.weight_is_in_out)
    tail = get_peft_model(tail, lora)  # B starts at zero: the adapted tail computes what the base does
    with torch.no_grad():
        activations = head(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        return tail(inputs_embeds=activations, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_head_then_tail_reproduces_the_full_model(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model(name)
    prepare_for_training(model)
    family = family_for(model)
    assert family is not GENERIC, f"{name} should have its own adapter"
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 128, (2, 12), generator=generator)
    num_layers = family.num_layers(model)
    assert num_layers == 3
    for padded in (False, True):
        mask = torch.ones_like(input_ids)
        if padded:  # right padding on the last row
            mask[-1, 7:] = 0
        with torch.no_grad():
            full = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
        for cut_layer in (1, num_layers - 1):
            (tmp_path / f"{cut_layer}{padded}").mkdir()
            logits = split_logits(model, cut_layer, input_ids, mask, tmp_path / f"{cut_layer}{padded}")
            error = relative_error(logits, full)
            assert error < 1e-5, f"{name} cut {cut_layer} padded={padded}: relative error {error:.2e}"
    head = HeadWithLora(family.build_head(model, 1), family, 2, 4.0, family.lora_targets)
    assert head.shapes, f"{name}: no LoRA target {family.lora_targets} in the head"


def test_smollm3_layers_without_rotary_follow_the_cut() -> None:
    config = AutoConfig.for_model("smollm3", num_hidden_layers=8, no_rope_layers=[1, 1, 1, 0, 1, 1, 1, 0])
    assert slice_config(config, 3, 8).no_rope_layers == [0, 1, 1, 1, 0]
    assert slice_config(config, 0, 3).no_rope_layers == [1, 1, 1]


def test_a_model_in_the_standard_layout_needs_no_adapter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model("llama")
    model.config.model_type = "some_new_decoder"  # a model type no adapter names
    prepare_for_training(model)
    assert family_for(model) is GENERIC
    input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    model.config.model_type = "llama"  # for AutoModelForCausalLM to rebuild the tail
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    assert relative_error(split_logits(model, 2, input_ids, mask, tmp_path), full) < 1e-5


def test_mixture_of_experts_is_refused_with_the_reason() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    with pytest.raises(ExportError, match="mixture-of-experts"):
        family_for(MixtralForCausalLM(config))


# The full export, for a representative few: Gemma 3 (sliding-window layers, the embedding scaled inside its
# module), read from a GGUF file laid out as llama.cpp's conversion writes it, and OPT (learned positions
# offset by 2, the decoder nested in model.decoder, project_in/out hooks). Llama and GPT-2 are exported in
# test_export.py.
@pytest.mark.parametrize("name", ["gemma3_text", "opt"])
def test_exported_head_and_served_tail_reproduce_the_model(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    from tiny_models import save_tiny_gemma3_gguf, save_tiny_model
    from transformers import AutoModelForCausalLM

    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.head import Head
    from edgesplit.export.exporter import ExportConfig, export
    from edgesplit.export.preflight import known_depth
    from edgesplit.server.tail import Tail

    if name == "gemma3_text":
        source = save_tiny_gemma3_gguf(tmp_path / "tiny-gemma3.gguf")
        assert known_depth(str(source)) == 3  # from the header
        model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name, dtype=torch.float32)
    else:
        source = save_tiny_model(name, tmp_path / "model")
        model = tiny_model(name)
    prepare_for_training(model)
    out = tmp_path / "artifacts"
    export(ExportConfig(model=str(source), cut_layer=1, out=out, batch_size=2, max_seq_len=8, lora_rank=4))
    manifest = load_manifest(out)
    assert manifest.architecture == type(model).__name__ and manifest.num_layers == 3
    check = manifest.self_check
    assert check is not None and check["logits_relative_error"] < 1e-5
    assert check["lora_gradients_relative_error"] < 1e-4

    head, tail = Head(out), Tail(out)
    input_ids = np.random.default_rng(0).integers(3, 128, size=(2, 8)).astype(np.int64)
    mask = np.ones_like(input_ids)
    mask[-1, 5:] = 0
    activations = head.forward(input_ids, mask, head.initial_adapters()).activations
    with torch.no_grad():
        split = tail._logits(torch.from_numpy(activations), torch.from_numpy(mask))
        full = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask)).logits
    keep = torch.from_numpy(mask).bool()
    assert relative_error(split[keep], full[keep]) < 1e-5
    assert tail.adapters  # PEFT found the family's LoRA targets in the tail


def test_an_export_that_does_not_reproduce_the_model_is_refused(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A wrong adapter (GPT-2's tail adding its learned positions a second time) is caught by the self-check."""
    import dataclasses

    from tiny_models import save_tiny_model

    from edgesplit.export import families
    from edgesplit.export.exporter import ExportConfig, export

    wrong = dataclasses.replace(families.GPT2, tail_zero_attrs=())
    monkeypatch.setattr(families, "FAMILIES", (wrong, *families.FAMILIES))
    model_dir = save_tiny_model("gpt2", tmp_path / "model")
    with pytest.raises(ExportError, match="does not reproduce the model: self-check: logits"):
        config = ExportConfig(model=str(model_dir), cut_layer=1, out=tmp_path / "a", max_seq_len=8, frozen_head=True)
        export(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no artifacts, no half-made directory


def test_a_frozen_head_exports_at_several_cuts(tmp_path: Path) -> None:
    """A mixed-cut export checks each shorter cut's activations against the PyTorch head with its LoRA at zero:
    a frozen head's graph takes no LoRA matrix, but its module still holds them (once a KeyError)."""
    from tiny_models import save_tiny_model

    from edgesplit.client.artifacts import load_manifest
    from edgesplit.export.exporter import ExportConfig, export

    model_dir = save_tiny_model("llama", tmp_path / "model")
    config = ExportConfig(model=str(model_dir), cut_layers=(1, 2), out=tmp_path / "a", max_seq_len=8, frozen_head=True)
    export(config)
    manifest = load_manifest(tmp_path / "a")
    assert manifest.frozen_head and [cut.cut_layer for cut in manifest.cuts] == [1, 2]
