"""Aggregation of client adapters, as free numpy functions (the maths of a strategy, no I/O, no torch).

FedAvg (McMahan et al., 2017): the new global value of each tensor is the mean of the clients' values,
weighted by how many training examples each client used this round:

    global[name] = sum_k n_k * client_k[name] / sum_k n_k

For LoRA this averages A and B separately, as FedAvg over PEFT adapters does; it is not the average of the
products B @ A, and is not meant to be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edge_client.errors import TrainingError


def fedavg(updates: Sequence[tuple[Mapping[str, NDArray[Any]], int]]) -> dict[str, NDArray[np.float32]]:
    """Sample-weighted mean of the clients' tensors: `updates` is one (tensors, num_examples) per client.

    Every client must send the same names with the same shapes, all finite. A client with 0 examples is
    allowed and has no effect; the total must be positive. Accumulates in float64, returns float32.
    Raises TrainingError, naming the client (its index in `updates`) and tensor, for anything else.
    """
    if not updates:
        raise TrainingError("fedavg got no client updates to aggregate")
    reference, _ = updates[0]
    if not reference:
        raise TrainingError("client 0 sent no tensors")
    shapes = {name: np.shape(tensor) for name, tensor in reference.items()}

    total_examples = 0
    for client, (tensors, num_examples) in enumerate(updates):
        # bool is an int subclass; True as a sample count is a bug upstream, not a weight of 1.
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
            raise TrainingError(f"client {client}: example count must be an int, got {num_examples!r}")
        if num_examples < 0:
            raise TrainingError(f"client {client}: example count must be >= 0, got {num_examples}")
        total_examples += int(num_examples)
        _check_tensors(client, tensors, shapes)
    if total_examples <= 0:
        raise TrainingError("fedavg: the clients trained on 0 examples in total; there is nothing to average")

    averaged: dict[str, NDArray[np.float32]] = {}
    for name, shape in shapes.items():
        weighted_sum = np.zeros(shape, dtype=np.float64)
        for tensors, num_examples in updates:
            if num_examples:
                weighted_sum += float(num_examples) * np.asarray(tensors[name], dtype=np.float64)
        averaged[name] = (weighted_sum / total_examples).astype(np.float32)
    return averaged


def _check_tensors(
    client: int, tensors: Mapping[str, NDArray[Any]], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    if set(tensors) != set(shapes):
        missing = sorted(set(shapes) - set(tensors))
        unexpected = sorted(set(tensors) - set(shapes))
        raise TrainingError(
            f"client {client} sent different tensors from client 0 "
            f"(missing: {missing or 'none'}, unexpected: {unexpected or 'none'})"
        )
    for name, expected_shape in shapes.items():
        tensor = tensors[name]
        if not isinstance(tensor, np.ndarray) or not np.issubdtype(tensor.dtype, np.floating):
            kind = tensor.dtype if isinstance(tensor, np.ndarray) else type(tensor).__name__
            raise TrainingError(
                f"client {client}: tensor {name!r} must be a floating-point array, got {kind}"
            )
        if tensor.shape != expected_shape:
            raise TrainingError(
                f"client {client}: tensor {name!r} has shape {tensor.shape}, client 0 sent {expected_shape}"
            )
        if not np.isfinite(tensor).all():
            raise TrainingError(f"client {client}: tensor {name!r} contains NaN or Inf")
