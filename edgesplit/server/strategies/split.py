"""Split learning: the device runs the head, the server the tail; FedAvg of the head adapters each round.

Activations: activations (B, T, H), attention_mask (B, T), labels (B, T)
    --[ tail: layers [cut, L), final norm, LM head, loss ]--> loss, activation_grads (B, T, H)
AdapterUpdate: the head's LoRA matrices -> FedAvg -> RoundResult: the global head adapters

A mixed-cut export (`edgesplit export --cut-layers 2,4,8`) lets each device run its own cut. The one tail is
built from the smallest cut; a client at cut c runs its layers [c, L), and the same layer's tail adapters
are one parameter whoever's step trains them. The global adapters then cover layers [0, c_max): layers below
the smallest cut come from the devices alone, the others are also the tail's, and each round averages every
adapter over whoever trained it (`fedavg_by_holder`, docs/mixed-cuts.md), writes the result back into the
tail, and sends each device the adapters of its own layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgesplit.client.artifacts import device_artifacts, load_manifest
from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError, TrainingError
from edgesplit.lora_names import parse_adapter_name
from edgesplit.server.aggregate import fedavg_by_holder
from edgesplit.server.generate import eval_loss
from edgesplit.server.guards import check_activation_scale
from edgesplit.server.strategies.base import Arrays, StepOutcome, StrategyOptions, TailState, Updates, encode_eval_file
from edgesplit.server.tail import OptimizerSettings, Tail


def adapters_below(adapters: Mapping[str, np.ndarray], cut_layer: int) -> Arrays:
    """The adapters of layers [0, cut_layer): what a device at that cut holds."""
    return {name: value for name, value in adapters.items() if parse_adapter_name(name).layer < cut_layer}


def build_tail(options: StrategyOptions) -> Tail:
    """The server's tail as a run's options describe it. Every tail worker rank builds its replica here too, so
    the ranks start from the same LoRA initialisation as rank 0's strategy."""
    return Tail(
        options.artifacts,
        OptimizerSettings(learning_rate=options.learning_rate, weight_decay=options.weight_decay),
        seed=options.seed,
        threads=options.threads,
        device=options.device,
        dtype=options.dtype,
    )


class SplitStrategy:
    """Holds the shared tail and, for evaluation, a head of its own (the server runs the whole model then:
    the smallest cut's head, then the whole tail)."""

    name = "split"

    def __init__(self, options: StrategyOptions) -> None:
        # The export's own manifest: a mixed-cut one lists its cuts; the head is the smallest cut's.
        self.manifest = load_manifest(options.artifacts, verify=False)
        self.head = Head(device_artifacts(options.artifacts, self.manifest.cut_layer), verify=False)
        if self.manifest.full_model:
            raise ArtifactError(
                f"{options.artifacts} is a --full-model export: serve it with --framework "
                "fedllm or kd, or export a split head with --cut-layer"
            )
        self.tail = build_tail(options)
        self.mixed = bool(self.manifest.cuts)
        if self.mixed and options.aggregation.name != "fedavg":
            raise ArtifactError(
                f"--aggregation {options.aggregation.name} is not available for a mixed-cut export yet: its "
                "adapters are averaged per layer over whoever trained them (docs/mixed-cuts.md); serve it with "
                "--aggregation fedavg, or export one cut"
            )
        self.global_adapters: Arrays = self.head.initial_adapters()
        if self.mixed:
            # Layers [c_min, c_max) are the tail's too: their global value starts as the tail's, so that a
            # deeper device starts them where the tail is.
            deepest = max(self.manifest.cut_layers)
            self.global_adapters.update(adapters_below(self.tail.lora_state(), deepest))
        self.eval_set = encode_eval_file(self.head, options.eval_data) if options.eval_data else None
        self.eval_batches = options.eval_batches
        self.aggregation = options.aggregation

    def settings(self) -> dict[str, object]:
        return {}  # the common settings say all a split client needs

    def welcome_tensors(self) -> Arrays:
        return self.global_adapters

    def _check_cut(self, cut_layer: int | None) -> int:
        cut = self.manifest.cut_layer if cut_layer is None else cut_layer
        if cut not in self.manifest.cut_layers:
            raise TrainingError(f"a client at cut {cut}: these artifacts were exported for {self.manifest.cut_layers}")
        return cut

    def check_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> None:
        """Refuse activations the tail cannot learn from, before they reach it."""
        self._check_cut(cut_layer)
        activations = tensors["activations"]
        # (B, T, H) at every cut: the hidden size does not change from layer to layer.
        # T is one of the export's sequence buckets: a client cuts each batch's padding to the shortest.
        batch, _, hidden = self.manifest.activations_shape
        shape = tuple(activations.shape)
        if len(shape) != 3 or shape[0] != batch or shape[2] != hidden or shape[1] not in self.manifest.seq_buckets:
            expected = f"({batch}, T, {hidden}) for T in {list(self.manifest.seq_buckets)}"
            raise TrainingError(f"activations of shape {activations.shape}, the artifacts say {expected}")
        if not np.all(np.isfinite(activations)):
            raise TrainingError("activations contain NaN or Inf")
        check_activation_scale(activations)  # one huge finite value would still overflow the tail's norms
        mask = tensors["attention_mask"]
        if mask.shape != shape[:2] or tensors["labels"].shape != shape[:2]:
            raise TrainingError(
                f"attention_mask {mask.shape} and labels {tensors['labels'].shape} must be {shape[:2]}, as the "
                "activations"
            )
        if np.any((mask != 0) & (mask != 1)):
            raise TrainingError("attention_mask holds values other than 0 and 1")
        labels = tensors["labels"]
        if np.any((labels != -100) & ((labels < 0) | (labels >= self.manifest.vocab_size))):
            raise TrainingError(f"labels outside the vocabulary [0, {self.manifest.vocab_size})")

    def train_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome:
        # activations (B, T, H) -> tail layers [cut, L) -> loss, and d loss / d activations (B, T, H) unless the
        # head is frozen
        loss, grads = self.tail.train_step(
            tensors["activations"],
            tensors["attention_mask"],
            tensors["labels"],
            not self.manifest.frozen_head,
            from_layer=cut_layer,
        )
        return StepOutcome(loss, grads)

    def train_batch(self, steps: Sequence[Mapping[str, np.ndarray]], cut_layer: int | None = None) -> list[StepOutcome]:
        """Several clients' steps as one step of the tail (Tail.train_batch); the batching worker's."""
        batch = [(tensors["activations"], tensors["attention_mask"], tensors["labels"]) for tensors in steps]
        return [
            StepOutcome(loss, grads)
            for loss, grads in self.tail.train_batch(batch, not self.manifest.frozen_head, cut_layer)
        ]

    def client_adapters(self, cut_layer: int | None) -> Arrays:
        """The global adapters a client at `cut_layer` holds (all of them for a single-cut export)."""
        if not self.mixed:
            return self.global_adapters
        return adapters_below(self.global_adapters, self._check_cut(cut_layer))

    def check_update(self, tensors: Arrays, cut_layer: int | None = None) -> None:
        expected_adapters = self.client_adapters(cut_layer)
        names, expected = set(tensors), set(expected_adapters)
        if names != expected:
            raise TrainingError(
                f"AdapterUpdate carries {sorted(names)[:8]}, the head's adapters are {sorted(expected)[:8]}"
            )
        for name, value in tensors.items():
            if value.shape != expected_adapters[name].shape:
                raise TrainingError(f"adapter {name} has shape {value.shape}, expected {expected_adapters[name].shape}")
            if not np.all(np.isfinite(value)):
                raise TrainingError(f"adapter {name} contains NaN or Inf")

    def aggregate(self, updates: Updates) -> Arrays:
        if not self.mixed:
            self.global_adapters = self.aggregation.aggregate(updates, self.global_adapters)  # fedavg by default
            return self.global_adapters
        # Per adapter over whoever trained it: the devices that hold it and, for the layers the tail also
        # holds, the tail (for the devices whose cut is at or below that layer). The result goes back into
        # the tail; its AdamW moments for those matrices are kept (docs/mixed-cuts.md says why).
        tail_copy = {name: value for name, value in self.tail.lora_state().items() if name in self.global_adapters}
        averaged = fedavg_by_holder(updates, tail_copy)
        self.tail.set_lora({name: value for name, value in averaged.items() if name in tail_copy})
        self.global_adapters = {**self.global_adapters, **averaged}
        return self.global_adapters

    def evaluate(self) -> float | None:
        if self.eval_set is None:
            return None
        return eval_loss(self.head, self.tail, self.eval_set, self.global_adapters, self.eval_batches)

    def tail_state(self) -> TailState:
        return self.tail.state_dict()

    def load_tail_state(self, state: TailState) -> None:
        self.tail.load_state_dict(state)
