"""numpy losses and logit gradients equal PyTorch's."""

from __future__ import annotations

import numpy as np
import torch

from edgesplit.client.losses import cross_entropy_and_grad, densify, distillation_and_grad, top_k
from edgesplit.server.tail import causal_lm_loss


def test_cross_entropy_and_grad_match_pytorch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(2, 6)).astype(np.int64)
    labels[0, :3] = -100
    labels[1, 4:] = -100
    loss, grads = cross_entropy_and_grad(logits, labels)
    tensor = torch.from_numpy(logits).requires_grad_(True)
    expected = causal_lm_loss(tensor, torch.from_numpy(labels))
    expected.backward()
    assert abs(loss - float(expected)) < 1e-5
    np.testing.assert_allclose(grads, tensor.grad.numpy(), atol=1e-6)


def test_top_k_keeps_the_largest_probabilities_in_order() -> None:
    logits = np.log(np.array([[[0.1, 0.5, 0.15, 0.25]]], dtype=np.float32))
    values, indices = top_k(logits, 2, np.ones((1, 1), dtype=np.int64))
    assert indices.tolist() == [[[1, 3]]]
    np.testing.assert_allclose(values, [[[0.5, 0.25]]], rtol=1e-5)
    np.testing.assert_allclose(densify(values, indices, 4), [[[0, 2 / 3, 0, 1 / 3]]], rtol=1e-5)


def test_distillation_grad_matches_pytorch() -> None:
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 9)).astype(np.float32)
    teacher = rng.standard_normal((2, 3, 9)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]], dtype=np.int64)
    values, indices = top_k(teacher, 4, mask)
    loss, grads = distillation_and_grad(logits, values, indices, mask, temperature=2.0)
    target = torch.from_numpy(densify(values, indices, 9))
    student = torch.from_numpy(logits).requires_grad_(True)
    log_student = torch.log_softmax(student / 2.0, dim=-1)
    per = (target * (torch.log(torch.where(target > 0, target, torch.ones_like(target))) - log_student)).sum(-1)
    valid = torch.from_numpy(mask).bool()
    expected = per[valid].mean() * 4.0
    expected.backward()
    assert abs(loss - float(expected)) < 1e-5
    np.testing.assert_allclose(grads, student.grad.numpy(), atol=1e-6)
