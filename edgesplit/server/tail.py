"""The server's half of the model: the tail after the cut, with LoRA (PEFT), its loss and its optimiser.

    activations (B, T, H) --[ layers [cut, L), final norm, LM head ]--> logits (B, T, V)
    loss = mean cross-entropy of logits[:, t] against labels[:, t + 1] where labels != -100
    returned: loss, and activation_grads = d loss / d activations (B, T, H), which go down to the client

The tail is called as a causal LM with `inputs_embeds=activations`: the activations take the place of the
token embeddings, and the rotary or learned position handling follows as it would in the full model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from edgesplit.client.artifacts import Manifest, load_manifest, verify_files
from edgesplit.errors import ArtifactError


@dataclass(frozen=True)
class OptimizerSettings:
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not -100 (as Hugging Face does)."""
    shifted_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return torch.nn.functional.cross_entropy(shifted_logits.float(), shifted_labels, ignore_index=-100)


def load_tail_model(artifact_dir: Path, manifest: Manifest, seed: int = 0) -> torch.nn.Module:
    """The tail as a PEFT model: frozen base weights, trainable LoRA on the manifest's targets."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from edgesplit.export.families import family_by_name

    root = Path(artifact_dir)
    family = family_by_name(manifest.family)
    config = AutoConfig.from_pretrained(root / "tail")
    weights = load_file(str(root / "tail" / "model.safetensors"))
    lora_settings = json.loads((root / "tail" / "lora.json").read_text())
    tail = family.build_tail(config, weights)
    torch.manual_seed(seed)  # the tail's LoRA A matrices are random: seeded so that runs repeat
    lora_config = LoraConfig(
        r=int(lora_settings["rank"]),
        lora_alpha=float(lora_settings["alpha"]),
        target_modules=list(lora_settings["targets"]),
        lora_dropout=0.0,
        fan_in_fan_out=family.weight_is_in_out,
    )
    return get_peft_model(tail, lora_config)


class Tail:
    """One shared tail. Not thread-safe by itself: the server serialises calls to `train_step`."""

    def __init__(
        self, artifact_dir: str | Path, settings: OptimizerSettings | None = None, seed: int = 0, threads: int = 0
    ) -> None:
        self.root = Path(artifact_dir)
        self.manifest = load_manifest(self.root, verify=False)
        verify_files(self.root, self.manifest, only=("tail/", "manifest"))
        if threads:
            torch.set_num_threads(threads)
        self.settings = settings or OptimizerSettings()
        try:
            self.model = load_tail_model(self.root, self.manifest, seed)
        except (OSError, ValueError, KeyError) as error:
            raise ArtifactError(f"cannot build the tail from {self.root / 'tail'}: {error}") from error
        self.model.train()
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters,
            lr=self.settings.learning_rate,
            betas=self.settings.betas,
            eps=self.settings.eps,
            weight_decay=self.settings.weight_decay,
        )

    def _logits(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.model(inputs_embeds=activations, attention_mask=attention_mask, use_cache=False)
        return output.logits  # type: ignore[no-any-return]

    def train_step(
        self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, train_head: bool = True
    ) -> tuple[float, np.ndarray | None]:
        """One optimiser step of the tail; returns the loss and d loss / d activations (None if not wanted)."""
        inputs = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32)).requires_grad_(train_head)
        mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
        target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        loss = causal_lm_loss(self._logits(inputs, mask), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        grads = inputs.grad.numpy() if train_head and inputs.grad is not None else None
        return float(loss.detach()), grads

    @torch.no_grad()
    def eval_loss(self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """Summed-then-averaged loss of one batch, and the number of tokens it counted."""
        inputs = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32))
        target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        logits = self._logits(inputs, torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)))
        tokens = int((target[:, 1:] != -100).sum())
        return float(causal_lm_loss(logits, target)) if tokens else 0.0, tokens

    def lora_state(self) -> dict[str, np.ndarray]:
        """The tail's LoRA matrices by PEFT parameter name, as numpy (for checkpoints and tests)."""
        return {n: p.detach().numpy().copy() for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, Any]:
        return {"lora": self.lora_state(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        named = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(torch.from_numpy(value))
        self.optimizer.load_state_dict(state["optimizer"])
