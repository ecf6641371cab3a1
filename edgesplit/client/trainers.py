"""One trainer per framework on the device, behind one interface; the client picks one by the Welcome's name.

A trainer owns the client adapters and their optimiser and says what a framework does on the device: how it
starts from the Welcome, what one step does, what goes up at the end of a round and how it takes the
round's result. The client (client.py) keeps the transport: connecting, retries, resuming, metrics. It
never compares framework names; adding a framework is adding a trainer here and naming it in TRAINERS
(and a strategy on the server). numpy and ONNX Runtime only, like the rest of the client.

    split   head forward on the device, tail on the server: one exchange a step (Activations -> Gradients);
            U-shaped (the Welcome's exchange "u_shaped"): the device runs the top and the loss too, two
            exchanges a step, and the labels never leave it
    fedllm  the whole model on the device; the round uploads its adapters for FedAvg
    kd      the whole model on the device; the round uploads top-k probabilities on a shared proxy set,
            and the device distils towards the clients' consensus
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar

import numpy as np

from edgesplit.client.data import Batch, EncodedSet, fit_to_bucket
from edgesplit.client.defences import ActivationDefence
from edgesplit.client.head import ForwardResult, Head
from edgesplit.client.int4k import zero_padding
from edgesplit.client.local import LocalTrainer, distil_on_proxy, proxy_top_k
from edgesplit.client.optim import AdamW
from edgesplit.client.protocol import Activations, Gradients, Message, RoundResult, SessionSettings, Wire
from edgesplit.client.top import Top
from edgesplit.errors import EdgesplitError, ProtocolError, TrainingError

Arrays = dict[str, np.ndarray]
Result = TypeVar("Result")


class Runtime(Protocol):
    """What the client lends a trainer while a session is open: its compute, its clock, and the link."""

    async def compute(self, phase: str, function: Callable[..., Result], *args: object) -> Result:
        """Run blocking work off the event loop, timed and memory-sampled as `phase`."""
        ...

    async def offload(self, function: Callable[..., Result], *args: object) -> Result:
        """Run blocking work off the event loop, counted in no step's phases."""
        ...

    def phase(self, name: str) -> AbstractContextManager[None]:
        """Time a phase that runs on the event loop itself."""
        ...

    async def exchange(self, message: Message) -> Message:
        """Send one message of this session and wait for the server's answer."""
        ...


@dataclass(frozen=True)
class StepResult:
    """One step's outcome, as the client reports it."""

    loss: float
    # Split training only: the time the step spent with the server (from its Gradients) and the time spent
    # waiting for them. None for a step that never left the device.
    server_seconds: float | None = None
    wait_seconds: float | None = None
    # What the server's time was: waiting for its shared tail, and the tail's compute (None from a server
    # that does not say).
    server_queue_seconds: float | None = None
    server_compute_seconds: float | None = None
    # The tokens the head computed, padding included: B x the length the batch was cut to. None: the batch's
    # full shape.
    computed_tokens: int | None = None

    def __post_init__(self) -> None:
        if (self.server_seconds is None) != (self.wait_seconds is None):
            raise ValueError("a step that talked to the server has both server_seconds and wait_seconds")


class Trainer(ABC):
    """One framework's training on the device. Built from the run's first Welcome."""

    framework: ClassVar[str]

    def __init__(self, head: Head, adapters: Arrays, settings: SessionSettings) -> None:
        self.head = head
        self.adapters = adapters  # updated in place: the optimiser holds references to these arrays
        self.settings = settings

    @abstractmethod
    def take_welcome(self, tensors: Arrays, new_round: bool) -> None:
        """Take a Welcome's tensors: on the first of the run, and on every one after a reconnection;
        `new_round` says whether the server has moved to a round this process has not trained in."""

    @abstractmethod
    async def step(self, batch: Batch, round_index: int, step: int, runtime: Runtime) -> StepResult:
        """Train on one batch."""

    async def upload(self, runtime: Runtime) -> Arrays:
        """What the round's AdapterUpdate carries. By default the adapters, for the server to average."""
        return self.adapters

    async def take_result(self, result: RoundResult, runtime: Runtime) -> None:
        """Take a round's result. By default the new global adapters."""
        self.set_adapters(result.tensors)

    def set_adapters(self, tensors: Arrays) -> None:
        """Take new global adapters in place: the optimiser holds references to these arrays."""
        self.head.check_adapters(tensors)
        for name, value in tensors.items():
            self.adapters[name][...] = value


class SplitTrainer(Trainer):
    """Split learning: the device runs the head, the server the tail and the loss."""

    framework = "split"
    defence: ActivationDefence | None = None  # the client's --activation-noise: applied to what goes up

    def __init__(self, head: Head, adapters: Arrays, settings: SessionSettings) -> None:
        if head.manifest.full_model:
            raise EdgesplitError("the server runs split training, these artifacts are a --full-model export")
        super().__init__(head, adapters, settings)
        self.optimizer = AdamW(adapters, lr=settings.learning_rate, weight_decay=settings.weight_decay)

    def take_welcome(self, tensors: Arrays, new_round: bool) -> None:
        if new_round:  # within its own round this process keeps its adapters
            self.set_adapters(tensors)

    def unpadded(self, tensor: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Under int4k, `tensor` (B, T, H) with its padding rows zeroed: the wire leaves zero rows out. Exact:
        the model masks padding positions, so they reach no loss and no real position's gradient."""
        return zero_padding(tensor, attention_mask) if self.settings.wire is Wire.INT4K else tensor

    async def _head_backward(
        self, forward: ForwardResult, attention_mask: np.ndarray, gradients: Gradients, runtime: Runtime
    ) -> None:
        """The head's LoRA step from the gradient that came down at the (lower) cut: none for a frozen head."""
        if not self.head.trainable:
            return
        activation_grads = gradients.tensors.get("activation_grads")
        if activation_grads is None:
            raise ProtocolError("the server sent no activation_grads, and this head is trainable")
        activation_grads = self.unpadded(activation_grads, attention_mask)
        if self.defence is not None:  # the gradient at what went up, taken back through the clip
            activation_grads = self.defence.backward(forward.activations, activation_grads)
        grads = await runtime.compute("grad_graph", self.head.backward, forward, activation_grads)
        with runtime.phase("optimizer"):
            self.optimizer.step(grads)

    async def step(self, batch: Batch, round_index: int, step: int, runtime: Runtime) -> StepResult:
        # input_ids (B, T) -> head -> activations (B, T, H) up; activation_grads (B, T, H) down. T is the
        # shortest of the export's sequence lengths that holds the batch (a dynamic-length head: the longest
        # row itself): no compute on the padding past it.
        batch = fit_to_bucket(batch, self.head.manifest.seq_lengths)
        forward = await runtime.compute(
            "head_forward", self.head.forward, batch.input_ids, batch.attention_mask, self.adapters
        )
        with runtime.phase("encode"):
            uploaded = forward.activations if self.defence is None else self.defence.apply(forward.activations)
            uploaded = self.unpadded(uploaded, batch.attention_mask)
            message = Activations(
                round_index,
                step,
                {"activations": uploaded, "attention_mask": batch.attention_mask, "labels": batch.labels},
            )
        waited = time.perf_counter()
        gradients = await runtime.exchange(message)
        waited = time.perf_counter() - waited
        if not isinstance(gradients, Gradients):  # the session's table allows nothing else here
            raise ProtocolError(f"expected Gradients, the server sent {gradients.kind.name}")
        await self._head_backward(forward, batch.attention_mask, gradients, runtime)
        return StepResult(
            gradients.loss,
            server_seconds=gradients.server_seconds,
            wait_seconds=waited,
            server_queue_seconds=gradients.queue_seconds,
            server_compute_seconds=gradients.compute_seconds,
            computed_tokens=int(batch.input_ids.size),
        )


class UShapedTrainer(SplitTrainer):
    """The U-shaped split: the device runs the head and the top (the last layers, the norm, the LM head, the
    loss); the server runs the middle. Per step, Activations "lower" (no labels) up, the middle's output
    down, its gradient up (Gradients "upper", with the device's loss), the lower cut's gradient down. The
    head's and the top's adapters are one set of device adapters, averaged together each round; each part
    has its own numpy AdamW (AdamW is per matrix: the same as one optimiser over both)."""

    def __init__(self, head: Head, adapters: Arrays, settings: SessionSettings, top: Top) -> None:
        super().__init__(head, {name: adapters[name] for name in head.manifest.lora.matrices}, settings)
        self.adapters = adapters  # the head's and the top's: what goes up at the round's end
        self.top = top
        top_adapters = {name: adapters[name] for name in top.manifest.top_matrices}
        self.top_optimizer = (  # a top of no layer (--top-layers 0: the norm, the LM head) has nothing to train
            AdamW(top_adapters, lr=settings.learning_rate, weight_decay=settings.weight_decay) if top_adapters else None
        )

    def set_adapters(self, tensors: Arrays) -> None:
        expected = {**self.head.manifest.lora.matrices, **self.top.manifest.top_matrices}
        if set(tensors) != set(expected):
            got, wanted = sorted(tensors)[:6], sorted(expected)[:6]
            raise ProtocolError(f"the server's adapters are {got}, this device's {wanted}")
        for name, shape in self.top.manifest.top_matrices.items():
            if tuple(tensors[name].shape) != tuple(shape) or not np.all(np.isfinite(tensors[name])):
                raise ProtocolError(f"the server's adapter {name} is not finite of shape {tuple(shape)}")
        super().set_adapters(tensors)

    async def step(self, batch: Batch, round_index: int, step: int, runtime: Runtime) -> StepResult:
        # input_ids -> head -> lower activations up; the middle's output down -> top -> loss; its gradient up;
        # the lower gradient down -> head backward. The labels are used here, on the device, only.
        forward = await runtime.compute(
            "head_forward", self.head.forward, batch.input_ids, batch.attention_mask, self.adapters
        )
        with runtime.phase("encode"):
            uploaded = forward.activations if self.defence is None else self.defence.apply(forward.activations)
            uploaded = self.unpadded(uploaded, batch.attention_mask)
            lower = Activations(
                round_index, step, {"activations": uploaded, "attention_mask": batch.attention_mask}, "lower"
            )
        waited = time.perf_counter()
        upper = await runtime.exchange(lower)
        waited = time.perf_counter() - waited
        if not isinstance(upper, Activations):  # the session's table allows nothing else here
            raise ProtocolError(f"expected the middle's Activations, the server sent {upper.kind.name}")
        started = time.perf_counter()
        top = await runtime.compute(
            "top", self.top.step, upper.tensors["activations"], batch.attention_mask, batch.labels, self.adapters
        )
        if not np.isfinite(top.loss):
            raise TrainingError(f"the device's loss is {top.loss}: this batch has no target token or diverged")
        with runtime.phase("optimizer"):
            if self.top_optimizer is not None:
                self.top_optimizer.step(top.grads)
        with runtime.phase("encode"):
            up = Gradients(
                round_index,
                step,
                top.loss,
                time.perf_counter() - started,
                {"activation_grads": self.unpadded(top.activation_grads, batch.attention_mask)},
                "upper",
            )
        second = time.perf_counter()
        gradients = await runtime.exchange(up)
        waited += time.perf_counter() - second
        if not isinstance(gradients, Gradients):
            raise ProtocolError(f"expected Gradients, the server sent {gradients.kind.name}")
        await self._head_backward(forward, batch.attention_mask, gradients, runtime)
        return StepResult(
            top.loss,
            server_seconds=gradients.server_seconds,
            wait_seconds=waited,
            server_queue_seconds=gradients.queue_seconds,
            server_compute_seconds=gradients.compute_seconds,
        )


class _OnDeviceTrainer(Trainer):
    """The whole model on the device (a --full-model export): each step is local, nothing travels."""

    def __init__(self, head: Head, adapters: Arrays, settings: SessionSettings) -> None:
        super().__init__(head, adapters, settings)
        self.local = LocalTrainer(head, adapters, settings.learning_rate, settings.weight_decay)

    async def step(self, batch: Batch, round_index: int, step: int, runtime: Runtime) -> StepResult:
        return StepResult(await runtime.compute("local_step", self.local.cross_entropy_step, batch))


class FedLlmTrainer(_OnDeviceTrainer):
    """FedLLM: the whole model trains on the device; the server averages the adapters (FedAvg)."""

    framework = "fedllm"

    def take_welcome(self, tensors: Arrays, new_round: bool) -> None:
        if new_round:
            self.set_adapters(tensors)


class KdTrainer(_OnDeviceTrainer):
    """KD-FedLLM: trains like FedLLM, but uploads its top-k probabilities on the shared proxy set and
    distils towards the clients' averaged ones. No weights ever travel, in either direction."""

    framework = "kd"

    def __init__(self, head: Head, adapters: Arrays, settings: SessionSettings) -> None:
        super().__init__(head, adapters, settings)
        self.proxy: EncodedSet | None = None

    def take_welcome(self, tensors: Arrays, new_round: bool) -> None:
        # KD's Welcome carries the shared proxy set, as tokens, instead of adapters; its labels (a labelled
        # proxy: -100 on the prompt) say where to distil, on the completions.
        ids, mask = tensors.get("proxy.input_ids"), tensors.get("proxy.attention_mask")
        if ids is None or mask is None or ids.shape != mask.shape or ids.ndim != 2:
            raise ProtocolError("a KD-FedLLM Welcome carries proxy.input_ids and proxy.attention_mask (N, T)")
        labels = tensors.get("proxy.labels")
        if labels is not None and labels.shape != ids.shape:
            raise ProtocolError(f"the Welcome's proxy.labels are {labels.shape}, its proxy.input_ids {ids.shape}")
        targets = np.full_like(ids, -100) if labels is None else labels.astype(np.int64)
        self.proxy = EncodedSet(ids, mask, targets, 0, 0)

    def _proxy(self) -> EncodedSet:
        if self.proxy is None:
            raise EdgesplitError("KD-FedLLM needs the proxy set from the server's Welcome first")
        return self.proxy

    async def upload(self, runtime: Runtime) -> Arrays:
        assert self.settings.top_k is not None  # SessionSettings requires it for kd
        with runtime.phase("proxy_logits"):
            values, indices = await runtime.offload(
                proxy_top_k, self.head, self.adapters, self._proxy(), self.settings.top_k
            )
        return {"proxy_values": values, "proxy_indices": indices}

    async def take_result(self, result: RoundResult, runtime: Runtime) -> None:
        if result.done:
            return
        values, indices = result.tensors.get("proxy_values"), result.tensors.get("proxy_indices")
        if values is None or indices is None:
            raise ProtocolError("a KD-FedLLM RoundResult carries proxy_values and proxy_indices")
        assert self.settings.temperature is not None and self.settings.client_distill_epochs is not None
        await runtime.offload(
            distil_on_proxy,
            self.local,
            self._proxy(),
            values,
            indices,
            self.settings.temperature,
            self.settings.client_distill_epochs,
        )


TRAINERS: dict[str, type[Trainer]] = {
    trainer.framework: trainer for trainer in (SplitTrainer, FedLlmTrainer, KdTrainer)
}


def trainer_for(head: Head, adapters: Arrays, settings: SessionSettings, top: Top | None = None) -> Trainer:
    """The trainer for the framework the Welcome names (the U-shaped one for its exchange "u_shaped")."""
    trainer = TRAINERS.get(settings.framework)
    if trainer is None:  # SessionSettings knows a framework this client has no trainer for
        raise EdgesplitError(f"this client cannot train {settings.framework!r}: it knows {sorted(TRAINERS)}")
    u_shaped = settings.exchange == "u_shaped"
    if u_shaped != (top is not None):
        raise EdgesplitError(
            "the server runs a U-shaped split (the device computes the loss), these artifacts are a plain split "
            "export: copy the server's export to this device"
            if u_shaped
            else "the server runs a plain split, these artifacts are a U-shaped export (--top-layers): copy the "
            "server's export to this device"
        )
    if top is not None:
        return UShapedTrainer(head, adapters, settings, top)
    return trainer(head, adapters, settings)
