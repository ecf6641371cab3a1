"""Local training of a whole-model head on the device, for FedLLM and KD-FedLLM. numpy and ONNX Runtime only.

The head here is a full-model export (`edgesplit export --full-model`): its `activations` are the logits
(B, T, V). One step: forward -> loss and d loss / d logits in numpy (losses.py) -> the gradient graph ->
AdamW on the LoRA matrices. The same trainer serves the KD server, which distils into its global adapters.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from edgesplit.client.data import IGNORE_INDEX, Batch, EncodedSet
from edgesplit.client.head import Head
from edgesplit.client.losses import cross_entropy_and_grad, distillation_and_grad, top_k
from edgesplit.client.optim import AdamW
from edgesplit.errors import ArtifactError

Arrays = dict[str, np.ndarray]


class LocalTrainer:
    def __init__(self, head: Head, adapters: Arrays, learning_rate: float, weight_decay: float = 0.0) -> None:
        if not head.manifest.full_model:
            raise ArtifactError(
                f"{head.root} holds a split head (cut after layer {head.manifest.cut_layer}); FedLLM and KD-FedLLM "
                "need the whole model on the device: export with --full-model"
            )
        self.head = head
        self.adapters = adapters
        self.optimizer = AdamW(adapters, lr=learning_rate, weight_decay=weight_decay)

    def cross_entropy_step(self, batch: Batch) -> float:
        forward = self.head.forward(batch.input_ids, batch.attention_mask, self.adapters)
        loss, logit_grads = cross_entropy_and_grad(forward.activations, batch.labels)
        self.optimizer.step(self.head.backward(forward, logit_grads))
        return loss

    def distillation_step(
        self,
        input_ids: npt.NDArray[np.int64],
        attention_mask: npt.NDArray[np.int64],
        target_values: np.ndarray,
        target_indices: npt.NDArray[np.int64],
        temperature: float,
    ) -> float:
        forward = self.head.forward(input_ids, attention_mask, self.adapters)
        loss, logit_grads = distillation_and_grad(
            forward.activations, target_values, target_indices, attention_mask, temperature
        )
        self.optimizer.step(self.head.backward(forward, logit_grads))
        return loss


def distil_positions(proxy: EncodedSet) -> npt.NDArray[np.int64]:
    """(N, T): 1 where KD distils, the positions whose next token is a target (a completion's tokens and its
    EOS; the prompt is given, not learnt). A proxy of plain inputs with no target at all: every real position."""
    positions = np.zeros_like(proxy.attention_mask)
    positions[:, :-1] = proxy.labels[:, 1:] != IGNORE_INDEX
    return positions if positions.any() else proxy.attention_mask


def proxy_batches(proxy: EncodedSet, batch_size: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The proxy set in fixed order, cut into full batches (the last one padded with fully masked rows):
    (input_ids, attention_mask, distil_positions) each."""
    count = len(proxy.input_ids)
    positions = distil_positions(proxy)
    batches = []
    for start in range(0, count, batch_size):
        index = np.arange(start, start + batch_size)
        ids = np.zeros((batch_size, proxy.input_ids.shape[1]), dtype=np.int64)
        mask, distilled = np.zeros_like(ids), np.zeros_like(ids)
        real = index[index < count]
        ids[: len(real)] = proxy.input_ids[real]
        mask[: len(real)] = proxy.attention_mask[real]
        distilled[: len(real)] = positions[real]
        batches.append((ids, mask, distilled))
    return batches


def distil_on_proxy(
    trainer: LocalTrainer,
    proxy: EncodedSet,
    values: np.ndarray,
    indices: npt.NDArray[np.int64],
    temperature: float,
    epochs: int = 1,
) -> list[float]:
    """Distil `trainer`'s model towards target top-k distributions (N, T, k) on the proxy set, batch by batch,
    on the distilled positions only (`distil_positions`)."""
    batch_size = trainer.head.manifest.batch_size
    losses = []
    for _ in range(epochs):
        for number, (ids, mask, distilled) in enumerate(proxy_batches(proxy, batch_size)):
            rows = slice(number * batch_size, (number + 1) * batch_size)
            target_values = np.zeros((batch_size, *values.shape[1:]), dtype=np.float32)
            target_indices = np.zeros((batch_size, *indices.shape[1:]), dtype=np.int64)
            target_values[: len(values[rows])] = values[rows]  # the last batch's padded rows have no target
            target_indices[: len(indices[rows])] = indices[rows]
            target_values *= distilled[..., None]  # the attention still sees the prompt; the loss does not
            losses.append(trainer.distillation_step(ids, mask, target_values, target_indices, temperature))
    return losses


def proxy_top_k(head: Head, adapters: Arrays, proxy: EncodedSet, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's top-k next-token probabilities on the proxy set: (N, T, k) values and indices, the values 0
    where nothing is distilled (`distil_positions`)."""
    values, indices = [], []
    for ids, mask, distilled in proxy_batches(proxy, head.manifest.batch_size):
        logits = head.forward(ids, mask, adapters).activations
        batch_values, batch_indices = top_k(logits, k, distilled)
        values.append(batch_values)
        indices.append(batch_indices)
    count = len(proxy.input_ids)
    return np.concatenate(values)[:count], np.concatenate(indices)[:count]


def eval_loss(head: Head, adapters: Arrays, encoded: EncodedSet, max_batches: int) -> float:
    """Mean next-token loss over (at most max_batches batches of) `encoded`, counted per token."""
    total, tokens = 0.0, 0
    batch_size = head.manifest.batch_size
    for batch_index in range(min(max_batches, -(-len(encoded.input_ids) // batch_size))):
        index = np.arange(batch_index * batch_size, (batch_index + 1) * batch_size)
        real = index < len(encoded.input_ids)
        index = np.where(real, index, 0)
        labels = encoded.labels[index].copy()
        labels[~real] = -100
        logits = head.forward(encoded.input_ids[index], encoded.attention_mask[index], adapters).activations
        loss, _ = cross_entropy_and_grad(logits, labels)
        counted = int((labels[:, 1:] != -100).sum())
        total += loss * counted
        tokens += counted
    return total / max(tokens, 1)
