"""Centralised LoRA training of the whole model in PyTorch: the reference split training must reproduce.

The reference model carries PEFT LoRA on every layer, started from exactly the split run's initial adapters:
the head's layers from head_adapters.safetensors, the tail's from the server tail's (seeded) PEFT init; in a
U-shaped run, the device's top layers from top_adapters.safetensors and the server's middle from its tail. Both
sides name a matrix by its absolute layer and module path (edgesplit/lora_names.py), so a reference parameter
finds its starting value by name alone.
It trains on the same batches with the same loss and AdamW settings, so that with one client and fp32 on
the wire the split run's losses and adapters must match it step for step.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from edgesplit.client.artifacts import Manifest
from edgesplit.errors import ArtifactError
from edgesplit.lora_names import from_peft_key
from edgesplit.server.tail import OptimizerSettings, Tail, causal_lm_loss


def build_reference(
    model: nn.Module, manifest: Manifest, head_adapters: dict[str, np.ndarray], tail_lora: dict[str, np.ndarray]
) -> nn.Module:
    """`model` with PEFT LoRA on all layers, initialised from the split run's device adapters (`head_adapters`:
    the head's, and in a U-shaped run the top's too) and the server's (`tail_lora`)."""
    from peft import LoraConfig, get_peft_model

    from edgesplit.export.families import family_by_name

    family = family_by_name(manifest.family)
    lora = manifest.lora
    reference = get_peft_model(
        model,
        LoraConfig(
            r=lora.rank,
            # peft annotates lora_alpha as int, but only divides by it: a float keeps a non-integral alpha as it is.
            lora_alpha=cast(int, lora.alpha),
            target_modules=list(lora.targets),
            lora_dropout=0.0,
            fan_in_fan_out=family.weight_is_in_out,
        ),
    )
    with torch.no_grad():
        for peft_name, parameter in reference.named_parameters():
            name = from_peft_key(peft_name, family.layers_path)
            if not parameter.requires_grad or name is None:
                continue
            on_device = name.layer < manifest.cut_layer or name.layer >= manifest.top_first_layer
            source = head_adapters if on_device else tail_lora
            value = source.get(str(name))
            if value is None:
                side = "head" if source is head_adapters else "tail"
                raise ArtifactError(f"the {side}'s adapters have no {name}, which the whole model's LoRA trains")
            parameter.copy_(torch.from_numpy(np.asarray(value)))
    return reference


def reference_for_artifacts(model: nn.Module, artifact_dir: Path, seed: int = 0) -> nn.Module:
    """The reference for the split run a server with `seed` would do on `artifact_dir`."""
    from safetensors.numpy import load_file

    from edgesplit.client.head import Head

    head = Head(artifact_dir, verify=False)
    manifest = head.manifest
    device = head.initial_adapters()
    if manifest.u_shaped:
        device.update(load_file(str(Path(artifact_dir) / "top_adapters.safetensors")))
    tail = Tail(artifact_dir, seed=seed, end_layer=manifest.top_first_layer if manifest.u_shaped else None)
    return build_reference(model, manifest, device, tail.lora_state())


def train_centralized(
    reference: nn.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    settings: OptimizerSettings,
) -> list[float]:
    """AdamW on the LoRA parameters over `batches` of (input_ids, attention_mask, labels); the losses."""
    parameters = [p for p in reference.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=settings.learning_rate,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
    )
    reference.train()
    losses = []
    for input_ids, attention_mask, labels in batches:
        logits = reference(
            input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask), use_cache=False
        ).logits
        loss = causal_lm_loss(logits, torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses
