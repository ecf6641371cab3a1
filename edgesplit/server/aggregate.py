"""Aggregation of client adapters, as free numpy functions (the maths of a strategy, no I/O, no torch).

FedAvg (McMahan et al., 2017): the new global value of each tensor is the mean of the clients' values,
weighted by how many training examples each client used this round:

    global[name] = sum_k n_k * client_k[name] / sum_k n_k

For LoRA this averages A and B separately, as FedAvg over PEFT adapters does; it is not the average of the
products B @ A, and is not meant to be.

The tensors are matched by name alone. Client adapters are named by the model's absolute layer and the
module's path in it (`layers.3.self_attn.q_proj.lora_A`, edgesplit/lora_names.py), so one layer's matrix has
one name on every client whatever its cut: the key that averaging over clients with different cuts will need.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgesplit.errors import TrainingError


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
        total_examples += _checked_count(client, num_examples)
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


def fedavg_by_holder(
    updates: Sequence[tuple[Mapping[str, NDArray[Any]], int]],
    server_copy: Mapping[str, NDArray[Any]] | None = None,
) -> dict[str, NDArray[np.float32]]:
    """FedAvg per adapter name over whoever trained it, for a federation whose devices run different cuts.

    A device at cut c holds (and sends) the adapters of layers [0, c); the server's tail holds layers
    [c_min, L) and trained each of them for every device whose cut is at or below that layer. For each name
    in the updates or in `server_copy` (the tail's values of the layers some device may hold, [c_min, c_max)):

        global[name] = (sum over devices k holding name of n_k * client_k[name]
                        + (sum over devices k not holding it of n_k) * server_copy[name]) / sum_k n_k

    The server's copy counts only where it has the name; a name that no device sent this round comes back
    as the server's copy. When every device holds the same names and `server_copy` has none of them, this is
    `fedavg` exactly (the same float64 sums in the same order). Raises TrainingError as `fedavg` does, and
    for a name whose shape differs between its holders or whose holders all trained on 0 examples with no
    server copy to fall back on.
    """
    if not updates:
        raise TrainingError("fedavg_by_holder got no client updates to aggregate")
    server = dict(server_copy or {})
    shapes: dict[str, tuple[int, ...]] = {}
    total_examples = 0
    for client, (tensors, num_examples) in enumerate(updates):
        if not tensors:
            raise TrainingError(f"client {client} sent no tensors")
        total_examples += _checked_count(client, num_examples)
        for name, tensor in tensors.items():
            shapes.setdefault(name, np.shape(tensor))
        _check_tensors(client, tensors, {name: shapes[name] for name in tensors})
    if total_examples <= 0:
        raise TrainingError("the clients trained on 0 examples in total; there is nothing to average")
    for name, tensor in server.items():
        if name in shapes and np.shape(tensor) != shapes[name]:
            raise TrainingError(f"the server's {name!r} has shape {np.shape(tensor)}, the clients sent {shapes[name]}")
        if not np.isfinite(tensor).all():
            raise TrainingError(f"the server's {name!r} contains NaN or Inf")

    averaged: dict[str, NDArray[np.float32]] = {}
    for name in [*shapes, *(name for name in server if name not in shapes)]:
        weighted_sum = np.zeros(np.shape(server[name]) if name not in shapes else shapes[name], dtype=np.float64)
        held_examples = 0
        for tensors, num_examples in updates:
            if name in tensors:
                held_examples += int(num_examples)
                if num_examples:
                    weighted_sum += float(num_examples) * np.asarray(tensors[name], dtype=np.float64)
        server_examples = total_examples - held_examples if name in server else 0
        if server_examples:
            weighted_sum += float(server_examples) * np.asarray(server[name], dtype=np.float64)
        weight = held_examples + server_examples
        if weight <= 0:
            raise TrainingError(f"{name!r}: its holders trained on 0 examples and the server holds no copy")
        averaged[name] = (weighted_sum / weight).astype(np.float32)
    return averaged


def _checked_count(client: int, num_examples: object) -> int:
    """A client's example count as an int >= 0; TrainingError naming the client otherwise."""
    # bool is an int subclass; True as a sample count is a bug upstream, not a weight of 1.
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer):
        raise TrainingError(f"client {client}: example count must be an int, got {num_examples!r}")
    if num_examples < 0:
        raise TrainingError(f"client {client}: example count must be >= 0, got {num_examples}")
    return int(num_examples)


def _check_tensors(client: int, tensors: Mapping[str, NDArray[Any]], shapes: Mapping[str, tuple[int, ...]]) -> None:
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
            raise TrainingError(f"client {client}: tensor {name!r} must be a floating-point array, got {kind}")
        if tensor.shape != expected_shape:
            raise TrainingError(
                f"client {client}: tensor {name!r} has shape {tensor.shape}, client 0 sent {expected_shape}"
            )
        if not np.isfinite(tensor).all():
            raise TrainingError(f"client {client}: tensor {name!r} contains NaN or Inf")


def average_top_k(
    updates: Sequence[tuple[NDArray[np.floating], NDArray[np.integer], int]], k: int
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The sample-weighted mean of clients' top-k next-token distributions, cut back to its own top k.

    Each update is (values (N, T, k_c), indices (N, T, k_c), num_samples): top-k probabilities per proxy
    position. Each client's kept probabilities are renormalised to sum to 1 before averaging, so a client
    whose top k covers little mass does not count for less. Computed sparsely: positions x kept tokens, never
    positions x vocabulary.
    """
    if not updates:
        raise TrainingError("average_top_k needs at least one client's logits")
    shape = updates[0][0].shape[:-1]
    total_weight = float(sum(weight for _, _, weight in updates))
    if total_weight <= 0:
        raise TrainingError("the clients' sample counts add up to zero")
    positions, tokens, masses = [], [], []
    for values, indices, weight in updates:
        if values.shape[:-1] != shape or indices.shape != values.shape:
            raise TrainingError(f"logits of shape {values.shape} do not match the first client's {shape}")
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise TrainingError("client logits contain NaN, Inf or negative probabilities")
        flat_values = values.reshape(-1, values.shape[-1]).astype(np.float64)
        sums = flat_values.sum(axis=1, keepdims=True)
        normalised = np.divide(flat_values, sums, out=np.zeros_like(flat_values), where=sums > 0)
        rows = np.repeat(np.arange(flat_values.shape[0]), flat_values.shape[1])
        positions.append(rows)
        tokens.append(indices.reshape(-1).astype(np.int64))
        masses.append(normalised.reshape(-1) * (weight / total_weight))
    row, token, mass = np.concatenate(positions), np.concatenate(tokens), np.concatenate(masses)
    vocab = int(token.max()) + 1
    keys, inverse = np.unique(row * vocab + token, return_inverse=True)
    summed = np.bincount(inverse, weights=mass)
    key_rows, key_tokens = keys // vocab, keys % vocab
    count = int(np.prod(shape))
    out_values = np.zeros((count, k), dtype=np.float32)
    out_indices = np.zeros((count, k), dtype=np.int64)
    # Sort by (row, -mass): each row's entries come together, largest first; keep the first k of each row.
    order = np.lexsort((-summed, key_rows))
    sorted_rows = key_rows[order]
    starts = np.searchsorted(sorted_rows, np.arange(count))
    rank = np.arange(len(order)) - starts[sorted_rows]
    keep = rank < k
    out_values[sorted_rows[keep], rank[keep]] = summed[order][keep]
    out_indices[sorted_rows[keep], rank[keep]] = key_tokens[order][keep]
    return out_values.reshape(*shape, k), out_indices.reshape(*shape, k)
