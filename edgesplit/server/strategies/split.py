"""Split learning: the device runs the head, the server the tail; FedAvg of the head adapters each round.

Activations: activations (B, T, H), attention_mask (B, T), labels (B, T)
    --[ tail: layers [cut, L), final norm, LM head, loss ]--> loss, activation_grads (B, T, H)
AdapterUpdate: the head's LoRA matrices -> FedAvg -> RoundResult: the global head adapters

A U-shaped export (`edgesplit export --top-layers K`) keeps the last K layers, the norm, the LM head and the
loss on the device. A step is two exchanges, and two calls here: Activations "lower" (activations, mask; no
labels) -> the middle [cut, L-K) -> its output down; Gradients "upper" (the device's gradient there) -> the
middle again, backward, AdamW -> the lower cut's gradient down. The global adapters are the head's and the
top's, averaged together; the server evaluates the whole model with them (head, middle, then its own copy of
the top layers from tail/, which holds [cut, L)).

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
from safetensors.numpy import load_file

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


def build_tail(options: StrategyOptions, first_layer: int | None = None, end_layer: int | None = None) -> Tail:
    """The server's tail as a run's options describe it: layers [first_layer, end_layer) of the export's tail
    (all of them by default; a U-shaped split's middle ends where the device's top starts). Every tail worker
    rank builds its replica here too, so the ranks start from the same LoRA initialisation as rank 0's."""
    return Tail(
        options.artifacts,
        OptimizerSettings(learning_rate=options.learning_rate, weight_decay=options.weight_decay),
        seed=options.seed,
        first_layer=first_layer,
        end_layer=end_layer,
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
        self.u_shaped = self.manifest.u_shaped
        # A U-shaped export's tail/ holds [cut, L): the server trains the middle [cut, L-K) and evaluates the
        # top [L-K, L) with the global top adapters (never trained here: the devices train them).
        end = self.manifest.top_first_layer if self.u_shaped else None
        self.tail = build_tail(options, end_layer=end)
        self.top_tail = build_tail(options, first_layer=end) if self.u_shaped else None
        self.mixed = bool(self.manifest.cuts)
        if self.mixed and options.aggregation.name != "fedavg":
            raise ArtifactError(
                f"--aggregation {options.aggregation.name} is not available for a mixed-cut export yet: its "
                "adapters are averaged per layer over whoever trained them (docs/mixed-cuts.md); serve it with "
                "--aggregation fedavg, or export one cut"
            )
        self.global_adapters: Arrays = self.head.initial_adapters()
        if self.u_shaped:
            if self.mixed:
                raise ArtifactError("a U-shaped export has one cut: export it again with one --cut-layer")
            top = load_file(str(options.artifacts / "top_adapters.safetensors"))
            self.global_adapters.update({name: np.asarray(value, np.float32) for name, value in top.items()})
        if self.mixed:
            # Layers [c_min, c_max) are the tail's too: their global value starts as the tail's, so that a
            # deeper device starts them where the tail is.
            deepest = max(self.manifest.cut_layers)
            self.global_adapters.update(adapters_below(self.tail.lora_state(), deepest))
        self.eval_set = encode_eval_file(self.head, options.eval_data) if options.eval_data else None
        self.eval_batches = options.eval_batches
        self.aggregation = options.aggregation

    def settings(self) -> dict[str, object]:
        return {"exchange": "u_shaped"} if self.u_shaped else {}  # the common settings say all else

    def welcome_tensors(self) -> Arrays:
        return self.global_adapters

    def _check_cut(self, cut_layer: int | None) -> int:
        cut = self.manifest.cut_layer if cut_layer is None else cut_layer
        if cut not in self.manifest.cut_layers:
            raise TrainingError(f"a client at cut {cut}: these artifacts were exported for {self.manifest.cut_layers}")
        return cut

    def check_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> None:
        """Refuse activations the tail cannot learn from, before they reach it (and a U-shaped step's upper
        gradient: `activation_grads`, with the lower activations it goes with)."""
        self._check_cut(cut_layer)
        if ("labels" in tensors) == self.u_shaped:
            raise TrainingError(
                "labels came up with the activations, and this server runs a U-shaped split where they stay on "
                "the device"
                if self.u_shaped
                else "no labels came up with the activations: this server runs a plain split"
            )
        if "activation_grads" in tensors:
            upper = tensors["activation_grads"]
            if tuple(upper.shape) != self.manifest.activations_shape or not np.all(np.isfinite(upper)):
                raise TrainingError(
                    f"the gradient at the upper cut must be finite, of shape {self.manifest.activations_shape}; "
                    f"got shape {upper.shape}"
                )
        activations = tensors["activations"]
        # (B, T, H) at every cut: the hidden size does not change from layer to layer.
        # T is one of the export's sequence lengths (its buckets, or any of 2..max_seq_len for a dynamic-length
        # head): a client cuts each batch's padding to the shortest that holds it.
        batch, _, hidden = self.manifest.activations_shape
        shape = tuple(activations.shape)
        lengths = self.manifest.seq_lengths
        if len(shape) != 3 or shape[0] != batch or shape[2] != hidden or shape[1] not in lengths:
            allowed = f"{lengths[0]} <= T <= {lengths[-1]}" if self.manifest.dynamic_seq else f"T in {list(lengths)}"
            expected = f"({batch}, T, {hidden}) for {allowed}"
            raise TrainingError(f"activations of shape {activations.shape}, the artifacts say {expected}")
        if not np.all(np.isfinite(activations)):
            raise TrainingError("activations contain NaN or Inf")
        check_activation_scale(activations)  # one huge finite value would still overflow the tail's norms
        mask = tensors["attention_mask"]
        if mask.shape != shape[:2]:
            raise TrainingError(f"attention_mask {mask.shape} must be {shape[:2]}, as the activations")
        if np.any((mask != 0) & (mask != 1)):
            raise TrainingError("attention_mask holds values other than 0 and 1")
        labels = tensors.get("labels")  # a U-shaped step carries none: they stay on the device
        if labels is not None and labels.shape != shape[:2]:
            raise TrainingError(f"labels {labels.shape} must be {shape[:2]}, as the activations")
        if labels is not None and np.any((labels != -100) & ((labels < 0) | (labels >= self.manifest.vocab_size))):
            raise TrainingError(f"labels outside the vocabulary [0, {self.manifest.vocab_size})")

    def train_step(self, tensors: Mapping[str, np.ndarray], cut_layer: int | None = None) -> StepOutcome:
        if self.u_shaped:  # the first half (lower activations) or the second (with the upper gradient)
            if "activation_grads" not in tensors:
                upper = self.tail.middle_forward(tensors["activations"], tensors["attention_mask"])
                return StepOutcome(float("nan"), None, activations=upper)
            grads = self.tail.middle_step(
                tensors["activations"],
                tensors["attention_mask"],
                tensors["activation_grads"],
                not self.manifest.frozen_head,
            )
            return StepOutcome(float("nan"), grads)
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
        if self.u_shaped:  # the shell never batches a U-shaped step; this keeps it so (one at a time instead)
            raise TrainingError("a U-shaped step is not batched")
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
        if self.top_tail is not None:
            top_names = set(self.top_tail.adapters)
            self.top_tail.set_lora({k: v for k, v in self.global_adapters.items() if k in top_names})
            whole = _MiddleThenTop(self.tail, self.top_tail)
            return eval_loss(self.head, whole, self.eval_set, self.global_adapters, self.eval_batches)
        return eval_loss(self.head, self.tail, self.eval_set, self.global_adapters, self.eval_batches)

    def tail_state(self) -> TailState:
        return self.tail.state_dict()

    def load_tail_state(self, state: TailState) -> None:
        self.tail.load_state_dict(state)


class _MiddleThenTop:
    """The rest of the model after the head, for a U-shaped run's evaluation: the middle, then the top."""

    def __init__(self, middle: Tail, top: Tail) -> None:
        self.middle, self.top = middle, top

    def eval_loss(
        self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, from_layer: int | None = None
    ) -> tuple[float, int]:
        upper = self.middle.middle_forward(activations, attention_mask)
        return self.top.eval_loss(upper, attention_mask, labels)
