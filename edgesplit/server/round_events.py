"""The round engine's vocabulary: its rules, the events it takes and the actions it returns (rounds.py).

All small frozen dataclasses, validated on construction where a field can be wrong. No I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

CLOSE_POLICY = 1008  # websocket close code: policy violation (bad token, wrong artifacts, bad tensor)
CLOSE_PROTOCOL_ERROR = 1002  # websocket close code: the peer broke the protocol (a replay, a step out of range)

DROPPED_NOTE = ", its update for this round dropped"
ConnectionId = int  # the shell numbers its connections; a reconnecting client gets a new number


class Phase(Enum):
    GATHERING = "gathering"  # fewer than min_clients have joined yet; nobody is welcomed
    TRAINING = "training"  # steps and updates for the open round
    CLOSING = "closing"  # the round is being aggregated and saved; new updates for it are stale
    FINISHED = "finished"  # the last round closed, or a round could not close


@dataclass(frozen=True)
class RoundRules:
    total_rounds: int
    min_clients: int
    steps_per_round: int
    round_deadline_s: float
    manifest_hash: str
    protocol_version: int
    checkpointing: bool  # with a checkpoint directory, a round is saved before it counts as closed

    def __post_init__(self) -> None:
        if self.total_rounds < 1 or self.min_clients < 1 or self.steps_per_round < 1:
            raise ValueError("rounds, min_clients and steps_per_round must be at least 1")
        if not self.round_deadline_s > 0:
            raise ValueError(f"the round deadline must be positive, got {self.round_deadline_s}")


@dataclass(frozen=True, eq=False)
class Update:
    """A client's contribution to a round. `tensors` is opaque here: the strategy checked and will use it."""

    client_id: str
    num_samples: int
    metrics: Mapping[str, float]
    tensors: Mapping[str, Any]

    def __post_init__(self) -> None:
        if self.num_samples < 0:
            raise ValueError(f"an update's num_samples cannot be negative, got {self.num_samples}")


# ------------------------------------------------------------------------------------------------ events


@dataclass(frozen=True)
class ClientHello:
    connection: ConnectionId
    client_id: str
    num_samples: int
    token_ok: bool  # the shell checks the token (constant time); the engine decides what follows
    manifest_hash: str
    protocol_version: int
    now: float


@dataclass(frozen=True)
class StepArrived:
    """Activations that passed the strategy's checks."""

    connection: ConnectionId
    round: int
    step: int


class StepEnd(Enum):
    TAKEN = "taken"  # the tail learnt from it
    SKIPPED = "skipped"  # its client was gone when its turn came
    FAILED = "failed"  # it raised; the shell ends that connection


@dataclass(frozen=True)
class StepDone:
    """The worker's answer to RunStep."""

    connection: ConnectionId
    round: int
    step: int
    end: StepEnd

    def __post_init__(self) -> None:
        if not isinstance(self.end, StepEnd):
            raise ValueError(f"a step ends taken, skipped or failed, not {self.end!r}")


@dataclass(frozen=True)
class UpdateArrived:
    connection: ConnectionId
    round: int
    update: Update
    problem: str | None = None  # what the strategy found wrong with its tensors, if anything


@dataclass(frozen=True)
class ClientLeft:
    connection: ConnectionId


@dataclass(frozen=True)
class TokensRevoked:
    client_ids: frozenset[str]


@dataclass(frozen=True)
class DeadlineTick:
    now: float


@dataclass(frozen=True)
class Aggregated:
    round: int
    eval_loss: float | None
    now: float


@dataclass(frozen=True)
class RoundSaved:
    round: int
    now: float


@dataclass(frozen=True)
class RoundFailed:
    round: int
    reason: str
    details: str = ""  # a traceback, for the log


Event = (
    ClientHello
    | StepArrived
    | StepDone
    | UpdateArrived
    | ClientLeft
    | TokensRevoked
    | DeadlineTick
    | Aggregated
    | RoundSaved
    | RoundFailed
)

# ------------------------------------------------------------------------------------------------ actions


@dataclass(frozen=True)
class Refuse:
    """Answer this connection's own message with an Error, then close it."""

    connection: ConnectionId
    code: str
    reason: str
    close_code: int = CLOSE_POLICY


@dataclass(frozen=True)
class Disconnect:
    """Close another connection (replaced by a newer one, or revoked) from outside its conversation."""

    connection: ConnectionId
    code: str
    reason: str
    close_code: int = CLOSE_POLICY


@dataclass(frozen=True)
class SendWelcome:
    connection: ConnectionId
    round: int
    resume_step: int  # how many of this round's steps the server has taken from this client
    update_received: bool


@dataclass(frozen=True)
class RunStep:
    connection: ConnectionId
    client_id: str
    round: int
    step: int


@dataclass(frozen=True)
class SendGradients:
    connection: ConnectionId
    round: int
    step: int


@dataclass(frozen=True)
class DropStep:
    """The step was not run: its connection is gone. The shell ends that connection's conversation."""

    connection: ConnectionId
    round: int
    step: int


@dataclass(frozen=True)
class Aggregate:
    round: int
    updates: tuple[Update, ...]


@dataclass(frozen=True)
class SaveCheckpoint:
    round: int
    eval_loss: float | None
    updates: tuple[Update, ...]


@dataclass(frozen=True)
class RoundClosed:
    round: int
    updates: tuple[Update, ...]
    eval_loss: float | None
    seconds: float  # from the round's start to its aggregation


@dataclass(frozen=True)
class SendRoundResult:
    connection: ConnectionId
    update_round: int
    next_round: int
    done: bool
    eval_loss: float | None


@dataclass(frozen=True)
class Finish:
    failure: str | None


@dataclass(frozen=True)
class Log:
    text: str


@dataclass(frozen=True)
class Metric:
    kind: str
    fields: Mapping[str, Any]


Action = (
    Refuse
    | Disconnect
    | SendWelcome
    | RunStep
    | SendGradients
    | DropStep
    | Aggregate
    | SaveCheckpoint
    | RoundClosed
    | SendRoundResult
    | Finish
    | Log
    | Metric
)
