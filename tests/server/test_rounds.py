"""The round engine fed events by hand: no sockets, no threads, no torch."""

from __future__ import annotations

from typing import Any

import pytest

from edgesplit.server.round_events import (
    Action,
    Aggregate,
    Aggregated,
    ClientHello,
    ClientLeft,
    DeadlineTick,
    Disconnect,
    DropStep,
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
from edgesplit.server.rounds import TRANSITIONS, RoundEngine

HASH = "sha256:artifacts"


def rules(**overrides: Any) -> RoundRules:
    values: dict[str, Any] = dict(
        total_rounds=2,
        min_clients=2,
        steps_per_round=2,
        round_deadline_s=100.0,
        manifest_hash=HASH,
        protocol_version=3,
        checkpointing=True,
    )
    values.update(overrides)
    return RoundRules(**values)


def hello(connection: int, client_id: str, now: float = 0.0, **overrides: Any) -> ClientHello:
    values: dict[str, Any] = dict(
        connection=connection,
        client_id=client_id,
        num_samples=10,
        token_ok=True,
        manifest_hash=HASH,
        protocol_version=3,
        now=now,
    )
    values.update(overrides)
    return ClientHello(**values)


def update(connection: int, client_id: str, round_index: int = 0, problem: str | None = None) -> UpdateArrived:
    return UpdateArrived(connection, round_index, Update(client_id, 10, {"loss": 1.0}, {"w": client_id}), problem)


def only(actions: list[Action], kind: type[Any]) -> list[Any]:
    return [action for action in actions if isinstance(action, kind)]


def logs(actions: list[Action]) -> list[str]:
    return [action.text for action in only(actions, Log)]


def started_engine(**overrides: Any) -> RoundEngine:
    """Two clients, a (connection 1) and b (connection 2), past the start barrier."""
    engine = RoundEngine(rules(**overrides))
    engine.handle(hello(1, "a"))
    engine.handle(hello(2, "b"))
    return engine


def close_round(engine: RoundEngine, eval_loss: float | None = 0.5, now: float = 10.0) -> list[Action]:
    actions = engine.handle(Aggregated(engine.state.round, eval_loss, now))
    if engine.rules.checkpointing:
        assert only(actions, SaveCheckpoint) and not only(actions, SendRoundResult)
        actions = engine.handle(RoundSaved(engine.state.round, now))
    return actions


@pytest.mark.parametrize(
    ("overrides", "code", "text"),
    [
        ({"token_ok": False}, "bad_token", "unknown client or wrong token"),
        ({"manifest_hash": "sha256:other"}, "manifest_mismatch", "copy the server's artifact directory"),
        ({"protocol_version": 2}, "protocol_version", "protocol 2, server 3"),
    ],
)
def test_admission_refuses_bad_tokens_other_artifacts_and_other_protocols(overrides, code, text) -> None:  # type: ignore[no-untyped-def]
    engine = RoundEngine(rules())
    actions = engine.handle(hello(1, "a", **overrides))
    [refusal] = only(actions, Refuse)
    assert (refusal.connection, refusal.code, refusal.close_code) == (1, code, 1008) and text in refusal.reason
    assert only(actions, Metric)[0].kind == "refused"
    assert engine.state.members == {}


def test_nobody_is_welcomed_before_min_clients_have_joined() -> None:
    engine = RoundEngine(rules(min_clients=2))
    first = engine.handle(hello(1, "a", now=5.0))
    assert not only(first, SendWelcome) and engine.state.phase is Phase.GATHERING
    assert logs(first) == ["a joined at round 1 (10 samples); 1 connected"]
    second = engine.handle(hello(2, "b", now=7.0))
    assert sorted(w.connection for w in only(second, SendWelcome)) == [1, 2]
    assert engine.state.phase is Phase.TRAINING and engine.state.round_started_at == 7.0
    late = engine.handle(hello(3, "c"))
    assert only(late, SendWelcome) == [SendWelcome(3, 0, 0, False)]  # past the barrier: at once


def test_steps_run_in_order_and_a_replayed_step_is_refused() -> None:
    engine = started_engine()
    assert engine.handle(StepArrived(1, 0, 0)) == [RunStep(1, "a", 0, 0)]
    assert engine.handle(StepDone(1, 0, 0, StepEnd.TAKEN)) == [SendGradients(1, 0, 0)]
    replay = engine.handle(StepArrived(1, 0, 0))
    [refusal] = only(replay, Refuse)
    assert refusal.code == "protocol" and "round 1 step 1 again" in refusal.reason
    assert "protocol error" in logs(replay)[0]
    too_far = only(engine.handle(StepArrived(1, 0, 2)), Refuse)
    assert too_far and "of a round of 2 steps" in too_far[0].reason
    ahead = only(engine.handle(StepArrived(1, 1, 0)), Refuse)
    assert ahead and "which has not started" in ahead[0].reason


def test_a_reconnection_resumes_after_the_steps_taken_and_waits_for_one_still_running() -> None:
    engine = started_engine()
    engine.handle(StepArrived(1, 0, 0))
    engine.handle(StepDone(1, 0, 0, StepEnd.TAKEN))
    engine.handle(StepArrived(1, 0, 1))  # on the worker when a reconnects
    back = engine.handle(hello(3, "a"))
    assert only(back, Disconnect) == [
        Disconnect(1, "replaced", "this client connected again; this older connection is closed")
    ]
    assert "a reconnected; its new connection replaces the old one" in logs(back)
    assert not only(back, SendWelcome)  # the running step may still count
    done = engine.handle(StepDone(1, 0, 1, StepEnd.TAKEN))
    assert SendGradients(1, 0, 1) in done and SendWelcome(3, 0, 2, False) in done
    assert not engine.is_current(1) and engine.is_current(3)
    assert engine.handle(ClientLeft(1)) == []  # the old connection's end is no news


def test_a_step_skipped_because_its_client_was_gone_is_dropped_and_not_counted() -> None:
    engine = started_engine()
    engine.handle(StepArrived(1, 0, 0))
    engine.handle(hello(3, "a"))
    actions = engine.handle(StepDone(1, 0, 0, StepEnd.SKIPPED))
    assert DropStep(1, 0, 0) in actions and SendWelcome(3, 0, 0, False) in actions
    assert only(actions, Metric)[0].kind == "step_dropped"


def test_duplicate_and_stale_updates() -> None:
    engine = started_engine()
    assert only(engine.handle(update(1, "a")), Metric)[0].kind == "update"
    duplicate = engine.handle(update(1, "a"))
    assert logs(duplicate) == ["a: second update for round 1 ignored"]
    assert engine.state.updates["a"].tensors == {"w": "a"}  # the first stands
    closing = engine.handle(update(2, "b"))
    [aggregate] = only(closing, Aggregate)
    assert [u.client_id for u in aggregate.updates] == ["a", "b"]
    late = engine.handle(hello(3, "c"))  # joins while the round closes; its update would be stale
    assert SendWelcome(3, 0, 0, False) in late
    stale = engine.handle(update(3, "c"))
    assert logs(stale) == ["c: stale update for round 1 dropped; the server is at round 1 (closing)"]
    closed = close_round(engine)
    results = {r.connection: r for r in only(closed, SendRoundResult)}
    assert set(results) == {1, 2, 3}  # one result per connection, the duplicate's included
    assert results[3] == SendRoundResult(3, 0, 1, False, 0.5)
    after = engine.handle(update(3, "c", round_index=0))
    assert after[-1] == SendRoundResult(3, 0, 1, False, 0.5)  # a closed round: answered at once
    assert only(after, Metric)[0].kind == "stale_update"


def test_the_close_order_is_aggregate_save_then_results() -> None:
    engine = started_engine()
    engine.handle(update(1, "a"))
    [aggregate] = only(engine.handle(update(2, "b")), Aggregate)
    assert aggregate.round == 0 and engine.state.phase is Phase.CLOSING
    saving = engine.handle(Aggregated(0, 0.75, 12.0))
    assert [type(a) for a in saving] == [SaveCheckpoint]
    assert engine.state.round == 0  # not closed until saved
    closed = engine.handle(RoundSaved(0, 13.0))
    assert [type(a) for a in closed] == [RoundClosed, SendRoundResult, SendRoundResult]
    assert closed[0] == RoundClosed(0, aggregate.updates, 0.75, 12.0)
    assert engine.state.round == 1 and engine.state.updates == {} and engine.state.phase is Phase.TRAINING
    assert engine.state.round_started_at == 13.0


def test_without_checkpoints_a_round_closes_once_aggregated() -> None:
    engine = started_engine(checkpointing=False)
    engine.handle(update(1, "a"))
    engine.handle(update(2, "b"))
    assert only(engine.handle(Aggregated(0, None, 1.0)), RoundClosed)


def test_quorum_at_the_deadline() -> None:
    engine = started_engine(min_clients=1, round_deadline_s=30.0)
    assert not only(engine.handle(update(1, "a")), Aggregate)
    assert engine.handle(DeadlineTick(20.0)) == []  # b may still come
    [aggregate] = only(engine.handle(DeadlineTick(31.0)), Aggregate)
    assert [u.client_id for u in aggregate.updates] == ["a"]


def test_no_quorum_at_the_deadline_keeps_the_round_open() -> None:
    engine = started_engine(min_clients=2)
    engine.handle(hello(3, "c"))
    engine.handle(update(1, "a"))
    assert engine.handle(DeadlineTick(1000.0)) == []  # one update, two needed
    engine.handle(ClientLeft(3))
    assert engine.state.phase is Phase.TRAINING
    assert only(engine.handle(update(2, "b")), Aggregate)


def test_a_client_leaving_lets_the_round_close_without_it() -> None:
    engine = started_engine(min_clients=1)
    engine.handle(update(1, "a"))
    actions = engine.handle(ClientLeft(2))
    assert logs(actions) == ["b left; 1 connected"] and only(actions, Aggregate)


def test_revocation_disconnects_the_client_and_drops_its_update() -> None:
    engine = started_engine(min_clients=1)
    engine.handle(hello(3, "c"))
    engine.handle(update(3, "c"))
    actions = engine.handle(TokensRevoked(frozenset({"c"})))
    assert only(actions, Disconnect) == [Disconnect(3, "revoked", "this client's token was revoked")]
    assert logs(actions) == ["c: token revoked; disconnected, its update for this round dropped"]
    assert "c" not in engine.state.updates and not engine.is_current(3)
    # The revoked connection's late update cannot bring its update back.
    assert only(engine.handle(update(3, "c")), SendRoundResult)
    assert "c" not in engine.state.updates


def test_finish_after_the_last_round_and_refuse_newcomers() -> None:
    engine = started_engine(total_rounds=1)
    engine.handle(update(1, "a"))
    engine.handle(update(2, "b"))
    closed = close_round(engine)
    assert all(r.done for r in only(closed, SendRoundResult)) and closed[-1] == Finish(None)
    assert engine.finished
    [refusal] = only(engine.handle(hello(5, "d")), Refuse)
    assert refusal.code == "finished" and refusal.reason == "training finished after 1 rounds"


def test_a_round_that_cannot_close_finishes_the_run_with_the_reason() -> None:
    engine = started_engine()
    engine.handle(update(1, "a"))
    engine.handle(update(2, "b"))
    actions = engine.handle(RoundFailed(0, "OSError: disk full", "Traceback ..."))
    assert actions[-1] == Finish("round 1 could not close: OSError: disk full")
    assert logs(actions) == ["round 1 could not close: OSError: disk full\nTraceback ..."]
    assert only(engine.handle(hello(5, "d")), Refuse)[0].reason == "round 1 could not close: OSError: disk full"


def test_a_resumed_engine_starts_at_its_round_and_one_past_the_end_is_finished() -> None:
    engine = RoundEngine(rules(), round=1, last_eval_loss=0.25)
    engine.handle(hello(1, "a"))
    assert SendWelcome(2, 1, 0, False) in engine.handle(hello(2, "b"))
    assert RoundEngine(rules(total_rounds=2), round=2).finished


def test_a_bad_update_is_rejected_but_one_for_a_future_round_is_a_protocol_error() -> None:
    engine = started_engine()
    [bad] = only(engine.handle(update(1, "a", problem="adapter w has shape (2,)")), Refuse)
    assert bad.code == "bad_tensor"
    [ahead] = only(engine.handle(update(2, "b", round_index=1, problem="anything")), Refuse)
    assert ahead.code == "protocol" and "which has not started" in ahead.reason


def test_rules_and_events_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        rules(min_clients=0)
    with pytest.raises(ValueError, match="deadline"):
        rules(round_deadline_s=0)
    with pytest.raises(ValueError, match="taken, skipped or failed"):
        StepDone(1, 0, 0, "lost")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="negative"):
        Update("a", -1, {}, {})


def test_every_handler_in_the_table_is_a_method_of_the_engine() -> None:
    assert all(handler.__qualname__.startswith("RoundEngine.") for handler in TRANSITIONS.values())
    engine = RoundEngine(rules())
    assert engine.handle(DeadlineTick(10_000.0)) == []  # not in the table while gathering: ignored
