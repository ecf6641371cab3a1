"""Losses and their gradients with respect to the logits, in numpy, for clients that hold the whole model.

FedLLM and KD-FedLLM clients run every layer and the LM head on the device, so the loss is computed there:
the gradient with respect to the logits (B, T, V) is what the ONNX gradient graph takes as `activation_grads`.

    cross_entropy:   mean over labelled positions of -log softmax(logits[:, t])[labels[:, t + 1]]
    distillation:    mean over masked positions of KL(target || softmax(logits / tau)) * tau^2,
                     the target given as its top-k probabilities (indices and values), as they travel
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
IGNORE_INDEX = -100


def log_softmax(logits: FloatArray) -> FloatArray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    result: FloatArray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return result


def cross_entropy_and_grad(logits: FloatArray, labels: IntArray) -> tuple[float, FloatArray]:
    """Next-token cross-entropy (as the server's tail computes it) and d loss / d logits (B, T, V)."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t + 1
    valid = targets != IGNORE_INDEX
    count = int(valid.sum())
    grads = np.zeros_like(logits, dtype=np.float32)
    if count == 0:
        return 0.0, grads
    log_probs = log_softmax(logits[:, :-1, :].astype(np.float32))  # (B, T-1, V)
    rows, cols = np.nonzero(valid)
    picked = targets[rows, cols]
    loss = float(-log_probs[rows, cols, picked].sum() / count)
    probs = np.exp(log_probs)
    probs[rows, cols, picked] -= 1.0
    probs *= valid[..., None] / count
    grads[:, :-1, :] = probs
    return loss, grads


def top_k(logits: FloatArray, k: int, mask: npt.NDArray[np.int64]) -> tuple[FloatArray, IntArray]:
    """Top-k probabilities (softmax over the full vocabulary) and their indices per position; 0 where masked."""
    probs = np.exp(log_softmax(logits.astype(np.float32)))
    indices = np.argpartition(-probs, k - 1, axis=-1)[..., :k]
    values = np.take_along_axis(probs, indices, axis=-1)
    order = np.argsort(-values, axis=-1)
    indices = np.take_along_axis(indices, order, axis=-1).astype(np.int64)
    values = np.take_along_axis(values, order, axis=-1).astype(np.float32)
    values *= mask[..., None].astype(np.float32)
    return values, indices


def densify(values: FloatArray, indices: IntArray, vocab_size: int) -> FloatArray:
    """Top-k probabilities back to a full distribution: renormalised over the k kept tokens."""
    dense = np.zeros((*values.shape[:-1], vocab_size), dtype=np.float32)
    rows = np.arange(int(np.prod(values.shape[:-1])))[:, None] * vocab_size
    # Accumulate rather than assign: unused slots carry index 0 with value 0 and must not overwrite token 0.
    np.add.at(dense.reshape(-1), (rows + indices.reshape(len(rows), -1)).reshape(-1), values.reshape(-1))
    total = dense.sum(axis=-1, keepdims=True)
    result: FloatArray = np.divide(dense, total, out=np.zeros_like(dense), where=total > 0)
    return result


def distillation_and_grad(
    logits: FloatArray,
    target_values: FloatArray,
    target_indices: IntArray,
    mask: npt.NDArray[np.int64],
    temperature: float = 1.0,
) -> tuple[float, FloatArray]:
    """KL(target || student) at temperature tau, averaged over masked positions, and d loss / d logits."""
    target = densify(target_values, target_indices, logits.shape[-1])  # (B, T, V)
    valid = (mask > 0) & (target.sum(axis=-1) > 0)
    count = int(valid.sum())
    grads = np.zeros_like(logits, dtype=np.float32)
    if count == 0:
        return 0.0, grads
    log_student = log_softmax(logits.astype(np.float32) / temperature)
    log_target = np.log(np.where(target > 0, target, 1.0))
    per_position = (target * (log_target - log_student)).sum(axis=-1)  # (B, T)
    loss = float((per_position * valid).sum() / count) * temperature**2
    # d/dlogits of tau^2 * KL(p || softmax(z / tau)) = tau * (softmax(z / tau) - p)
    grads[...] = temperature * (np.exp(log_student) - target) * (valid[..., None] / count)
    return loss, grads
