"""LoRA on the client head, with the adapter matrices as graph inputs rather than parameters.

The head's ONNX graph must take each LoRA matrix as an input so that the edge client can train them with
numpy. `HeadWithLora` wraps the target modules of a head backbone; its forward takes the LoRA matrices as a
dict keyed by their adapter names (see edgesplit/lora_names.py), `layers.<layer>.<module path>.lora_A`
(rank, in) and `.lora_B` (out, rank), the same layout as PEFT's lora_A / lora_B weights, so adapters move
between the two without transposes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgesplit.errors import ExportError
from edgesplit.export.families import Family
from edgesplit.lora_names import adapter_name, matches_target, parse_adapter_name


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a LoRA target, from the module itself, as PEFT reads them.

    nn.Linear says so; GPT-2's Conv1D (weight stored (in, out)) calls them nx and nf.
    """
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]
    if isinstance(getattr(module, "nx", None), int) and isinstance(getattr(module, "nf", None), int):
        return int(module.nx), int(module.nf)  # type: ignore[arg-type]
    raise ExportError(f"LoRA target {type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


class LoraLinear(nn.Module):
    """base(x) + scale * (x @ A^T) @ B^T, with A and B looked up by name in the owner's per-call dict."""

    def __init__(
        self, base: nn.Module, a_name: str, b_name: str, scale: float, matrices: dict[str, torch.Tensor]
    ) -> None:
        super().__init__()
        self.base = base
        self.a_name = a_name
        self.b_name = b_name
        self.scale = scale
        self._matrices = matrices  # shared with HeadWithLora, filled on every forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in) -> (B, T, out)
        lora_a = self._matrices[self.a_name]  # (r, in)
        lora_b = self._matrices[self.b_name]  # (out, r)
        base: torch.Tensor = self.base(x)
        return base + (x @ lora_a.t()) @ lora_b.t() * self.scale


class HeadWithLora(nn.Module):
    """(input_ids (B, T), attention_mask (B, T), LoRA matrices) -> activations (B, T, H).

    With `full_model`, `backbone` is the whole causal LM and the output is its logits (B, T, V): the graph
    that FedLLM and KD-FedLLM clients train. The head's layers are the model's layers [0, cut), so a layer's
    index here is its absolute index.
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
            for module_path, module in list(layer.named_modules()):
                if not module_path or not matches_target(module_path, targets):
                    continue
                a_name, b_name = (adapter_name(index, module_path, matrix) for matrix in ("A", "B"))
                in_features, out_features = linear_features(module)
                self.shapes[a_name] = (rank, in_features)
                self.shapes[b_name] = (out_features, rank)
                parent_path, _, attribute = module_path.rpartition(".")
                parent = layer.get_submodule(parent_path) if parent_path else layer
                setattr(parent, attribute, LoraLinear(module, a_name, b_name, scale, self._matrices))
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
            if parse_adapter_name(name).matrix == "A":
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in) gives U(-1/sqrt(in), ..)
                matrices[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            else:
                matrices[name] = torch.zeros(shape)
        return matrices
