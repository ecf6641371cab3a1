"""A tail run from a later layer (a client at a deeper cut) is the tail of that cut: the same loss, activation
gradients and LoRA update, bit for bit, for every family; the layers before it are left alone."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.errors import TrainingError
from edgesplit.server.tail import Tail


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_running_from_layer_2_is_the_tail_of_cut_2(tiny_artifacts, family: str) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts(family, 1)  # 3 layers: the tail holds layers 1 and 2
    whole, short = Tail(artifacts), Tail(artifacts, first_layer=2)
    rng = np.random.default_rng(0)
    values = {name: rng.normal(size=v.shape).astype(np.float32) * 0.1 for name, v in whole.lora_state().items()}
    whole.set_lora(values)
    short.set_lora({name: values[name] for name in short.adapters})
    batch, seq, hidden = whole.manifest.activations_shape
    activations = rng.normal(size=(batch, seq, hidden)).astype(np.float32)
    mask = np.ones((batch, seq), dtype=np.int64)
    mask[-1, seq // 2 :] = 0
    labels = rng.integers(0, whole.manifest.vocab_size, size=(batch, seq))
    labels[mask == 0] = -100
    assert whole.eval_loss(activations, mask, labels, from_layer=2) == short.eval_loss(activations, mask, labels)
    loss, grads = whole.train_step(activations, mask, labels, from_layer=2)
    short_loss, short_grads = short.train_step(activations, mask, labels)
    assert loss == short_loss and grads is not None and short_grads is not None
    assert np.array_equal(grads, short_grads)
    after, short_after = whole.lora_state(), short.lora_state()
    assert all(np.array_equal(after[name], short_after[name]) for name in short_after)
    assert all(np.array_equal(after[name], values[name]) for name in after if name.startswith("layers.1."))
    # The whole tail is back as it was: it runs all of its layers again.
    assert whole.eval_loss(activations, mask, labels)[0] != whole.eval_loss(activations, mask, labels, from_layer=2)[0]
    with pytest.raises(TrainingError, match="does not start with"):
        short.train_step(activations, mask, labels, from_layer=1)
