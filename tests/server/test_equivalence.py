"""The strongest check: split training with one client equals centralised PyTorch LoRA training.

One client, fp32 on the wire, the same data order, seed and hyperparameters: every step's loss and the
final adapters of both the head (trained by numpy AdamW on the client through the ONNX gradient graph) and
the tail (trained by PyTorch on the server) must match LoRA training of the whole model in PyTorch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from loopback import federated_run
from transformers import AutoModelForCausalLM

from edgesplit.client.client import Client, ClientConfig
from edgesplit.client.data import iterate_batches
from edgesplit.export.families import prepare_for_training
from edgesplit.server.centralized import reference_for_artifacts, train_centralized
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.tail import OptimizerSettings

ROUNDS, STEPS, LEARNING_RATE = 2, 3, 0.01


def write_data(path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(10):
        a = int(rng.integers(0, 60))
        lines.append(json.dumps({"prompt": f"w{a} w{a + 3}", "completion": f"w{a + 1} w{a + 2} w{a + 5}"}))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("family", "top_layers"), [*((family, None) for family in FAMILIES), ("llama", 1)])
def test_split_training_equals_centralised_training(
    tiny_artifacts, tiny_model_dirs, tmp_path, family, top_layers
) -> None:
    """top_layers 1: the U-shaped split (layer 0 and layer 2 with the norm, the LM head and the loss on the
    device, layer 1 on the server), whose device trains the top's adapters too, equals it as well."""
    artifacts = tiny_artifacts(family, 1) if top_layers is None else tiny_artifacts(family, 1, top_layers=top_layers)
    write_data(tmp_path / "data.jsonl")
    split_losses = asyncio.run(
        federated_run(artifacts, tmp_path / "data.jsonl", tmp_path / "ckpt", ROUNDS, STEPS, LEARNING_RATE, "only")
    )

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs[family], attn_implementation="eager", dtype=torch.float32
    )
    prepare_for_training(model)
    reference = reference_for_artifacts(model, artifacts, seed=0)
    client = Client(
        ClientConfig(
            server="ws://unused", artifacts=artifacts, data=tmp_path / "data.jsonl", client_id="only", quiet=True
        )
    )
    batches = iterate_batches(client.encoded, client.head.manifest.batch_size, seed=0)
    steps = ((b.input_ids, b.attention_mask, b.labels) for b in itertools.islice(batches, ROUNDS * STEPS))
    central_losses = train_centralized(reference, steps, OptimizerSettings(learning_rate=LEARNING_RATE))

    assert len(split_losses) == ROUNDS * STEPS
    np.testing.assert_allclose(split_losses, central_losses, rtol=1e-4)
    assert central_losses[-1] < central_losses[0]  # it trained: the match is not of two idle runs

    checkpoint = load_latest(tmp_path / "ckpt")
    assert checkpoint is not None
    trained = {n: p.detach().numpy() for n, p in reference.named_parameters() if p.requires_grad}
    from edgesplit.server.centralized import build_reference

    # Map the split run's final adapters onto the reference's names by building a second reference from them.
    split_as_reference = build_reference(
        AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], attn_implementation="eager"),
        client.head.manifest,
        checkpoint.global_adapters,
        checkpoint.tail_lora,
    )
    # Adam divides each gradient by its running magnitude, so float rounding in a gradient near zero (A's
    # gradient is zero while B starts at zero) can move that element by a fraction of a step: the absolute
    # tolerance is 5% of one step's size (the learning rate), not of the value.
    moved = 0
    for name, parameter in split_as_reference.named_parameters():
        if parameter.requires_grad:
            np.testing.assert_allclose(
                parameter.detach().numpy(), trained[name], rtol=1e-3, atol=0.05 * LEARNING_RATE, err_msg=name
            )
            moved += int(not np.allclose(parameter.detach().numpy(), 0) and "lora_B" in name)
    assert moved > 0  # the B matrices left zero: the adapters really were trained
    if top_layers is not None:  # the device's top adapters are in the global ones, and trained
        top = [name for name in checkpoint.global_adapters if name.startswith("layers.2.") and "lora_B" in name]
        assert top and all(np.abs(checkpoint.global_adapters[name]).max() > 0 for name in top)
