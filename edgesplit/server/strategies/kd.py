"""KD-FedLLM: clients share top-k next-token probabilities on a shared proxy set, never weights.

    AdapterUpdate: proxy_values, proxy_indices (N, T, k)  -> sample-weighted average of the distributions
        -> the server distils it into its own global model (for evaluation)
        -> RoundResult: the averaged top-k (N, T, k), for the clients to distil from

It follows FedMD (Li and Wang, 2019: clients share class scores on a public labelled set, and each client
"digests" the consensus by distillation) with the server-side ensemble distillation of FedDF (Lin et al., 2020).
For a language model the public set's "inputs" are whole examples, prompt and completion (--proxy-data lines
of context/prompt and completion): the clients' next-token distributions are taken, and distilled, on the
completion's positions only (edgesplit.client.local.distil_positions), teacher-forced on the public
completion; a proxy of prompts alone would teach nothing about the answers. Both run on the ONNX whole-model
head (`export --full-model`), the server's distillation too, so neither needs PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesplit.client.local import LocalTrainer, distil_on_proxy
from edgesplit.errors import TrainingError
from edgesplit.server.aggregate import average_top_k
from edgesplit.server.strategies.base import Arrays, StepOutcome, StrategyOptions, TailState, Updates, encode_file
from edgesplit.server.strategies.whole_model import (
    evaluate_whole_model,
    load_eval_set,
    load_whole_model_head,
    no_tail_state,
    refuse_activations,
)


@dataclass(frozen=True)
class KdSettings:
    top_k: int = 16
    temperature: float = 1.0
    server_distill_epochs: int = 1
    client_distill_epochs: int = 1

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.temperature <= 0:
            raise ValueError("KD needs top_k >= 1 and a positive temperature")


class KdStrategy:
    """Averages the clients' top-k logits on the proxy set and distils them into the server's global model."""

    name = "kd"

    def __init__(
        self,
        artifacts: Path,
        eval_data: Path | None,
        eval_batches: int,
        proxy_data: Path | None,
        learning_rate: float,
        settings: KdSettings | None = None,
    ) -> None:
        self.head = load_whole_model_head(artifacts, self.name)
        if proxy_data is None:
            raise TrainingError("--framework kd needs --proxy-data: the shared inputs the clients' logits are on")
        # The trainer updates these arrays in place: they are the global model that is evaluated and saved.
        self.global_adapters: Arrays = self.head.initial_adapters()
        self.eval_set = load_eval_set(self.head, eval_data)
        self.eval_batches = eval_batches
        self.kd = settings or KdSettings()
        self.proxy = encode_file(self.head, proxy_data)
        self.trainer = LocalTrainer(self.head, self.global_adapters, learning_rate)

    @classmethod
    def from_options(cls, options: StrategyOptions) -> KdStrategy:
        return cls(
            options.artifacts,
            options.eval_data,
            options.eval_batches,
            options.proxy_data,
            options.learning_rate,
            KdSettings(top_k=options.kd_top_k),
        )

    def settings(self) -> dict[str, object]:
        return {
            "top_k": self.kd.top_k,
            "temperature": self.kd.temperature,
            "client_distill_epochs": self.kd.client_distill_epochs,
        }

    def welcome_tensors(self) -> Arrays:
        # The proxy set travels once, as tokens, with its labels (where to distil); no weights ever do.
        return {
            "proxy.input_ids": self.proxy.input_ids,
            "proxy.attention_mask": self.proxy.attention_mask,
            "proxy.labels": self.proxy.labels,
        }

    def check_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> None:
        raise refuse_activations(self.name)

    def train_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome:
        raise refuse_activations(self.name)

    def check_update(self, tensors: Arrays, cut_layer: int | None = None) -> None:
        values, indices = tensors.get("proxy_values"), tensors.get("proxy_indices")
        expected = (*self.proxy.input_ids.shape, self.kd.top_k)
        if values is None or indices is None or values.shape != expected or indices.shape != expected:
            raise TrainingError(f"a KD update carries proxy_values and proxy_indices of shape {expected}")
        if np.any(indices < 0) or np.any(indices >= self.head.manifest.vocab_size):
            raise TrainingError("proxy_indices outside the vocabulary")
        if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
            raise TrainingError("proxy_values must be probabilities in [0, 1]")

    def aggregate(self, updates: Updates) -> Arrays:
        values, indices = average_top_k([(t["proxy_values"], t["proxy_indices"], n) for t, n in updates], self.kd.top_k)
        distil_on_proxy(self.trainer, self.proxy, values, indices, self.kd.temperature, self.kd.server_distill_epochs)
        return {"proxy_values": values, "proxy_indices": indices}

    def evaluate(self) -> float | None:
        return evaluate_whole_model(self.head, self.global_adapters, self.eval_set, self.eval_batches)

    def tail_state(self) -> TailState:
        return no_tail_state()

    def load_tail_state(self, state: TailState) -> None:
        pass  # the distilled global model is saved as the checkpoint's global adapters
