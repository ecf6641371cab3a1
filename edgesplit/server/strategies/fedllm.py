"""FedLLM: every client trains LoRA on the whole model on the device; the server averages the adapters.

AdapterUpdate: the client's LoRA matrices on every layer -> FedAvg -> RoundResult: the global adapters
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgesplit.server.robust import FEDAVG, AggregationRule
from edgesplit.server.strategies.base import Arrays, StepOutcome, StrategyOptions, TailState, Updates
from edgesplit.server.strategies.whole_model import (
    evaluate_whole_model,
    load_eval_set,
    load_whole_model_head,
    no_tail_state,
    refuse_activations,
)


class FedLlmStrategy:
    """FedAvg of whole-model adapters; evaluation with the ONNX whole-model head."""

    name = "fedllm"

    def __init__(
        self,
        artifacts: Path,
        eval_data: Path | None,
        eval_batches: int,
        aggregation: AggregationRule = FEDAVG,
    ) -> None:
        self.head = load_whole_model_head(artifacts, self.name)
        self.aggregation = aggregation
        self.global_adapters: Arrays = self.head.initial_adapters()
        self.eval_set = load_eval_set(self.head, eval_data)
        self.eval_batches = eval_batches

    @classmethod
    def from_options(cls, options: StrategyOptions) -> FedLlmStrategy:
        return cls(options.artifacts, options.eval_data, options.eval_batches, options.aggregation)

    def settings(self) -> dict[str, object]:
        return {}

    def welcome_tensors(self) -> Arrays:
        return self.global_adapters

    def check_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> None:
        raise refuse_activations(self.name)

    def train_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome:
        raise refuse_activations(self.name)

    def check_update(self, tensors: Arrays, cut_layer: int | None = None) -> None:
        self.head.check_adapters(tensors)

    def aggregate(self, updates: Updates) -> Arrays:
        self.global_adapters = self.aggregation.aggregate(updates, self.global_adapters)
        return self.global_adapters

    def evaluate(self) -> float | None:
        return evaluate_whole_model(self.head, self.global_adapters, self.eval_set, self.eval_batches)

    def tail_state(self) -> TailState:
        return no_tail_state()

    def load_tail_state(self, state: TailState) -> None:
        pass  # nothing of the server's own is trained
