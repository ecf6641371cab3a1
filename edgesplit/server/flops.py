"""Client compute per training step, counted from the model's shapes (no profiler).

Per token, a matrix of P weights costs 2P FLOPs forward and, with the weights frozen (LoRA trains only the
small adapters), about 2P again backward for the input gradients. Attention adds 4*T*H per layer per token
forward (QK^T and AV, each 2*T*H), doubled backward. The LoRA matrices and norms are left out (under 1%).
For the whole model the LM head (H x V) is on the device too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Shapes:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int

    @property
    def layer_params(self) -> int:
        """Weights of one Llama-style decoder layer: q, k, v, o projections and the gated MLP."""
        h, head_dim = self.hidden_size, self.hidden_size // self.num_heads
        attention = h * h * 2 + 2 * h * self.num_kv_heads * head_dim
        return attention + 3 * h * self.intermediate_size


def shapes_from_config(config: dict[str, Any]) -> Shapes:
    hidden = int(config.get("hidden_size") or config["n_embd"])
    heads = int(config.get("num_attention_heads") or config["n_head"])
    return Shapes(
        hidden_size=hidden,
        intermediate_size=int(config.get("intermediate_size") or config.get("n_inner") or 4 * hidden),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        num_layers=int(config.get("num_hidden_layers") or config["n_layer"]),
        vocab_size=int(config["vocab_size"]),
    )


def load_shapes(artifacts: Path, model_source: str) -> Shapes:
    """From a split export's tail/config.json, else from the model source's configuration."""
    tail_config = artifacts / "tail" / "config.json"
    if tail_config.exists():
        return shapes_from_config(json.loads(tail_config.read_text()))
    from transformers import AutoConfig

    source = Path(model_source)
    if source.suffix == ".gguf":
        config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name)
    else:
        config = AutoConfig.from_pretrained(model_source)
    return shapes_from_config(config.to_dict())


def client_flops_per_step(
    shapes: Shapes, layers_on_device: int, batch_size: int, seq_len: int, lm_head: bool
) -> dict[str, float]:
    """Forward and backward FLOPs of one (batch_size, seq_len) step of the device's layers."""
    tokens = batch_size * seq_len
    per_token = 2 * shapes.layer_params + 4 * seq_len * shapes.hidden_size
    forward = tokens * layers_on_device * per_token
    if lm_head:
        forward += tokens * 2 * shapes.hidden_size * shapes.vocab_size
    return {"forward": float(forward), "backward": float(forward), "total": float(2 * forward)}
