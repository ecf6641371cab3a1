"""Split learning: the device runs the head, the server the tail; FedAvg of the head adapters each round.

Activations: activations (B, T, H), attention_mask (B, T), labels (B, T)
    --[ tail: layers [cut, L), final norm, LM head, loss ]--> loss, activation_grads (B, T, H)
AdapterUpdate: the head's LoRA matrices -> FedAvg -> RoundResult: the global head adapters
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError, TrainingError
from edgesplit.server.generate import eval_loss
from edgesplit.server.guards import check_activation_scale
from edgesplit.server.strategies.base import Arrays, StepOutcome, StrategyOptions, TailState, Updates, encode_eval_file
from edgesplit.server.tail import OptimizerSettings, Tail


class SplitStrategy:
    """Holds the shared tail and, for evaluation, a head of its own (the server runs the whole model then)."""

    name = "split"

    def __init__(self, options: StrategyOptions) -> None:
        self.head = Head(options.artifacts, verify=False)
        self.manifest = self.head.manifest
        if self.manifest.full_model:
            raise ArtifactError(
                f"{options.artifacts} is a --full-model export: serve it with --framework "
                "fedllm or kd, or export a split head with --cut-layer"
            )
        self.tail = Tail(
            options.artifacts,
            OptimizerSettings(learning_rate=options.learning_rate, weight_decay=options.weight_decay),
            seed=options.seed,
            threads=options.threads,
        )
        self.global_adapters: Arrays = self.head.initial_adapters()
        self.eval_set = encode_eval_file(self.head, options.eval_data) if options.eval_data else None
        self.eval_batches = options.eval_batches
        self.aggregation = options.aggregation

    def settings(self) -> dict[str, object]:
        return {}  # the common settings say all a split client needs

    def welcome_tensors(self) -> Arrays:
        return self.global_adapters

    def check_step(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Refuse activations the tail cannot learn from, before they reach it."""
        activations = tensors["activations"]
        if tuple(activations.shape) != self.manifest.activations_shape:
            expected = self.manifest.activations_shape
            raise TrainingError(f"activations of shape {activations.shape}, the artifacts say {expected}")
        if not np.all(np.isfinite(activations)):
            raise TrainingError("activations contain NaN or Inf")
        check_activation_scale(activations)  # one huge finite value would still overflow the tail's norms
        mask = tensors["attention_mask"]
        if np.any((mask != 0) & (mask != 1)):
            raise TrainingError("attention_mask holds values other than 0 and 1")
        labels = tensors["labels"]
        if np.any((labels != -100) & ((labels < 0) | (labels >= self.manifest.vocab_size))):
            raise TrainingError(f"labels outside the vocabulary [0, {self.manifest.vocab_size})")

    def train_step(self, tensors: Mapping[str, np.ndarray]) -> StepOutcome:
        # activations (B, T, H) -> tail -> loss, and d loss / d activations (B, T, H) unless the head is frozen
        loss, grads = self.tail.train_step(
            tensors["activations"], tensors["attention_mask"], tensors["labels"], not self.manifest.frozen_head
        )
        return StepOutcome(loss, grads)

    def check_update(self, tensors: Arrays) -> None:
        names, expected = set(tensors), set(self.manifest.lora.matrices)
        if names != expected:
            raise TrainingError(
                f"AdapterUpdate carries {sorted(names)[:8]}, the head's adapters are {sorted(expected)[:8]}"
            )
        self.head.check_adapters(tensors)  # shapes, finite

    def aggregate(self, updates: Updates) -> Arrays:
        self.global_adapters = self.aggregation.aggregate(updates, self.global_adapters)
        return self.global_adapters

    def evaluate(self) -> float | None:
        if self.eval_set is None:
            return None
        return eval_loss(self.head, self.tail, self.eval_set, self.global_adapters, self.eval_batches)

    def tail_state(self) -> TailState:
        return self.tail.state_dict()

    def load_tail_state(self, state: TailState) -> None:
        self.tail.load_state_dict(state)
