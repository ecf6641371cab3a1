"""The server's half of the model: the tail after the cut, with LoRA (PEFT), its loss and its optimiser.

    activations (B, T, H) --[ layers [cut, L), final norm, LM head ]--> logits (B, T, V)
    loss = mean cross-entropy of logits[:, t] against labels[:, t + 1] where labels != -100
    returned: loss, and activation_grads = d loss / d activations (B, T, H), which go down to the client

The tail is called as a causal LM with `inputs_embeds=activations`: the activations take the place of the
token embeddings, and the rotary or learned position handling follows as it would in the full model.

A tail runs a layer range [first_layer, end_layer) of the manifest's tail stage (all of it by default), then
the final norm and the LM head: the split-point profiler builds shorter tails from one export this way. A
step or an evaluation may also start later, at a client's own cut (`from_layer`): a mixed-cut federation
shares one tail built from its smallest cut, and a client at a deeper cut runs [its cut, end) of it, with
the same LoRA parameters for the same layers. Its
LoRA matrices are named by absolute layer (edgesplit/lora_names.py), the same names a head would use for
them, whatever the cut.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file

from edgesplit.client.artifacts import TAIL, Manifest, load_manifest, verify_files
from edgesplit.errors import ArtifactError, TrainingError
from edgesplit.lora_names import from_peft_key
from edgesplit.server.placement import choose_placement, place_model


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
        device: str = "cpu",
        dtype: str = "fp32",
    ) -> None:
        """`first_layer`, `end_layer`: the layers to run, within the tail stage's (by default all of them).
        `device` (auto, cpu, cuda, cuda:N) and `dtype` (fp32, bf16, fp16): where the tail runs and the precision
        of its frozen weights (placement.py); checked before anything loads."""
        from edgesplit.export.families import family_by_name

        self.placement = choose_placement(device, dtype)
        self.device = torch.device(self.placement.device)
        self.compute_dtype = self.placement.torch_dtype
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
        place_model(self.model, self.placement)
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

    def _logits(
        self, activations: torch.Tensor, attention_mask: torch.Tensor, from_layer: int | None = None
    ) -> torch.Tensor:
        # activations (B, T, H) fp32 on the device -> the base weights' precision (in the graph: the gradient
        # flows back to fp32) -> logits (B, T, V)
        embeds = activations.to(self.compute_dtype)
        with self._starting_at(from_layer):
            output = self.model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        return output.logits  # type: ignore[no-any-return]

    @contextlib.contextmanager
    def _starting_at(self, from_layer: int | None) -> Iterator[None]:
        """Run the layers [from_layer, end) only, for the duration: the decoder's layer list and its config
        (transformers loops over `layers[: config.num_hidden_layers]` and builds its masks from
        `config.layer_types`) are swapped for their tails and put back after. The layer modules, and so
        their LoRA parameters, are the same objects."""
        skip = 0 if from_layer is None else from_layer - self.first_layer
        if not 0 <= skip <= self.end_layer - self.first_layer:
            raise TrainingError(
                f"a client at cut {from_layer} needs layers this tail of [{self.first_layer}, "
                f"{self.end_layer}) does not start with"
            )
        if skip == 0:
            yield
            return
        from edgesplit.export.families import family_by_name

        family = family_by_name(self.manifest.family)
        model: Any = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside PEFT's wrapper
        backbone, config = family.backbone(base), cast(Any, base.config)
        layers, count = getattr(backbone, family.layers_attr), config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None)
        setattr(backbone, family.layers_attr, torch.nn.ModuleList(list(layers)[skip:]))
        config.num_hidden_layers = count - skip
        if isinstance(layer_types, list):
            config.layer_types = layer_types[skip:]
        try:
            yield
        finally:
            setattr(backbone, family.layers_attr, layers)
            config.num_hidden_layers = count
            if isinstance(layer_types, list):
                config.layer_types = layer_types

    def _middle(self, activations: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A U-shaped split's middle: layers [first, end) and no final norm (the device's top applies it)."""
        from edgesplit.export.families import family_by_name

        family = family_by_name(self.manifest.family)
        model: Any = self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # inside PEFT's wrapper
        backbone = family.backbone(base)
        norm = getattr(backbone, family.final_norm_attr)
        setattr(backbone, family.final_norm_attr, torch.nn.Identity())
        try:
            output = backbone(
                inputs_embeds=activations.to(self.compute_dtype), attention_mask=attention_mask, use_cache=False
            )
        finally:
            setattr(backbone, family.final_norm_attr, norm)
        return output.last_hidden_state.float()  # type: ignore[no-any-return]

    @torch.no_grad()
    def middle_forward(self, activations: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """The middle's output (B, T, H) for the device's top: the first half of a U-shaped step. Nothing is
        kept: the second half runs the middle again, so a client that never comes back leaves nothing behind,
        and other clients' steps may run in between."""
        inputs, mask, _ = self._tensors(activations, attention_mask, np.zeros(attention_mask.shape, np.int64))
        return self._middle(inputs, mask).cpu().numpy()

    def middle_step(
        self, activations: np.ndarray, attention_mask: np.ndarray, upper_grads: np.ndarray, train_head: bool = True
    ) -> np.ndarray | None:
        """The second half of a U-shaped step: the middle's forward again, backward from the device's gradient
        at the upper cut `upper_grads` (B, T, H), one AdamW step; returns d loss / d activations at the lower
        cut (None if the head is not trained). The same tensors as the first half give the same output."""
        inputs, mask, _ = self._tensors(activations, attention_mask, np.zeros(attention_mask.shape, np.int64))
        inputs.requires_grad_(train_head)
        grads = torch.from_numpy(np.ascontiguousarray(upper_grads, dtype=np.float32)).to(self.device)
        surrogate = (self._middle(inputs, mask) * grads).sum()  # its gradient is the chain rule through the middle
        return self._apply(surrogate, inputs, train_head, "step")

    def _tensors(
        self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """numpy in, on the tail's device: activations (B, T, H) fp32, attention_mask and labels (B, T) int64."""
        inputs = torch.from_numpy(np.ascontiguousarray(activations, dtype=np.float32)).to(self.device)
        mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)).to(self.device)
        target = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device)
        return inputs, mask, target

    def train_step(
        self,
        activations: np.ndarray,
        attention_mask: np.ndarray,
        labels: np.ndarray,
        train_head: bool = True,
        from_layer: int | None = None,
    ) -> tuple[float, np.ndarray | None]:
        """One optimiser step of the tail; returns the loss and d loss / d activations (None if not wanted).

        `from_layer`: the client's cut, where a mixed-cut federation's client hands over (by default the
        tail's first layer). The layers before it get no gradient and are not stepped."""
        inputs, mask, target = self._tensors(activations, attention_mask, labels)
        inputs.requires_grad_(train_head)
        loss = causal_lm_loss(self._logits(inputs, mask, from_layer), target)
        grads = self._apply(loss, inputs, train_head, "step")
        return float(loss.detach()), grads

    def _apply(self, loss: torch.Tensor, inputs: torch.Tensor, train_head: bool, what: str) -> np.ndarray | None:
        """Backward from `loss`, then one AdamW step unless the loss or a gradient is not finite (one step must
        not poison the shared tail: TrainingError, nothing applied). Returns d loss / d inputs as numpy, or None
        when the head is not trained."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        gradients = [p.grad for p in [*self.adapters.values(), inputs] if p.grad is not None]
        if not torch.isfinite(loss) or not all(bool(torch.isfinite(g).all()) for g in gradients):
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"this {what}'s loss or gradients are not finite; it was not applied")
        if self.optimizer is not None:
            self.optimizer.step()
        return inputs.grad.cpu().numpy() if train_head and inputs.grad is not None else None

    def train_batch(
        self,
        steps: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
        train_head: bool = True,
        from_layer: int | None = None,
    ) -> list[tuple[float, np.ndarray | None]]:
        """Several clients' steps as one optimiser step; per step, its own loss and d its loss / d its activations.

        steps: (activations (B_i, T, H), attention_mask (B_i, T), labels (B_i, T)) per client, one T and H.
        The tail's loss is the token-weighted mean over all the steps' target tokens, J = sum_i S_i / N with
        S_i client i's summed token losses and N = sum_i n_i its tokens: the loss of the batches concatenated.
        Client i's loss is L_i = S_i / n_i and its gradient dL_i/dx_i = (N / n_i) dJ/dx_i, which is what its
        step alone would have got from the tail as it stands (no row of a batch sees another's). A step
        without a target token, or a loss or gradient that is not finite, is a TrainingError and nothing is
        applied (the batching worker then runs the steps one at a time)."""
        sizes = [len(activations) for activations, _, _ in steps]
        inputs, mask, target = self._tensors(*(np.concatenate(parts) for parts in zip(*steps, strict=True)))
        inputs.requires_grad_(train_head)
        logits = self._logits(inputs, mask, from_layer)  # (sum B_i, T, V), all the steps from one cut
        shifted = target[:, 1:]  # (sum B_i, T-1)
        # As causal_lm_loss does, over rows of V: a softmax across a strided dimension is several times slower.
        token_losses = torch.nn.functional.cross_entropy(
            logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
            shifted.reshape(-1),
            ignore_index=-100,
            reduction="none",
        ).view(shifted.shape)  # (sum B_i, T-1), 0 where the label is -100
        bounds = np.cumsum([0, *sizes])
        sums = [token_losses[start:end].sum() for start, end in itertools.pairwise(bounds)]
        counts = [int((shifted[start:end] != -100).sum()) for start, end in itertools.pairwise(bounds)]
        if min(counts) == 0:
            raise TrainingError("a batched step has no target token: its loss is not defined; nothing was applied")
        total_tokens = sum(counts)
        loss = torch.stack(sums).sum() / total_tokens
        grads = self._apply(loss, inputs, train_head, "batch")
        results: list[tuple[float, np.ndarray | None]] = []
        for (start, end), summed, count in zip(itertools.pairwise(bounds), sums, counts, strict=True):
            own = None if grads is None else grads[start:end] * np.float32(total_tokens / count)
            results.append((float(summed.detach()) / count, own))
        return results

    @torch.no_grad()
    def eval_loss(
        self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, from_layer: int | None = None
    ) -> tuple[float, int]:
        """Summed-then-averaged loss of one batch, and the number of tokens it counted."""
        inputs, mask, target = self._tensors(activations, attention_mask, labels)
        logits = self._logits(inputs, mask, from_layer)
        tokens = int((target[:, 1:] != -100).sum())
        return float(causal_lm_loss(logits, target)) if tokens else 0.0, tokens

    def lora_state(self) -> dict[str, np.ndarray]:
        """The tail's LoRA matrices by adapter name, as numpy (for checkpoints and tests)."""
        return {name: parameter.detach().cpu().numpy().copy() for name, parameter in self.adapters.items()}

    def set_lora(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite some of the tail's LoRA matrices (by adapter name) with `values`, as aggregation across
        a mixed-cut federation does for the layers some clients hold. The optimiser's moments are kept."""
        unknown = sorted(set(values) - set(self.adapters))
        if unknown:
            raise TrainingError(f"the tail has no adapters {unknown[:4]}")
        with torch.no_grad():
            for name, value in values.items():
                if tuple(value.shape) != tuple(self.adapters[name].shape):
                    raise TrainingError(
                        f"adapter {name} has shape {tuple(value.shape)}, the tail's is "
                        f"{tuple(self.adapters[name].shape)}"
                    )
                self.adapters[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))

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
