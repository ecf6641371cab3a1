"""Robust aggregation of client adapters: pure numpy functions, and the rule `edgesplit serve --aggregation`
picks among them. FedAvg (aggregate.fedavg) stays the default; these bound what a few poisoned or broken
clients with valid tokens can do to the global model, at some cost in accuracy when every client is honest.

- `median`: the coordinate-wise median of the clients' values; `trimmed-mean`: per coordinate, the largest
  and the smallest `trim_fraction` of the values dropped, the rest averaged. Yin, Chen, Ramchandran and
  Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018. Both ignore
  the self-reported sample counts, so a client cannot buy weight by claiming many examples. The median
  withstands any minority of bad clients; the trimmed mean up to `trim_fraction` of them per side (with m
  clients it trims floor(trim_fraction * m) from each end: with 3 clients and 0.1, nothing).
- `clipped`: FedAvg of the clients' changes to the previous global model, each change first scaled down to an
  L2 norm (over all its tensors together) of at most `clip_norm`. Norm clipping against poisoning and
  backdoors: Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?", 2019
  (arXiv:1911.07963). The weighted mean of clipped changes is itself at most `clip_norm` long, so no client,
  whatever it sends or claims, moves the global model further than that in a round.

LoRA's A and B are aggregated separately, as FedAvg does (aggregate.py says why that is meant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from edgesplit.errors import TrainingError
from edgesplit.server.aggregate import fedavg

AGGREGATIONS = ("fedavg", "clipped", "median", "trimmed-mean")
Update = tuple[Mapping[str, NDArray[Any]], int]


@dataclass(frozen=True)
class AggregationRule:
    """Which aggregation a strategy runs on its clients' adapters, and its parameters."""

    name: str = "fedavg"
    trim_fraction: float = 0.1  # trimmed-mean: the share of values dropped at each end, per coordinate
    clip_norm: float = 1.0  # clipped: the longest change to the global adapters one client may make

    def __post_init__(self) -> None:
        if self.name not in AGGREGATIONS:
            raise ValueError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.name!r}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError(f"--trim-fraction must be at least 0 and below 0.5, got {self.trim_fraction}")
        if not 0 < self.clip_norm < float("inf"):
            raise ValueError(f"--clip-norm must be a positive number, got {self.clip_norm}")

    def aggregate(
        self, updates: Sequence[Update], previous: Mapping[str, NDArray[Any]]
    ) -> dict[str, NDArray[np.float32]]:
        """The new global adapters from this round's (tensors, num_samples) updates; `previous` is the
        global model the clients started the round from."""
        if self.name == "fedavg":
            return fedavg(updates)
        fedavg(updates)  # the same checks of names, shapes, finiteness and counts, whatever the rule
        if self.name == "median":
            return coordinate_median([tensors for tensors, _ in updates])
        if self.name == "trimmed-mean":
            return trimmed_mean([tensors for tensors, _ in updates], self.trim_fraction)
        return clipped_fedavg(updates, previous, self.clip_norm)


FEDAVG = AggregationRule()


def _stacked(clients: Sequence[Mapping[str, NDArray[Any]]], name: str) -> NDArray[np.float64]:
    return np.stack([np.asarray(tensors[name], dtype=np.float64) for tensors in clients])  # (clients, ...)


def coordinate_median(clients: Sequence[Mapping[str, NDArray[Any]]]) -> dict[str, NDArray[np.float32]]:
    """Each entry of each tensor: the median of the clients' values for it (unweighted)."""
    if not clients:
        raise TrainingError("median: no client updates to aggregate")
    return {name: np.median(_stacked(clients, name), axis=0).astype(np.float32) for name in clients[0]}


def trimmed_mean(clients: Sequence[Mapping[str, NDArray[Any]]], trim_fraction: float) -> dict[str, NDArray[np.float32]]:
    """Each entry: the mean of the clients' values for it after dropping the floor(trim_fraction * m)
    largest and as many smallest (unweighted)."""
    if not clients:
        raise TrainingError("trimmed mean: no client updates to aggregate")
    if not 0 <= trim_fraction < 0.5:
        raise TrainingError(f"trimmed mean: trim_fraction must be in [0, 0.5), got {trim_fraction}")
    cut = int(np.floor(trim_fraction * len(clients)))
    result = {}
    for name in clients[0]:
        ordered = np.sort(_stacked(clients, name), axis=0)
        result[name] = ordered[cut : len(clients) - cut].mean(axis=0).astype(np.float32)
    return result


def clipped_fedavg(
    updates: Sequence[Update], previous: Mapping[str, NDArray[Any]], clip_norm: float
) -> dict[str, NDArray[np.float32]]:
    """previous + the sample-weighted mean of each client's change (tensors - previous), every change scaled
    to an L2 norm of at most `clip_norm` over all its tensors together."""
    if not updates:
        raise TrainingError("clipped FedAvg: no client updates to aggregate")
    names = list(updates[0][0])
    missing = [name for name in names if name not in previous]
    if missing:
        raise TrainingError(f"clipped FedAvg: the previous global adapters lack {missing[:3]}")
    base = {name: np.asarray(previous[name], dtype=np.float64) for name in names}
    total = float(sum(int(count) for _, count in updates))
    if total <= 0:
        raise TrainingError("clipped FedAvg: the clients trained on 0 examples in total")
    moved = {name: np.zeros_like(base[name]) for name in names}
    for tensors, count in updates:
        change = {name: np.asarray(tensors[name], dtype=np.float64) - base[name] for name in names}
        norm = float(np.sqrt(sum(float(np.sum(np.square(delta))) for delta in change.values())))
        scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
        for name in names:
            moved[name] += (int(count) / total) * scale * change[name]
    return {name: (base[name] + moved[name]).astype(np.float32) for name in names}
