"""LoRA on the client head, with the adapter matrices as graph inputs rather than parameters.

The head's ONNX graph must take each LoRA matrix as an input so that the edge client can train them with
numpy. `HeadWithLora` wraps the target modules of a head backbone; its forward takes the LoRA matrices as a
dict keyed by their ONNX input names, `lora.<layer>.<target>.A` (rank, in) and `.B` (out, rank), the same
layout as PEFT's lora_A / lora_B weights, so adapters move between the two without transposes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgesplit.export.families import Family


def lora_name(layer: int, target: str, matrix: str) -> str:
    return f"lora.{layer}.{target}.{matrix}"


class LoraLinear(nn.Module):
    """base(x) + scale * (x @ A^T) @ B^T, with A and B looked up by name in the owner's per-call dict."""

    def __init__(self, base: nn.Module, key: str, scale: float, matrices: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base = base
        self.key = key
        self.scale = scale
        self._matrices = matrices  # shared with HeadWithLora, filled on every forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in) -> (B, T, out)
        lora_a = self._matrices[f"{self.key}.A"]  # (r, in)
        lora_b = self._matrices[f"{self.key}.B"]  # (out, r)
        return self.base(x) + (x @ lora_a.t()) @ lora_b.t() * self.scale


class HeadWithLora(nn.Module):
    """(input_ids (B, T), attention_mask (B, T), LoRA matrices) -> activations (B, T, H).

    With `full_model`, `backbone` is the whole causal LM and the output is its logits (B, T, V): the graph
    that FedLLM and KD-FedLLM clients train.
    """

    def __init__(
        self,
        backbone: nn.Module,
        family: Family,
        rank: int,
        alpha: float,
        targets: tuple[str, ...],
        full_model: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.full_model = full_model
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._matrices: dict[str, torch.Tensor] = {}
        scale = alpha / rank
        layers = family.layers(backbone) if full_model else getattr(backbone, family.layers_attr)
        for index, layer in enumerate(layers):
            for module_name, module in list(layer.named_modules()):
                leaf = module_name.rsplit(".", 1)[-1]
                if leaf not in targets:
                    continue
                key = f"lora.{index}.{leaf}"
                in_features, out_features = family.linear_features(module)
                self.shapes[f"{key}.A"] = (rank, in_features)
                self.shapes[f"{key}.B"] = (out_features, rank)
                parent = layer.get_submodule(module_name.rsplit(".", 1)[0]) if "." in module_name else layer
                setattr(parent, leaf, LoraLinear(module, key, scale, self._matrices))
        if targets and not self.shapes:
            raise ValueError(f"no LoRA target {targets} found in the head's layers")
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)

    @property
    def lora_names(self) -> list[str]:
        return list(self.shapes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lora: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        self._matrices.clear()
        self._matrices.update(lora)
        output = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return output.logits if self.full_model else output.last_hidden_state  # type: ignore[no-any-return]

    def initial_lora(self, seed: int) -> dict[str, torch.Tensor]:
        """A as PEFT initialises it (Kaiming-uniform, a=sqrt(5)), B zero: the adapted model starts as the base."""
        generator = torch.Generator().manual_seed(seed)
        matrices: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            if name.endswith(".A"):
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in) gives U(-1/sqrt(in), ..)
                matrices[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            else:
                matrices[name] = torch.zeros(shape)
        return matrices
