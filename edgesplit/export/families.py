"""Per-architecture split rules: where the decoder layers live, and how to cut a model into head and tail.

Each supported family is one small `Family` adapter. `family_for(model)` walks `FAMILIES` and the first
adapter whose `matches` accepts the model wins, as PEFT dispatches its layer types. Adding a family is adding
one adapter to the list.

Shapes at the cut: the head maps input_ids (B, T) to activations (B, T, H), the hidden state after decoder
layer `cut_layer` (before any final norm); the tail maps activations (B, T, H) to logits (B, T, V).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from edgesplit.errors import ExportError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Family:
    """How one architecture family is laid out inside its Hugging Face causal-LM class."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values this adapter handles
    backbone_attr: str  # the base model inside the causal LM: "model" (Llama) or "transformer" (GPT-2)
    layers_attr: str  # the decoder layers inside the backbone
    final_norm_attr: str  # the norm applied after the last layer
    lora_targets: tuple[str, ...]  # default LoRA target module names
    # GPT-2 adds learned position embeddings to its inputs; the head has done that already, so the tail's
    # copy must add nothing.
    tail_zero_attrs: tuple[str, ...] = ()
    # GPT-2's Conv1D stores weights as (in, out) where nn.Linear stores (out, in): PEFT's fan_in_fan_out.
    weight_is_in_out: bool = False

    def matches(self, model: nn.Module) -> bool:
        return getattr(model.config, "model_type", None) in self.model_types

    def backbone(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.backbone_attr)  # type: ignore[no-any-return]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.backbone(model), self.layers_attr)  # type: ignore[no-any-return]

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    @property
    def layers_path(self) -> str:
        """Where the decoder layers are in the causal LM, as PEFT's keys spell it: "model.layers"."""
        return f"{self.backbone_attr}.{self.layers_attr}"

    def build_head(self, model: nn.Module, cut_layer: int) -> nn.Module:
        """A copy of the backbone keeping layers [0, cut_layer) and no final norm: (B, T) -> (B, T, H)."""
        backbone = copy.deepcopy(self.backbone(model))
        setattr(backbone, self.layers_attr, nn.ModuleList(list(getattr(backbone, self.layers_attr))[:cut_layer]))
        setattr(backbone, self.final_norm_attr, nn.Identity())
        backbone.config = slice_config(backbone.config, 0, cut_layer)
        return backbone

    def tail_config(self, model: nn.Module, cut_layer: int) -> Any:
        """The config of a causal LM made of the layers after the cut, with its own (untied) LM head."""
        config = slice_config(model.config, cut_layer, self.num_layers(model))
        config.tie_word_embeddings = False
        return config

    def build_tail(self, config: Any, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """The server's tail: a causal LM of the tail's layers, called with inputs_embeds=activations.

        Its token embedding is never used (the activations come in instead), so it is swapped for a
        one-row placeholder rather than holding a vocabulary-sized table for nothing.
        """
        from transformers import AutoModelForCausalLM

        # transformers leaves from_config and eval unannotated.
        tail: PreTrainedModel = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, attn_implementation="eager", dtype=torch.float32
        )
        backbone = cast("PreTrainedModel", self.backbone(tail))  # the base model inside a causal LM
        embedding = cast(nn.Embedding, backbone.get_input_embeddings())
        backbone.set_input_embeddings(nn.Embedding(1, embedding.embedding_dim))
        missing, unexpected = tail.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if "embed_tokens" not in k and ".wte." not in k and ".wpe." not in k]
        if missing or unexpected:
            raise ValueError(f"tail weights do not fit the tail config: missing {missing}, unexpected {unexpected}")
        for attr in self.tail_zero_attrs:
            nn.init.zeros_(getattr(backbone, attr).weight)
        tail.eval()  # type: ignore[no-untyped-call]
        return tail

    def tail_state_dict(self, model: nn.Module, cut_layer: int) -> dict[str, torch.Tensor]:
        """Weights the server needs: the layers after the cut (renumbered from 0), final norm, LM head."""
        state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
        tail = self.select_layers(state, cut_layer, self.num_layers(model))
        if "lm_head.weight" not in tail:  # tied embeddings: the LM head is the embedding table
            # transformers leaves get_output_embeddings unannotated; the LM head is an nn.Linear.
            lm_head: nn.Linear = cast("PreTrainedModel", model).get_output_embeddings()  # type: ignore[no-untyped-call]
            tail["lm_head.weight"] = lm_head.weight.detach().clone().contiguous()
        return tail

    def select_layers(self, state_dict: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        """The weights of layers [start, stop) of `state_dict`, renumbered from 0, with the final norm and the
        LM head; the embeddings and every other layer are left out (a tail reads its input as activations)."""
        prefix = f"{self.layers_path}."
        selected: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if name.startswith(prefix):
                index, rest = name[len(prefix) :].split(".", 1)
                if start <= int(index) < stop:
                    selected[f"{prefix}{int(index) - start}.{rest}"] = tensor
            elif name.startswith(f"{self.backbone_attr}.{self.final_norm_attr}.") or name.startswith("lm_head."):
                selected[name] = tensor
        return selected


LLAMA_LIKE = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
    backbone_attr="model",
    layers_attr="layers",
    final_norm_attr="norm",
    lora_targets=("q_proj", "v_proj"),
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    backbone_attr="transformer",
    layers_attr="h",
    final_norm_attr="ln_f",
    lora_targets=("c_attn",),
    tail_zero_attrs=("wpe",),
    weight_is_in_out=True,
)

FAMILIES: tuple[Family, ...] = (LLAMA_LIKE, GPT2)


def slice_config(config: Any, start: int, stop: int) -> Any:
    """A copy of `config` describing layers [start, stop) only."""
    config = copy.deepcopy(config)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):  # per-layer attention kinds (sliding windows) follow their layers
        config.layer_types = layer_types[start:stop]
    config.num_hidden_layers = stop - start
    return config


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_for(model: nn.Module) -> Family:
    for family in FAMILIES:
        if family.matches(model):
            return family
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ExportError(
        f"architecture {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
    )


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ExportError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def check_cut_layer(cut_layer: object, num_layers: int) -> int:
    """A cut after layer k keeps layers [0, k) on the device: 1 <= k <= num_layers - 1."""
    if isinstance(cut_layer, bool) or not isinstance(cut_layer, int):
        raise ExportError(f"--cut-layer must be an integer, got {cut_layer!r}")
    if not 1 <= cut_layer <= num_layers - 1:
        raise ExportError(
            f"--cut-layer {cut_layer} is out of range: this model has {num_layers} layers, so the cut must be "
            f"between 1 and {num_layers - 1} (at least one layer on each side)"
        )
    return cut_layer


def prepare_for_training(model: nn.Module) -> None:
    """Turn off dropout everywhere: the ONNX head has none, and both sides must compute the same function."""
    config = cast("PretrainedConfig", model.config)
    for attr in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if hasattr(config, attr):
            setattr(config, attr, 0.0)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    # Eager attention decomposes into plain ops that trace and differentiate cleanly.
    config._attn_implementation = "eager"
