"""The server's half of the model: the tail after the cut, with LoRA (PEFT), its loss and its optimiser.

    activations (B, T, H) --[ layers [cut, L), final norm, LM head ]--> logits (B, T, V)
    loss = mean cross-entropy of logits[:, t] against labels[:, t + 1] where labels != -100
    returned: loss, and activation_grads = d loss / d activations (B, T, H), which go down to the client

The tail is called as a causal LM with `inputs_embeds=activations`: the activations take the place of the
token embeddings, and the rotary or learned position handling follows as it would in the full model.

A tail runs a layer range [first_layer, end_layer) of the manifest's tail stage (all of it by default), then
the final norm and the LM head: the split-point profiler builds shorter tails from one export this way. Its
LoRA matrices are named by absolute layer (edgesplit/lora_names.py), the same names a head would use for
them, whatever the cut.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file

from edgesplit.client.artifacts import TAIL, Manifest, load_manifest, verify_files
from edgesplit.errors import ArtifactError, TrainingError
from edgesplit.lora_names import from_peft_key


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


def tail_layers(manifest: Manifest, first_layer: int | None, end_layer: int | None) -> tuple[int, int]:
    """[first, end) for a tail, checked against the manifest's tail stage; the whole stage by default."""
    stage = manifest.stage(TAIL)
    first = stage.first_layer if first_layer is None else first_layer
    end = stage.end_layer if end_layer is None else end_layer
    if not stage.first_layer <= first <= end <= stage.end_layer:
        raise ArtifactError(
            f"a tail of layers [{first}, {end}) is not within the exported tail stage's "
            f"[{stage.first_layer}, {stage.end_layer})"
        )
    return first, end


def load_tail_model(
    artifact_dir: Path,
    manifest: Manifest,
    seed: int = 0,
    first_layer: int | None = None,
    end_layer: int | None = None,
) -> torch.nn.Module:
    """The tail of layers [first_layer, end_layer) as a PEFT model: frozen base weights, trainable LoRA on the
    manifest's targets. A tail with no layer (the norm and the LM head alone) has nothing to adapt: it comes
    back as the plain model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from edgesplit.export.families import family_by_name, slice_config

    root = Path(artifact_dir)
    family = family_by_name(manifest.family)
    first, end = tail_layers(manifest, first_layer, end_layer)
    stored_first = manifest.stage(TAIL).first_layer  # the files number their layers from here
    config = slice_config(AutoConfig.from_pretrained(root / "tail"), first - stored_first, end - stored_first)
    weights = family.select_layers(
        load_file(str(root / "tail" / "model.safetensors")), first - stored_first, end - stored_first
    )
    lora_settings = json.loads((root / "tail" / "lora.json").read_text())
    tail = family.build_tail(config, weights)
    if first == end:
        for parameter in tail.parameters():  # frozen, as PEFT leaves the base weights
            parameter.requires_grad_(False)
        return tail
    torch.manual_seed(seed)  # the tail's LoRA A matrices are random: seeded so that runs repeat
    lora_config = LoraConfig(
        r=int(lora_settings["rank"]),
        # peft annotates lora_alpha as int, but only divides by it: a float keeps a non-integral alpha as it is.
        lora_alpha=cast(int, float(lora_settings["alpha"])),
        target_modules=list(lora_settings["targets"]),
        lora_dropout=0.0,
        fan_in_fan_out=family.weight_is_in_out,
    )
    with warnings.catch_warnings():
        # peft 0.21's PeftModel reads model.is_gradient_checkpointing, which transformers 5 deprecated: a
        # FutureWarning at every serve and profile start that no edgesplit code can act on. The property
        # still answers; only this one warning is silenced, only here.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(tail, lora_config)


class Tail:
    """One shared tail. Not thread-safe by itself: the server serialises calls to `train_step`."""

    def __init__(
        self,
        artifact_dir: str | Path,
        settings: OptimizerSettings | None = None,
        seed: int = 0,
        threads: int = 0,
        first_layer: int | None = None,
        end_layer: int | None = None,
    ) -> None:
        """`first_layer`, `end_layer`: the layers to run, within the tail stage's (by default all of them)."""
        from edgesplit.export.families import family_by_name

        self.root = Path(artifact_dir)
        self.manifest = load_manifest(self.root, verify=False)
        verify_files(self.root, self.manifest, only=("tail/", "manifest"))
        if threads:
            torch.set_num_threads(threads)
        self.settings = settings or OptimizerSettings()
        try:
            self.first_layer, self.end_layer = tail_layers(self.manifest, first_layer, end_layer)
            self.model = load_tail_model(self.root, self.manifest, seed, self.first_layer, self.end_layer)
        except (OSError, ValueError, KeyError) as error:
            raise ArtifactError(f"cannot build the tail from {self.root / 'tail'}: {error}") from error
        self.model.train()
        # Adapter name (absolute layer) -> the parameter, which PEFT names by its layer inside this tail.
        layers_path = family_by_name(self.manifest.family).layers_path
        self.adapters: dict[str, torch.nn.Parameter] = {}
        for peft_name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            name = from_peft_key(peft_name, layers_path, first_layer=self.first_layer)
            if name is None:
                raise ArtifactError(f"the tail trains {peft_name}, which is no LoRA matrix of a layer")
            self.adapters[str(name)] = parameter
        self.parameters = list(self.adapters.values())
        # A tail with no layer has no adapters and nothing to step (the profiler's "norm and LM head only").
        self.optimizer = (
            torch.optim.AdamW(
                self.parameters,
                lr=self.settings.learning_rate,
                betas=self.settings.betas,
                eps=self.settings.eps,
                weight_decay=self.settings.weight_decay,
            )
            if self.parameters
            else None
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
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        # One step must not poison the shared tail: a loss or gradient that is not finite is not applied.
        gradients = [p.grad for p in [*self.adapters.values(), inputs] if p.grad is not None]
        if not torch.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in gradients):
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError("this step's loss or gradients are not finite; it was not applied")
        if self.optimizer is not None:
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
        """The tail's LoRA matrices by adapter name, as numpy (for checkpoints and tests)."""
        return {name: parameter.detach().numpy().copy() for name, parameter in self.adapters.items()}

    def state_dict(self) -> dict[str, Any]:
        optimizer = self.optimizer.state_dict() if self.optimizer is not None else {"state": {}, "param_groups": []}
        return {"lora": self.lora_state(), "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Matrices by adapter name, the optimiser's state as `state_dict` gave it; ArtifactError if they do not
        fit this tail (another cut, another model, or a checkpoint from before the naming by absolute layer)."""
        names, expected = set(state["lora"]), set(self.adapters)
        if names != expected:
            raise ArtifactError(
                f"the saved tail adapters do not fit this tail: missing {sorted(expected - names)[:4]}, "
                f"unexpected {sorted(names - expected)[:4]}"
            )
        with torch.no_grad():
            for name, value in state["lora"].items():
                if tuple(value.shape) != tuple(self.adapters[name].shape):
                    raise ArtifactError(f"saved tail adapter {name} has shape {tuple(value.shape)}")
                self.adapters[name].copy_(torch.from_numpy(value))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
