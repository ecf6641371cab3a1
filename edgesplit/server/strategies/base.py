"""The one interface every federated framework implements on the server, and what they share.

A strategy decides what is framework-specific in a run; the round engine (rounds.py) and the asyncio shell
(server.py) decide nothing about frameworks. Per framework, a strategy says:

    settings()         the keys a client's Welcome carries beyond the common ones (steps, wire, seed, ...)
    welcome_tensors()  the tensors of the Welcome (split, FedLLM: the global adapters; KD: the proxy set)
    check_step()       whether Activations make sense here (split: shapes and values; the others refuse them)
    train_step()       one step on the server's side of the model (split: the tail; on the worker thread)
    check_update()     what an AdapterUpdate must hold
    aggregate()        the round's updates -> what a RoundResult carries (the strategy's global model moves)
    evaluate()         the global model's loss on the eval set, or None without one
    tail_state() / load_tail_state()   what a checkpoint holds of the server's own training state

Heavy work (train_step, aggregate, evaluate, tail_state) runs on the tail worker (workers.py), one call at a
time: a strategy needs no locks of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgesplit.client.data import EncodedSet, encode_examples, load_tokenizer, read_jsonl
from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError, DataError
from edgesplit.server.robust import AggregationRule

Arrays = dict[str, np.ndarray]
# A round's accepted updates as aggregation sees them: (tensors, number of samples) per client.
Updates = list[tuple[Arrays, int]]
# The tail's checkpointed state: {"lora": {name: array}, "optimizer": torch optimiser state_dict}.
TailState = dict[str, Any]


@dataclass(frozen=True)
class StepOutcome:
    """What one training step on the server gives back: the loss and, unless the head is frozen,
    activation_grads (B, T, H) for the client's backward pass."""

    loss: float
    activation_grads: np.ndarray | None
    # A U-shaped step's first half: the middle's output (B, T, H) for the device's top; its loss is then NaN
    # (the device computes it) and activation_grads None.
    activations: np.ndarray | None = None


@dataclass(frozen=True)
class StrategyOptions:
    """Everything a strategy may be built from: the server's configuration, minus the transport."""

    artifacts: Path
    eval_data: Path | None = None
    eval_batches: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 0
    proxy_data: Path | None = None
    kd_top_k: int = 16
    device: str = "cpu"  # where the server's tail runs, and the precision of its frozen weights (placement.py)
    dtype: str = "fp32"
    aggregation: AggregationRule = AggregationRule()  # how split and fedllm combine the clients' adapters

    def __post_init__(self) -> None:
        if self.eval_batches < 1:
            raise ValueError(f"eval_batches must be at least 1, got {self.eval_batches}")
        if not self.learning_rate > 0:
            raise ValueError(f"the learning rate must be positive, got {self.learning_rate}")
        if self.kd_top_k < 1:
            raise ValueError(f"kd_top_k must be at least 1, got {self.kd_top_k}")


class Strategy(Protocol):
    """One federated framework, as the server runs it (the module docstring says what each method is for)."""

    name: str
    head: Head
    global_adapters: Arrays  # what a checkpoint saves as the global model, updated in place on resume
    eval_set: EncodedSet | None

    def settings(self) -> dict[str, object]: ...

    def welcome_tensors(self) -> Arrays: ...

    def check_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> None: ...

    def train_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome: ...

    def check_update(self, tensors: Arrays, cut_layer: int | None = None) -> None: ...

    def aggregate(self, updates: Updates) -> Arrays: ...

    def evaluate(self) -> float | None: ...

    def tail_state(self) -> TailState: ...

    def load_tail_state(self, state: TailState) -> None: ...


StrategyFactory = Callable[[StrategyOptions], Strategy]


def encode_file(head: Head, path: Path) -> EncodedSet:
    """A JSONL file of prompt/completion pairs, tokenised and padded as the artifacts' head expects."""
    manifest = head.manifest
    tokenizer = load_tokenizer(head.root)
    return encode_examples(
        tokenizer, read_jsonl(path), manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
    )


def encode_eval_file(head: Head, path: Path) -> EncodedSet:
    """The --eval-data set, refused at start when the export's window leaves none of its examples a target
    token: every round would otherwise report a loss over zero tokens."""
    encoded = encode_file(head, path)
    if encoded.num_without_targets >= len(encoded.input_ids):
        raise DataError(
            f"--eval-data {path}: none of its {len(encoded.input_ids)} examples keeps a completion token inside "
            f"the export's window of {head.manifest.max_seq_len} tokens, so there is nothing to evaluate: use "
            "shorter prompts, or export with a larger --max-seq-len"
        )
    return encoded


def load_global_adapters(target: Arrays, saved: Mapping[str, np.ndarray]) -> None:
    """Copy checkpointed adapters into the live arrays, in place: a KD trainer holds references to them.

    A checkpoint written for other artifacts (another model or cut, or an older version's adapter names) is
    refused before anything is copied, naming what differs."""
    unknown, missing = sorted(set(saved) - set(target)), sorted(set(target) - set(saved))
    if unknown or missing:
        raise ArtifactError(
            f"the checkpoint's adapters do not match these artifacts (unknown: {unknown[:3]}, missing: "
            f"{missing[:3]}): it was written for other artifacts or by an older edgesplit; start from a fresh "
            "--checkpoint-dir"
        )
    for name, value in saved.items():
        if target[name].shape != value.shape:
            raise ArtifactError(
                f"the checkpoint's {name} has shape {value.shape}, these artifacts {target[name].shape}: "
                "start from a fresh --checkpoint-dir"
            )
    for name, value in saved.items():
        target[name][...] = value
