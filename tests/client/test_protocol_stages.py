"""Named stage tensors and steps of more than one exchange (the U-shaped split), tested by feeding bytes."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.client.protocol import (
    EXCHANGES,
    PROTOCOL_VERSION,
    STAGE_TENSORS,
    TRANSITIONS,
    Activations,
    AdapterUpdate,
    Gradients,
    Hello,
    Kind,
    Message,
    Role,
    Session,
    SessionSettings,
    State,
    Welcome,
    Wire,
    decode,
    encode,
    kind_may_come,
)
from edgesplit.errors import ProtocolError

B, T, H = 2, 3, 4


def hidden(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(B, T, H)).astype(np.float32)


MASK = np.ones((B, T), np.int64)


def u_step(round_: int, step: int) -> list[tuple[Role, Message, State]]:
    """One U-shaped step: (sender, message, state after it on both sides)."""
    return [
        (Role.CLIENT, Activations(round_, step, {"activations": hidden(1), "attention_mask": MASK}, "lower"),
         State.AWAIT_UPPER_ACTIVATIONS),
        (Role.SERVER, Activations(round_, step, {"activations": hidden(2)}, "upper"), State.AWAIT_UPPER_GRADIENTS),
        (Role.CLIENT, Gradients(round_, step, 2.5, 0.01, {"activation_grads": hidden(3)}, "upper"),
         State.AWAIT_LOWER_GRADIENTS),
        (Role.SERVER, Gradients(round_, step, 2.5, 0.02, {"activation_grads": hidden(4)}, "lower"), State.TRAINING),
    ]  # fmt: skip


def connected(exchange: str) -> dict[Role, Session]:
    sides = {Role.CLIENT: Session(Role.CLIENT), Role.SERVER: Session(Role.SERVER)}
    settings = SessionSettings(
        steps_per_round=2, learning_rate=0.1, wire=Wire.FP16, batch_size=B, max_seq_len=T, exchange=exchange
    )
    sides[Role.SERVER].receive(sides[Role.CLIENT].send(Hello("c", PROTOCOL_VERSION, "h", None, 1)))
    sides[Role.CLIENT].receive(sides[Role.SERVER].send(Welcome(0, 1, settings, {})))
    return sides


def deliver(sides: dict[Role, Session], sender: Role, message: Message) -> Message:
    receiver = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
    return sides[receiver].receive(sides[sender].send(message))


def test_a_u_shaped_step_holds_two_exchanges_in_both_directions() -> None:
    sides = connected("u_shaped")
    for round_step in [(0, 0), (0, 1)]:
        for sender, message, state_after in u_step(*round_step):
            received = deliver(sides, sender, message)
            assert sides[Role.CLIENT].state is sides[Role.SERVER].state is state_after
            assert isinstance(message, Activations | Gradients) and type(received) is type(message)
            assert isinstance(received, Activations | Gradients) and received.stage == message.stage
            # The session's wire (fp16 from the Welcome) carried the float tensors.
            assert received.tensors.keys() == message.tensors.keys()
            for name, sent in message.tensors.items():
                np.testing.assert_allclose(received.tensors[name], sent, atol=1e-2)
    deliver(sides, Role.CLIENT, AdapterUpdate(0, 1, {}, {}))
    assert sides[Role.SERVER].state is State.AWAIT_ROUND_RESULT
    assert sides[Role.SERVER].bytes_received["ACTIVATIONS"] == sides[Role.CLIENT].bytes_sent["ACTIVATIONS"]
    # Without a wire of their own, the step's frames went in the session's: fp16, from the Welcome.
    lower_up = [
        message for sender, message, _ in u_step(0, 0) if sender is Role.CLIENT and message.kind is Kind.ACTIVATIONS
    ]
    assert sides[Role.CLIENT].bytes_sent["ACTIVATIONS"] == 2 * sum(len(encode(m, Wire.FP16)) for m in lower_up)
    assert "ACTIVATIONS" in sides[Role.SERVER].bytes_sent and "GRADIENTS" in sides[Role.CLIENT].bytes_sent


@pytest.mark.parametrize("prefix", range(4))
def test_out_of_order_u_shaped_frames_are_refused_and_close_the_session(prefix: int) -> None:
    """At each point of a step, every message of the step except the next one is refused by its receiver."""
    sides = connected("u_shaped")
    step = u_step(0, 0)
    for sender, message, _ in step[:prefix]:
        deliver(sides, sender, message)
    for index, (sender, message, _) in enumerate(step):
        if index == prefix:
            continue
        receiver = Role.SERVER if sender is Role.CLIENT else Role.CLIENT
        session = Session(receiver)
        session.state, session.settings = sides[receiver].state, sides[receiver].settings
        with pytest.raises(ProtocolError, match="unexpected") as caught:
            session.receive(encode(message))
        assert caught.value.close_code == 1002 and session.state is State.CLOSED


def test_a_stage_outside_the_sessions_exchange_is_refused() -> None:
    split = connected("split")
    lower = u_step(0, 0)[0][1]
    with pytest.raises(ProtocolError, match=r"stage 'lower': this session's steps use \['split'\]"):
        split[Role.SERVER].receive(encode(lower))
    assert split[Role.SERVER].state is State.CLOSED
    with pytest.raises(ProtocolError, match="may not send it"):
        connected("split")[Role.CLIENT].send(lower)
    u_shaped = connected("u_shaped")
    split_step = Activations(0, 0, {"activations": hidden(), "attention_mask": MASK, "labels": MASK})
    with pytest.raises(ProtocolError, match="stage 'split'"):
        u_shaped[Role.SERVER].receive(encode(split_step))


def test_one_steps_exchanges_must_name_the_same_round_and_step() -> None:
    sides = connected("u_shaped")
    deliver(sides, Role.CLIENT, u_step(0, 1)[0][1])
    wrong = Activations(0, 0, {"activations": hidden()}, "upper")
    with pytest.raises(ProtocolError, match="round 1 step 1 in the middle of round 1 step 2"):
        sides[Role.CLIENT].receive(encode(wrong))
    assert sides[Role.CLIENT].state is State.CLOSED


def test_the_split_step_is_still_one_exchange() -> None:
    sides = connected("split")
    up = Activations(0, 0, {"activations": hidden(), "attention_mask": MASK, "labels": MASK})
    deliver(sides, Role.CLIENT, up)
    assert sides[Role.SERVER].state is State.AWAIT_GRADIENTS
    deliver(sides, Role.SERVER, Gradients(0, 0, 1.0, 0.1, {}))  # a frozen head gets no activation_grads
    assert sides[Role.CLIENT].state is sides[Role.SERVER].state is State.TRAINING


# (what is wrong, how to build it, regex)
BAD_STAGE_TENSORS = [
    ("unknown stage", lambda: Activations(0, 0, {"activations": hidden()}, "middle"), "has no stage 'middle'"),
    ("labels on the lower cut", lambda: Activations(0, 0, {"activations": hidden(), "attention_mask": MASK,
                                                           "labels": MASK}, "lower"), "carries"),
    ("upper without activations", lambda: Activations(0, 0, {}, "upper"), r"carries \['activations'\]"),
    ("upper gradients are required", lambda: Gradients(0, 0, 1.0, 0.0, {}, "upper"), r"\['activation_grads'\]"),
    ("mask of another batch", lambda: Activations(0, 0, {"activations": hidden(), "attention_mask": np.ones(
        (B + 1, T), np.int64)}, "lower"), r"attention_mask must be int64 of shape \(B, T\) = \(2, 3\)"),
    ("float mask", lambda: Activations(0, 0, {"activations": hidden(), "attention_mask": MASK * 1.0},
                                       "lower"), "must be an int64 array"),
    ("2-d upper activations", lambda: Activations(0, 0, {"activations": MASK * 1.0}, "upper"), r"\(B, T, H\)"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "match"), [c[1:] for c in BAD_STAGE_TENSORS], ids=[c[0] for c in BAD_STAGE_TENSORS])
def test_named_stage_tensors_are_validated(build: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        build()  # type: ignore[operator]


def test_a_received_frame_is_checked_against_its_stage() -> None:
    """A valid "upper" frame relabelled "lower" lacks the lower cut's attention_mask: decode refuses it."""
    frame = encode(Activations(0, 0, {"activations": hidden()}, "upper"))
    relabelled = frame.replace(b'"stage":"upper"', b'"stage":"lower"')
    with pytest.raises(ProtocolError, match=r"stage 'lower' carries \['activations', 'attention_mask'\]"):
        decode(relabelled[:4] + (len(relabelled) - len(frame) + int.from_bytes(frame[4:8], "little")).to_bytes(
            4, "little") + relabelled[8:])  # fmt: skip


def test_every_exchange_plan_is_in_the_table_and_the_header_check_agrees() -> None:
    stages_in_table = {key[3] for key in TRANSITIONS if key[3] is not None}
    assert {stage for stages in EXCHANGES.values() for stage in stages} == stages_in_table
    assert {stage for _, stage in STAGE_TENSORS} == stages_in_table
    assert kind_may_come(Role.CLIENT, State.AWAIT_UPPER_ACTIVATIONS, Kind.ACTIVATIONS)
    assert not kind_may_come(Role.SERVER, State.AWAIT_UPPER_ACTIVATIONS, Kind.ACTIVATIONS)
    assert not kind_may_come(Role.SERVER, State.AWAIT_HELLO, Kind.ACTIVATIONS)
