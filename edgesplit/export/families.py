"""Per-architecture split rules: where the decoder layers live, and how to cut a model into head and tail.

Each supported family is one small `Family` adapter whose defaults are transformers' standard decoder layout;
an adapter sets only what differs from it. `family_for(model)` walks `FAMILIES` and the first adapter whose
`matches` accepts the model wins, as PEFT dispatches its layer types: an adapter names its model types, and
the last one, `GENERIC`, takes any other model in the standard layout, so that a new model in that layout
exports without new code (the export's self-check, selfcheck.py, then proves the split or refuses it).
Adding a family is adding one adapter to the list; docs/export.md has the table.

Both sides run transformers' own code: the head is the backbone with layers [0, cut) and no final norm, the
tail the model's causal-LM class built from a config of layers [cut, L), fed the activations as inputs_embeds.

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
    """How one architecture family is laid out inside its Hugging Face causal-LM class.

    The defaults describe transformers' standard decoder layout, `model.embed_tokens`, `model.layers`,
    `model.norm`, `model.rotary_emb` and `lm_head` (Llama, Mistral, Qwen, Gemma, Phi-3, Granite...): a family
    in that layout sets only its name, its model types and what differs.
    """

    name: str
    model_types: tuple[str, ...]  # config.model_type values this adapter handles
    backbone_attr: str = "model"  # the base model inside the causal LM, dotted: "transformer", "model.decoder"
    layers_attr: str = "layers"  # the decoder layers inside the backbone
    final_norm_attr: str = "norm"  # the norm applied after the last layer
    lm_head_attr: str = "lm_head"  # the LM head inside the causal LM
    embedding_attrs: tuple[str, ...] = ("embed_tokens",)  # input embeddings in the backbone: a tail has none
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # default LoRA target module names
    # Learned position embeddings (GPT-2's wpe, OPT's embed_positions) are added to the inputs; the head has
    # done that already, so the tail's copy must add nothing.
    tail_zero_attrs: tuple[str, ...] = ()
    # Backbone modules outside the layers that belong to one side only. OPT projects its embeddings in
    # (project_in) before the first layer and its output out (project_out) after the final norm: the tail
    # must not project the activations in again, the head must not project them out.
    tail_none_attrs: tuple[str, ...] = ()
    head_none_attrs: tuple[str, ...] = ()
    # Config values the tail needs changed because the model applies them to its input embeddings, which the
    # tail's activations replace (Granite's embedding_multiplier).
    tail_config_overrides: tuple[tuple[str, Any], ...] = ()
    # GPT-2's Conv1D stores weights as (in, out) where nn.Linear stores (out, in): PEFT's fan_in_fan_out.
    weight_is_in_out: bool = False
    # The generic adapter: it matches any model type whose causal LM is laid out as the defaults say.
    any_standard_layout: bool = False

    def matches(self, model: nn.Module) -> bool:
        if getattr(model.config, "model_type", None) in self.model_types:
            return True
        return self.any_standard_layout and self.has_layout(model)

    def has_layout(self, model: nn.Module) -> bool:
        """Whether `model` holds its layers, final norm, embeddings and LM head where this family says."""
        try:
            backbone = self.backbone(model)
            layers = getattr(backbone, self.layers_attr)
            parts = [getattr(backbone, self.final_norm_attr), model.get_submodule(self.lm_head_attr)]
            parts += [getattr(backbone, attr) for attr in self.embedding_attrs]
        except AttributeError:
            return False
        return isinstance(layers, nn.ModuleList) and all(isinstance(part, nn.Module) for part in parts)

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.backbone_attr)

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
        for attr in self.head_none_attrs:
            setattr(backbone, attr, None)
        backbone.config = slice_config(backbone.config, 0, cut_layer)
        return backbone

    def tail_config(self, model: nn.Module, cut_layer: int) -> Any:
        """The config of a causal LM made of the layers after the cut, with its own (untied) LM head."""
        config = slice_config(model.config, cut_layer, self.num_layers(model))
        config.tie_word_embeddings = False
        for key, value in self.tail_config_overrides:
            setattr(config, key, value)
        return config

    def _input_side(self) -> tuple[str, ...]:
        """Key prefixes of the backbone's input-side modules, which a tail does without."""
        attrs = (*self.embedding_attrs, *self.tail_zero_attrs, *self.tail_none_attrs)
        return tuple(f"{self.backbone_attr}.{attr}." for attr in attrs)

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
        missing = [k for k in missing if not k.startswith(self._input_side())]
        if missing or unexpected:
            raise ValueError(f"tail weights do not fit the tail config: missing {missing}, unexpected {unexpected}")
        for attr in self.tail_zero_attrs:
            nn.init.zeros_(getattr(backbone, attr).weight)
        for attr in self.tail_none_attrs:
            setattr(backbone, attr, None)
        tail.eval()  # type: ignore[no-untyped-call]
        return tail

    def tail_state_dict(self, model: nn.Module, cut_layer: int) -> dict[str, torch.Tensor]:
        """Weights the server needs: the layers after the cut (renumbered from 0), final norm, LM head."""
        state = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
        tail = self.select_layers(state, cut_layer, self.num_layers(model))
        if f"{self.lm_head_attr}.weight" not in tail:  # tied embeddings: the LM head is the embedding table
            # transformers leaves get_output_embeddings unannotated; the LM head is an nn.Linear.
            lm_head: nn.Linear = cast("PreTrainedModel", model).get_output_embeddings()  # type: ignore[no-untyped-call]
            tail[f"{self.lm_head_attr}.weight"] = lm_head.weight.detach().clone().contiguous()
        return tail

    def select_layers(self, state_dict: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
        """The weights of layers [start, stop) of `state_dict`, renumbered from 0, with everything after the
        layers (final norm, LM head, an output projection); the input embeddings and every other layer are
        left out (a tail reads its input as activations)."""
        prefix = f"{self.layers_path}."
        input_side = self._input_side()
        selected: dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if name.startswith(prefix):
                index, rest = name[len(prefix) :].split(".", 1)
                if start <= int(index) < stop:
                    selected[f"{prefix}{int(index) - start}.{rest}"] = tensor
            elif not name.startswith(input_side):
                selected[name] = tensor
        return selected


# transformers' standard layout, and the model types checked against it by the parity tests. Gemma's
# sqrt(hidden) scaling happens inside its embedding module (so a tail fed activations does not scale them
# again), Gemma 2's final-logit soft-capping inside the causal LM that the tail is, and the per-layer
# attention kinds (sliding windows) and SmolLM3's layers without rotary follow their layers (slice_config).
LLAMA_LIKE = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma2", "gemma3_text"),
)

PHI3 = Family(name="phi3", model_types=("phi3",), lora_targets=("qkv_proj",))  # fused query/key/value

# Granite multiplies the input embeddings inside the backbone; its residual and logit multipliers live in the
# layers and the causal LM, which the tail keeps.
GRANITE = Family(name="granite", model_types=("granite",), tail_config_overrides=(("embedding_multiplier", 1.0),))

PHI = Family(name="phi", model_types=("phi",), final_norm_attr="final_layernorm")  # Phi-2: parallel blocks

GPT_NEOX = Family(
    name="gpt_neox",
    model_types=("gpt_neox",),
    backbone_attr="gpt_neox",
    final_norm_attr="final_layer_norm",
    embedding_attrs=("embed_in",),
    lora_targets=("query_key_value",),
)

OPT = Family(
    name="opt",
    model_types=("opt",),
    backbone_attr="model.decoder",
    final_norm_attr="final_layer_norm",
    tail_zero_attrs=("embed_positions",),  # learned, offset by 2, counted from the attention mask
    tail_none_attrs=("project_in",),
    head_none_attrs=("project_out",),
)

FALCON = Family(  # parallel attention and MLP, multi-query attention
    name="falcon",
    model_types=("falcon",),
    backbone_attr="transformer",
    layers_attr="h",
    final_norm_attr="ln_f",
    embedding_attrs=("word_embeddings",),
    lora_targets=("query_key_value",),
)

GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    backbone_attr="transformer",
    layers_attr="h",
    final_norm_attr="ln_f",
    embedding_attrs=("wte",),
    lora_targets=("c_attn",),
    tail_zero_attrs=("wpe",),
    weight_is_in_out=True,
)

# Any other causal LM in the standard layout: exported without new code, and the export's self-check
# (selfcheck.py) refuses it if the split does not reproduce the model.
GENERIC = Family(name="decoder", model_types=(), any_standard_layout=True)

FAMILIES: tuple[Family, ...] = (LLAMA_LIKE, PHI3, GRANITE, PHI, GPT_NEOX, FALCON, OPT, GPT2, GENERIC)

# Config lists with one entry per layer: they are sliced with the layers.
PER_LAYER_CONFIG_KEYS = ("layer_types", "no_rope_layers")


def slice_config(config: Any, start: int, stop: int) -> Any:
    """A copy of `config` describing layers [start, stop) only."""
    config = copy.deepcopy(config)
    for key in PER_LAYER_CONFIG_KEYS:  # sliding windows, layers without rotary: they follow their layers
        values = getattr(config, key, None)
        if isinstance(values, list):
            setattr(config, key, values[start:stop])
    config.num_hidden_layers = stop - start
    return config


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def refusal_reason(config: Any) -> str | None:
    """Why a causal LM with this config cannot be split, or None: read from the config alone."""
    from edgesplit.export.preflight import architecture_refusal

    return architecture_refusal(getattr(config, "model_type", None), config.to_dict())


def family_for(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", type(model).__name__)
    reason = refusal_reason(config) if config is not None and hasattr(config, "to_dict") else None
    if reason is None:
        for family in FAMILIES:
            if family.matches(model):
                return family
        reason = (
            "its layers are not laid out as transformers' standard decoder (model.embed_tokens, model.layers, "
            "model.norm, lm_head) and no adapter describes them"
        )
    raise ExportError(
        f"architecture {model_type!r} is not supported: {reason}; supported model types: "
        f"{', '.join(supported_model_types())}, and other decoders in the standard layout"
    )


def check_model(name: str) -> None:
    """Refuse a model edgesplit cannot split before its weights load: from config.json or the GGUF header
    (preflight.check_architecture), and for a local directory, from a skeleton of the model built on the
    meta device (no memory, no weights), whose layout some adapter must describe."""
    from pathlib import Path

    from edgesplit.export.preflight import check_architecture

    check_architecture(name)
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        return  # a hub id, a GGUF file or the default: checked by family_for once loaded
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(
            f"--model {name!r}: transformers cannot build a causal LM from its config: {error}"
        ) from error
    family_for(skeleton)


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
