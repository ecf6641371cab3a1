"""What the server tells a client in its Welcome: the session's settings, one typed and validated record.

The record travels as a JSON object inside the Welcome's metadata. It is checked the way every other field
of a message is: on construction, so a server cannot send a bad one and a client cannot accept one. Unknown
keys are refused rather than ignored: a peer that sends a setting this side does not know is running
another version, and silently training with half of its settings would be worse than stopping.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgesplit.client.tensors import Wire, is_int, is_number
from edgesplit.errors import ProtocolError

# The one list of frameworks both sides know. A framework is a server strategy plus a client trainer
# (edgesplit/client/trainers.py); naming it here is what lets a Welcome carry it.
FRAMEWORKS = ("split", "fedllm", "kd")

# How one training step crosses the network, by plan: the stages its Activations and Gradients name, in
# the order of protocol.TRANSITIONS. "split": the device runs the first layers, the server the rest (one
# exchange). "u_shaped": the device runs the first AND the last layers, so the labels never leave it; the
# server runs the middle (activations up at the lower cut, down at the upper cut, gradients back the same
# way: two exchanges a step).
EXCHANGES: dict[str, tuple[str, ...]] = {
    "split": ("split",),
    "u_shaped": ("lower", "upper"),
}

_KD_FIELDS = ("top_k", "temperature", "client_distill_epochs")


def _problem(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(f"Welcome settings: {message}")


@dataclass(frozen=True)
class SessionSettings:
    """The session as the server runs it. Both sides hold it after the Welcome (`Session.settings`)."""

    steps_per_round: int
    learning_rate: float
    wire: Wire  # how the step's float tensors travel
    batch_size: int  # the export's; the head is traced for it
    max_seq_len: int
    framework: str = "split"
    weight_decay: float = 0.0
    frozen_head: bool = False  # True: Gradients carry no activation_grads
    seed: int = 0  # the run's; each client adds its own for its data order
    exchange: str = "split"  # a key of EXCHANGES
    # Where this client stands, for a reconnection: the steps of the current round the server has taken
    # from it, and whether it already has its update for the round.
    resume_step: int = 0
    update_received: bool = False
    # KD-FedLLM only (None for the other frameworks): top-k of the uploaded distributions, the distillation
    # temperature, and the client's epochs of distillation on the proxy set per round.
    top_k: int | None = None
    temperature: float | None = None
    client_distill_epochs: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps_per_round", "batch_size", "max_seq_len", "seed", "resume_step"):
            _problem(is_int(getattr(self, name)), f"{name} must be an integer, got {getattr(self, name)!r:.40}")
        for name in ("steps_per_round", "batch_size", "max_seq_len"):
            _problem(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        _problem(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _problem(
            0 <= self.resume_step <= self.steps_per_round,
            f"resume_step must be in [0, steps_per_round = {self.steps_per_round}], got {self.resume_step}",
        )
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            _problem(
                is_number(value) and math.isfinite(value) and value >= 0,
                f"{name} must be a finite number >= 0, got {value!r:.40}",
            )
        for name in ("frozen_head", "update_received"):
            _problem(isinstance(getattr(self, name), bool), f"{name} must be true or false")
        _problem(isinstance(self.wire, Wire), f"wire must be one of {[wire.value for wire in Wire]}")
        _problem(
            self.framework in FRAMEWORKS, f"unknown framework {self.framework!r:.40}: this side knows {FRAMEWORKS}"
        )
        _problem(
            self.exchange in EXCHANGES, f"unknown exchange {self.exchange!r:.40}: this side knows {sorted(EXCHANGES)}"
        )
        given = [name for name in _KD_FIELDS if getattr(self, name) is not None]
        if self.framework != "kd":
            _problem(not given, f"{given} are KD-FedLLM settings, the session runs {self.framework}")
            return
        _problem(len(given) == len(_KD_FIELDS), f"KD-FedLLM needs {list(_KD_FIELDS)}, got {given}")
        _problem(is_int(self.top_k) and self.top_k >= 1, f"top_k must be an integer >= 1, got {self.top_k!r:.40}")
        _problem(
            is_int(self.client_distill_epochs) and self.client_distill_epochs >= 0,
            f"client_distill_epochs must be an integer >= 0, got {self.client_distill_epochs!r:.40}",
        )
        _problem(
            is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature must be a finite number > 0, got {self.temperature!r:.40}",
        )

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages a step of this session's exchange names."""
        return EXCHANGES[self.exchange]

    @staticmethod
    def from_mapping(values: Mapping[str, object]) -> SessionSettings:
        """The record from a plain mapping: the server's own settings, or the JSON object of a Welcome.

        Raises ProtocolError, and nothing else, for anything that is not a valid record."""
        if not isinstance(values, Mapping):
            raise ProtocolError(f"Welcome settings must be a JSON object, got {type(values).__name__}")
        known = {field.name: field for field in dataclasses.fields(SessionSettings)}
        unknown = sorted(str(key)[:40] for key in values if key not in known)
        _problem(not unknown, f"unknown keys {unknown}: is the server running another edgesplit version?")
        required = [
            name for name, field in known.items() if field.default is dataclasses.MISSING and name not in values
        ]
        _problem(not required, f"missing {required}")
        arguments: dict[str, Any] = dict(values)
        wire = arguments["wire"]
        wires = {member.value: member for member in Wire}
        if not isinstance(wire, Wire):
            _problem(isinstance(wire, str) and wire in wires, f"wire must be one of {sorted(wires)}, got {wire!r:.40}")
            arguments["wire"] = wires[wire]
        for name in ("learning_rate", "weight_decay", "temperature"):
            value = arguments.get(name)
            if is_int(value):  # JSON writes 1.0 as 1
                _problem(
                    abs(value) < 2**1000, f"{name} must be a finite number, got a {value.bit_length()}-bit integer"
                )
                arguments[name] = float(value)
        return SessionSettings(**arguments)

    def to_json(self) -> dict[str, object]:
        """The JSON object a Welcome carries; from_mapping reads it back to an equal record."""
        values = dataclasses.asdict(self)
        values["wire"] = self.wire.value
        return values
