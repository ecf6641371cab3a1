"""The round engine: the server's rules, with no I/O. Events in, actions out (as the protocol's Session).

The asyncio shell (server.py) turns frames, worker results and timers into events, feeds them to
`RoundEngine.handle`, and carries out the actions it gets back in order: send, close, submit to the tail
worker, save. Nothing here touches a socket, a thread, a clock or torch; the time comes in the events.

    phase       GATHERING --(min clients joined)--> TRAINING --(quorum)--> CLOSING --(saved)--> TRAINING
                                                                                 \\--(last round)--> FINISHED
    admission   token check result, manifest hash, protocol version, not finished; the newest connection of a
                client wins and the older one is disconnected
    barrier     no Welcome before `min_clients` have joined; a Welcome waits, too, for a step of the same
                client's older connection still on the worker, so that `resume_step` counts it
    steps       each (round, step) of a client at most once and in order: a replay would train the tail twice
    updates     at most one per client and round (the first stands); one for a closed or closing round is stale
    quorum      a round closes when every member has sent its update (and at least `min_clients` have), or
                at the deadline with at least `min_clients` updates
    close       Aggregate -> Aggregated -> SaveCheckpoint -> RoundSaved -> RoundClosed, results, next round:
                saved before any client hears of the round, so a result a client has seen survives a restart
    revocation  a revoked client is disconnected and its update for the open round is dropped

Where a rule depends on the phase, `TRANSITIONS` (one table) says which handler takes the event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgesplit.server.round_events import (
    CLOSE_PROTOCOL_ERROR,
    DROPPED_NOTE,
    Action,
    Aggregate,
    Aggregated,
    ClientHello,
    ClientLeft,
    ConnectionId,
    DeadlineTick,
    Disconnect,
    DropStep,
    Event,
    Finish,
    Log,
    Metric,
    Phase,
    Refuse,
    RoundClosed,
    RoundFailed,
    RoundRules,
    RoundSaved,
    RunStep,
    SaveCheckpoint,
    SendGradients,
    SendRoundResult,
    SendWelcome,
    StepArrived,
    StepDone,
    StepEnd,
    TokensRevoked,
    Update,
    UpdateArrived,
)

# A client's own metrics go into its update record under names it chose: a bounded number, cut short.
MAX_CLIENT_METRICS = 32
MAX_METRIC_NAME_CHARS = 64

# ------------------------------------------------------------------------------------------------ state


@dataclass
class RoundState:
    """Everything the rules remember, in one place."""

    round: int = 0  # the open round, counted from 0; equals total_rounds once finished
    phase: Phase = Phase.GATHERING
    round_started_at: float = 0.0
    last_eval_loss: float | None = None
    failure: str | None = None
    members: dict[str, ConnectionId] = field(default_factory=dict)  # client_id -> its current connection
    num_samples: dict[str, int] = field(default_factory=dict)  # client_id -> as its Hello said
    clients: dict[ConnectionId, str] = field(default_factory=dict)  # every admitted connection still open
    awaiting_welcome: dict[ConnectionId, str] = field(default_factory=dict)
    awaiting_result: dict[ConnectionId, int] = field(default_factory=dict)  # -> the round its update was for
    steps_taken: dict[str, tuple[int, int]] = field(default_factory=dict)  # client_id -> (round, steps taken)
    steps_running: dict[str, ConnectionId] = field(default_factory=dict)  # client_id -> whose step is on the worker
    updates: dict[str, Update] = field(default_factory=dict)  # the open round's, by client_id
    closing: tuple[Update, ...] = ()  # the updates being aggregated
    aggregated_at: float = 0.0


class RoundEngine:
    def __init__(self, rules: RoundRules, round: int = 0, last_eval_loss: float | None = None) -> None:
        """`round`, `last_eval_loss`: where a checkpoint left off (0 and None for a fresh run)."""
        if round < 0:
            raise ValueError(f"the round to resume from cannot be negative, got {round}")
        self.rules = rules
        self.state = RoundState(round=round, last_eval_loss=last_eval_loss)
        if round >= rules.total_rounds:
            self.state.phase = Phase.FINISHED

    # -------------------------------------------------------------------------------------------- queries

    @property
    def finished(self) -> bool:
        return self.state.phase is Phase.FINISHED

    def is_current(self, connection: ConnectionId) -> bool:
        """Whether this connection still speaks for its client. Read from the worker thread too: one dict
        lookup, atomic under the GIL."""
        client_id = self.state.clients.get(connection)
        return client_id is not None and self.state.members.get(client_id) == connection

    def client_of(self, connection: ConnectionId) -> str:
        return self.state.clients.get(connection, "?")

    def members(self) -> list[ConnectionId]:
        return list(self.state.members.values())

    # -------------------------------------------------------------------------------------------- dispatch

    def handle(self, event: Event) -> list[Action]:
        handler = TRANSITIONS.get((self.state.phase, type(event)))
        if handler is None:
            return []  # an event that means nothing in this phase (a deadline before the start, say)
        return handler(self, event)

    # -------------------------------------------------------------------------------------------- admission

    def _admit(self, hello: ClientHello) -> list[Action]:
        state, rules = self.state, self.rules
        if not hello.token_ok:
            return self._refuse_admission(
                hello, "bad_token", f"client {hello.client_id!r}: unknown client or wrong token"
            )
        if hello.manifest_hash != rules.manifest_hash:
            reason = (
                f"the client runs artifacts {hello.manifest_hash}, the server {rules.manifest_hash}: "
                "copy the server's artifact directory to the client"
            )
            return self._refuse_admission(hello, "manifest_mismatch", reason)
        if hello.protocol_version != rules.protocol_version:
            reason = f"protocol {hello.protocol_version}, server {rules.protocol_version}"
            return self._refuse_admission(hello, "protocol_version", reason)
        actions: list[Action] = []
        old = state.members.get(hello.client_id)
        if old is not None:
            # The same client (it passed the token check) is back: its old connection is dead or dying,
            # even if TCP has not said so yet. The newest wins; the old one is told why and closed.
            self._forget_waits(old)
            reason = "this client connected again; this older connection is closed"
            actions.append(Disconnect(old, "replaced", reason))
            actions.append(Log(f"{hello.client_id} reconnected; its new connection replaces the old one"))
            actions.append(Metric("replace", {"client_id": hello.client_id, "round": state.round}))
        state.members[hello.client_id] = hello.connection
        state.num_samples[hello.client_id] = hello.num_samples
        state.clients[hello.connection] = hello.client_id
        state.awaiting_welcome[hello.connection] = hello.client_id
        actions.append(
            Log(
                f"{hello.client_id} joined at round {state.round + 1} ({hello.num_samples} samples); "
                f"{len(state.members)} connected"
            )
        )
        actions.append(
            Metric("join", {"client_id": hello.client_id, "round": state.round, "num_samples": hello.num_samples})
        )
        if state.phase is Phase.GATHERING and len(state.members) >= rules.min_clients:
            state.phase = Phase.TRAINING
            state.round_started_at = hello.now
        return actions + self._welcome_ready()

    def _refuse_finished(self, hello: ClientHello) -> list[Action]:
        reason = self.state.failure or f"training finished after {self.state.round} rounds"
        return self._refuse_admission(hello, "finished", reason)

    def _refuse_admission(self, hello: ClientHello, code: str, reason: str) -> list[Action]:
        return [
            Log(f"{hello.client_id}: refused: {reason}"),
            Metric("refused", {"client_id": hello.client_id, "code": code, "reason": reason}),
            Refuse(hello.connection, code, reason),
        ]

    def _welcome_ready(self) -> list[Action]:
        """Welcome whoever waits for it, once the barrier is passed and no older step of theirs is running."""
        state = self.state
        if state.phase is Phase.GATHERING:
            return []
        actions: list[Action] = []
        for connection, client_id in list(state.awaiting_welcome.items()):
            if client_id in state.steps_running:
                continue  # its old connection's step may still count: wait for StepDone
            del state.awaiting_welcome[connection]
            actions.append(
                SendWelcome(connection, state.round, self._resume_step(client_id), client_id in state.updates)
            )
        return actions

    def _resume_step(self, client_id: str) -> int:
        taken_round, taken = self.state.steps_taken.get(client_id, (-1, 0))
        return taken if taken_round == self.state.round else 0

    # -------------------------------------------------------------------------------------------- steps

    def _step(self, event: StepArrived) -> list[Action]:
        state, client_id = self.state, self.client_of(event.connection)
        if event.round > state.round:
            reason = (
                f"Activations for round {event.round + 1}, which has not started "
                f"(the server is at round {state.round + 1})"
            )
            return self._protocol_error(event.connection, reason)
        if event.step >= self.rules.steps_per_round:
            return self._protocol_error(
                event.connection, f"step {event.step} of a round of {self.rules.steps_per_round} steps"
            )
        taken_round, taken = state.steps_taken.get(client_id, (-1, 0))
        if (event.round, event.step) < (taken_round, taken):
            reason = (
                f"round {event.round + 1} step {event.step + 1} again: the server has "
                f"taken this client's steps up to round {taken_round + 1} step {taken}"
            )
            return self._protocol_error(event.connection, reason)
        state.steps_running[client_id] = event.connection
        return [RunStep(event.connection, client_id, event.round, event.step)]

    def _step_done(self, event: StepDone) -> list[Action]:
        state = self.state
        running = [client_id for client_id, owner in state.steps_running.items() if owner == event.connection]
        client_id = running[0] if running else self.client_of(event.connection)
        state.steps_running.pop(client_id, None)
        actions: list[Action] = []
        if event.end is StepEnd.TAKEN:
            # The tail has learnt from it, so a reconnecting client must not send it again.
            state.steps_taken[client_id] = (event.round, event.step + 1)
            actions.append(SendGradients(event.connection, event.round, event.step))
        elif event.end is StepEnd.SKIPPED:
            actions += [
                Log(
                    f"{client_id}: dropped its queued step (round {event.round + 1} step "
                    f"{event.step + 1}): the client is gone"
                ),
                Metric("step_dropped", {"client_id": client_id, "round": event.round, "step": event.step}),
                DropStep(event.connection, event.round, event.step),
            ]
        return actions + self._welcome_ready()

    # -------------------------------------------------------------------------------------------- updates

    def _update(self, event: UpdateArrived) -> list[Action]:
        state, connection, client_id = self.state, event.connection, self.client_of(event.connection)
        if event.round > state.round:
            reason = (
                f"AdapterUpdate for round {event.round + 1}, which has not started "
                f"(the server is at round {state.round + 1})"
            )
            return self._protocol_error(connection, reason)
        if event.problem is not None:
            return [
                Log(f"{client_id}: rejected: {event.problem}"),
                Metric(
                    "refused",
                    {"client_id": client_id, "code": "bad_tensor", "reason": event.problem, "round": event.round},
                ),
                Refuse(connection, "bad_tensor", event.problem),
            ]
        if not self.is_current(connection):
            # A connection that has been replaced: the client's newer connection speaks for it.
            return [self._result_now(connection, event.round)]
        closing = state.phase is Phase.CLOSING
        if event.round < state.round or closing:
            # The round closed (or is closing) without it: a straggler, or a client that was away. It
            # catches up with the global model in the result.
            actions: list[Action] = [
                Log(
                    f"{client_id}: stale update for round {event.round + 1} dropped; the server is "
                    f"at round {state.round + 1}{' (closing)' if closing else ''}"
                ),
                Metric("stale_update", {"client_id": client_id, "round": event.round, "server_round": state.round}),
            ]
            if event.round == state.round:
                state.awaiting_result[connection] = event.round
            else:
                actions.append(self._result_now(connection, event.round))
            return actions
        state.awaiting_result[connection] = event.round
        if client_id in state.updates:
            # Once per client per round: the first update stands (a reconnected client resends its own).
            return [
                Log(f"{client_id}: second update for round {state.round + 1} ignored"),
                Metric("duplicate_update", {"client_id": client_id, "round": state.round}),
            ]
        state.updates[client_id] = event.update
        fields = {"client_id": client_id, "round": state.round, "num_samples": event.update.num_samples}
        # The client's own metrics, by names it chose: cut short, never replacing the server's own fields.
        for name, value in list(event.update.metrics.items())[:MAX_CLIENT_METRICS]:
            fields.setdefault(f"client_{name[:MAX_METRIC_NAME_CHARS]}", value)
        return [Metric("update", fields), *self._maybe_close()]

    def _result_now(self, connection: ConnectionId, update_round: int) -> SendRoundResult:
        state = self.state
        done = state.round >= self.rules.total_rounds
        return SendRoundResult(connection, update_round, state.round, done, state.last_eval_loss)

    def _protocol_error(self, connection: ConnectionId, reason: str) -> list[Action]:
        client_id = self.client_of(connection)
        return [
            Log(f"{client_id}: protocol error: {reason}"),
            Metric("refused", {"client_id": client_id, "code": "protocol", "reason": reason}),
            Refuse(connection, "protocol", reason, CLOSE_PROTOCOL_ERROR),
        ]

    # -------------------------------------------------------------------------------------------- leaving

    def _left(self, event: ClientLeft) -> list[Action]:
        state = self.state
        client_id = state.clients.pop(event.connection, None)
        self._forget_waits(event.connection)
        if client_id is None or state.members.get(client_id) != event.connection:
            return []  # refused before admission, or an older connection of a client that is back
        del state.members[client_id]
        return [
            Log(f"{client_id} left; {len(state.members)} connected"),
            Metric("leave", {"client_id": client_id, "round": state.round}),
            *self._maybe_close(),
        ]

    def _revoked(self, event: TokensRevoked) -> list[Action]:
        state, actions = self.state, list[Action]()
        for client_id in sorted(event.client_ids & set(state.members)):
            connection = state.members.pop(client_id)
            self._forget_waits(connection)
            # Its update for the open round goes too: a revoked client may be a compromised one. One already
            # being aggregated stays in that round.
            dropped = state.phase is not Phase.CLOSING and state.updates.pop(client_id, None) is not None
            actions += [
                Log(f"{client_id}: token revoked; disconnected{DROPPED_NOTE if dropped else ''}"),
                Metric("revoked", {"client_id": client_id, "round": state.round}),
                Disconnect(connection, "revoked", "this client's token was revoked"),
            ]
        return actions + self._maybe_close()

    def _forget_waits(self, connection: ConnectionId) -> None:
        self.state.awaiting_welcome.pop(connection, None)
        self.state.awaiting_result.pop(connection, None)

    # -------------------------------------------------------------------------------------------- closing

    def _deadline(self, event: DeadlineTick) -> list[Action]:
        if event.now - self.state.round_started_at > self.rules.round_deadline_s:
            return self._maybe_close(deadline_passed=True)
        return []

    def _maybe_close(self, deadline_passed: bool = False) -> list[Action]:
        state = self.state
        if state.phase is not Phase.TRAINING or not state.updates:
            return []
        waiting_for = [client_id for client_id in state.members if client_id not in state.updates]
        enough = len(state.updates) >= self.rules.min_clients
        if not enough or (waiting_for and not deadline_passed):
            return []
        state.phase = Phase.CLOSING
        state.closing = tuple(state.updates.values())
        return [Aggregate(state.round, state.closing)]

    def _aggregated(self, event: Aggregated) -> list[Action]:
        state = self.state
        if event.round != state.round:
            return []
        state.aggregated_at = event.now
        if event.eval_loss is not None:
            state.last_eval_loss = event.eval_loss
        if self.rules.checkpointing:
            return [SaveCheckpoint(state.round, state.last_eval_loss, state.closing)]
        return self._commit(event.now)

    def _saved(self, event: RoundSaved) -> list[Action]:
        return self._commit(event.now) if event.round == self.state.round else []

    def _commit(self, now: float) -> list[Action]:
        """Only now does the round count as closed. Updates that came in meanwhile were refused as stale
        (the CLOSING phase), so clearing the open round's updates loses none."""
        state = self.state
        closed_round, closed = state.round, state.closing
        seconds = round(state.aggregated_at - state.round_started_at, 3)
        state.updates, state.closing = {}, ()
        state.round += 1
        state.round_started_at = now
        done = state.round >= self.rules.total_rounds
        state.phase = Phase.FINISHED if done else Phase.TRAINING
        actions: list[Action] = [RoundClosed(closed_round, closed, state.last_eval_loss, seconds)]
        for connection, update_round in state.awaiting_result.items():
            actions.append(SendRoundResult(connection, update_round, state.round, done, state.last_eval_loss))
        state.awaiting_result.clear()
        if done:
            actions.append(Finish(None))
        return actions

    def _failed(self, event: RoundFailed) -> list[Action]:
        # A round that cannot be aggregated or saved must stop the run loudly, not hang it silently.
        state = self.state
        state.failure = f"round {event.round + 1} could not close: {event.reason}"
        state.phase = Phase.FINISHED
        details = f"\n{event.details}" if event.details else ""
        return [Log(f"{state.failure}{details}"), Finish(state.failure)]


_Handler = Callable[[RoundEngine, Any], list[Action]]
_OPEN = (Phase.GATHERING, Phase.TRAINING, Phase.CLOSING)
_RUNNING = (Phase.TRAINING, Phase.CLOSING)

# (phase, event) -> handler: every rule that depends on the phase, in one place. Pairs not listed are ignored.
TRANSITIONS: dict[tuple[Phase, type[Any]], _Handler] = {
    **{(phase, ClientHello): RoundEngine._admit for phase in _OPEN},
    (Phase.FINISHED, ClientHello): RoundEngine._refuse_finished,
    # Steps and updates come only after a Welcome, so never while GATHERING; after the last round a straggler's
    # step or update is still answered (refused, or told the round closed).
    **{(phase, StepArrived): RoundEngine._step for phase in (*_RUNNING, Phase.FINISHED)},
    **{(phase, StepDone): RoundEngine._step_done for phase in (*_RUNNING, Phase.FINISHED)},
    **{(phase, UpdateArrived): RoundEngine._update for phase in (*_RUNNING, Phase.FINISHED)},
    **{(phase, ClientLeft): RoundEngine._left for phase in Phase},
    **{(phase, TokensRevoked): RoundEngine._revoked for phase in Phase},
    (Phase.TRAINING, DeadlineTick): RoundEngine._deadline,
    (Phase.CLOSING, Aggregated): RoundEngine._aggregated,
    (Phase.CLOSING, RoundSaved): RoundEngine._saved,
    (Phase.CLOSING, RoundFailed): RoundEngine._failed,
    # A tail worker rank lost mid-round (scaleout.py): the run cannot go on either.
    **{(phase, RoundFailed): RoundEngine._failed for phase in (Phase.GATHERING, Phase.TRAINING)},
}
