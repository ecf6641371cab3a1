"""Faults, each with a real server and real client processes on loopback: a client killed mid-step, a link
cut and restored, the server killed and restarted, a straggler. After each, training has reached its planned
round count and nothing a client sent was counted twice."""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from loopback import Processes, client_command, free_port, serve_command, write_task

from edgesplit.client.metrics import read_jsonl
from edgesplit.server.aggregate import fedavg
from edgesplit.server.checkpoint import load_checkpoint, load_latest

STEPS = 4


@pytest.fixture
def setup(tiny_artifacts, tmp_path):  # type: ignore[no-untyped-def]
    for seed, name in enumerate("abc", 1):
        write_task(tmp_path / f"{name}.jsonl", seed=seed, count=12 + 4 * seed)
    return tiny_artifacts("llama", 1), tmp_path


def server_events(work: Path, event: str) -> list[dict]:  # type: ignore[type-arg]
    return [r for r in read_jsonl(work / "server.jsonl") if r["event"] == event]


def assert_nothing_counted_twice(work: Path, rounds: int) -> None:
    """Each (client, round, step) reached the tail once, each (client, round) update was taken once, and every
    round's checkpoint holds the sample-weighted average of exactly the updates it took."""
    steps: Counter[tuple[str, int, int]] = Counter()
    updates: Counter[tuple[str, int]] = Counter()
    for record in read_jsonl(work / "server.jsonl"):
        if record["event"] == "resume":
            # A restarted server forgets what it took after its checkpoint, and so does its tail: those
            # rounds start again from the checkpoint, and their steps may come again.
            steps = Counter({key: n for key, n in steps.items() if key[1] < record["round"]})
            updates = Counter({key: n for key, n in updates.items() if key[1] < record["round"]})
        elif record["event"] == "step":
            steps[record["client_id"], record["round"], record["step"]] += 1
        elif record["event"] == "update":
            updates[record["client_id"], record["round"]] += 1
    assert max(steps.values()) == 1, [key for key, count in steps.items() if count > 1]
    assert max(updates.values()) == 1, [key for key, count in updates.items() if count > 1]
    for round_index in range(1, rounds + 1):
        checkpoint = load_checkpoint(work / "ckpt" / f"round-{round_index:04d}")
        samples = checkpoint.extra["num_samples"]
        assert sorted(samples) == sorted(checkpoint.updates)
        # The checkpoint's updates are those the server logged as taken for this round, no more, no fewer.
        taken = sorted(c for c, r in updates if r == round_index - 1)
        assert sorted(checkpoint.updates) == taken
        expected = fedavg([(checkpoint.updates[c], samples[c]) for c in sorted(samples)])
        for name, value in expected.items():
            np.testing.assert_allclose(checkpoint.global_adapters[name], value, rtol=1e-6, atol=1e-7)


def test_client_killed_mid_step_rejoins_and_nothing_counts_twice(setup) -> None:  # type: ignore[no-untyped-def]
    """Quorum 2 of 2: while c is dead the round cannot close; a finishes and waits. c, restarted, is told the
    round and how many of its steps the server took, and sends only the rest."""
    artifacts, work = setup
    port, rounds = free_port(), 2
    url = f"ws://127.0.0.1:{port}"
    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, work, rounds=rounds, steps=STEPS))
        server.wait_for("listening on")
        a = run.start("a", client_command(url, artifacts, work / "a.jsonl", "a", work))
        c = run.start("c", client_command(url, artifacts, work / "c.jsonl", "c", work))
        c.wait_for(r"round 1 step 2:")  # the next step is being computed or is in flight
        c.kill()
        server.wait_for(r"\bc left")
        a.wait_for(r"\bround 1 step 4:")  # a carried on alone to the end of the round

        c_again = run.start("c2", client_command(url, artifacts, work / "c.jsonl", "c", work))
        resumed = c_again.wait_for(r"rejoined at round 1/2, step (\d)")
        assert int(resumed.group(1)) >= 3  # at least the two steps c finished are not sent again
        assert a.wait() == 0, a.output
        assert c_again.wait() == 0, c_again.output
        assert server.wait() == 0, server.output

    assert re.search(r"round 1/2 closed with 2 clients \(a, c\)", server.output)
    assert f"round {rounds}/{rounds} closed" in server.output
    # c's steps of round 1: every one of the four reached the tail exactly once, across both processes.
    c_steps = sorted(r["step"] for r in server_events(work, "step") if r["client_id"] == "c" and r["round"] == 0)
    assert c_steps == list(range(STEPS))
    assert_nothing_counted_twice(work, rounds)


def test_link_cut_and_restored_client_resumes(setup) -> None:  # type: ignore[no-untyped-def]
    """b's link dies silently for the server; b retries with backoff, its new connection replaces the dead
    one, and it resumes at the step the server expects."""
    artifacts, work = setup
    port, rounds = free_port(), 3
    with Processes() as run:
        server = run.start("server", serve_command(artifacts, port, work, rounds=rounds, steps=STEPS))
        server.wait_for("listening on")
        proxy = run.proxy(port)
        a = run.start("a", client_command(f"ws://127.0.0.1:{port}", artifacts, work / "a.jsonl", "a", work))
        b = run.start("b", client_command(f"ws://127.0.0.1:{proxy.port}", artifacts, work / "b.jsonl", "b", work))
        b.wait_for(r"round 2 step 2:")
        proxy.cut()
        b.wait_for("lost the server")
        b.wait_for(r"server not reachable .*; retrying in")  # refused while the link is down: backing off
        proxy.restore()
        server.wait_for(r"\bb reconnected; its new connection replaces the old one")
        # Step 3, or 4 when step 3's activations reached the tail before the cut but its gradients did not
        # reach the client: the server then counts it and moves on, and the client does not resend it.
        b.wait_for(r"rejoined at round 2/3, step [234]")
        assert a.wait() == 0, a.output
        assert b.wait() == 0, b.output
        assert server.wait() == 0, server.output

    assert "1 reconnections" in b.output
    assert all(f"round {r}/{rounds} closed with 2 clients (a, b)" in server.output for r in range(1, rounds + 1))
    # The dead connection's last step was taken once or dropped and resent, never both.
    b_steps = Counter(r["round"] for r in server_events(work, "step") if r["client_id"] == "b")
    assert b_steps == {r: STEPS for r in range(rounds)}
    assert_nothing_counted_twice(work, rounds)


def test_server_killed_and_restarted_resumes_from_checkpoint(setup) -> None:  # type: ignore[no-untyped-def]
    artifacts, work = setup
    port, rounds = free_port(), 4
    url = f"ws://127.0.0.1:{port}"
    command = serve_command(artifacts, port, work, rounds=rounds, steps=STEPS)
    with Processes() as run:
        server = run.start("server", command)
        server.wait_for("listening on")
        a = run.start("a", client_command(url, artifacts, work / "a.jsonl", "a", work))
        b = run.start("b", client_command(url, artifacts, work / "b.jsonl", "b", work))
        server.wait_for(rf"round 2/{rounds} closed")
        server.kill()
        saved = load_latest(work / "ckpt")
        assert saved is not None and 2 <= saved.round < rounds
        shutil.copytree(work / "ckpt", work / "ckpt-at-kill")  # the restarted server will add to ckpt/

        server_again = run.start("server2", command)
        # What a restart restores, checked here meanwhile: round, global adapters, tail LoRA, AdamW state.
        from edgesplit.server.server import Server, ServerConfig

        restored = Server(
            ServerConfig(artifacts=artifacts, port=0, checkpoint_dir=work / "ckpt-at-kill", rounds=rounds)
        )
        assert restored.round == saved.round
        for name, value in saved.global_adapters.items():
            np.testing.assert_array_equal(restored.global_adapters[name], value)
        tail_state = restored.tail.state_dict()
        for name, value in saved.tail_lora.items():
            np.testing.assert_array_equal(tail_state["lora"][name], value)
        steps_taken = {int(s["step"]) for s in tail_state["optimizer"]["state"].values()}
        assert steps_taken == {2 * STEPS * saved.round}  # two clients' steps a round, none lost, none extra
        restored.worker.close()

        server_again.wait_for(
            rf"resumed from checkpoint .*round-{saved.round:04d}: {saved.round} of {rounds} "
            rf"rounds done, continuing with round {saved.round + 1}"
        )
        assert a.wait() == 0, a.output
        assert b.wait() == 0, b.output
        assert server_again.wait() == 0, server_again.output

    for client in (a, b):
        assert "lost the server" in client.output and "1 reconnections" in client.output
    assert f"round {rounds}/{rounds} closed with 2 clients" in server_again.output
    final = load_latest(work / "ckpt")
    assert final is not None and final.round == rounds
    resume = server_events(work, "resume")
    assert [r["round"] for r in resume] == [saved.round]
    assert_nothing_counted_twice(work, rounds)


def test_straggler_does_not_hold_the_round_and_catches_up(setup) -> None:  # type: ignore[no-untyped-def]
    """c's uplink is slow: round 1 closes at its deadline with a and b; c's late update is dropped as stale;
    once its link is fast again, c takes the global adapters and is in a later round."""
    artifacts, work = setup
    port, rounds, deadline = free_port(), 6, 3.0
    with Processes() as run:
        server = run.start(
            "server",
            serve_command(artifacts, port, work, rounds=rounds, steps=STEPS, extra=["--round-deadline", str(deadline)]),
        )
        server.wait_for("listening on")
        proxy = run.proxy(port)
        c = run.start("c", client_command(f"ws://127.0.0.1:{proxy.port}", artifacts, work / "c.jsonl", "c", work))
        server.wait_for(r"\bc joined")  # c is in round 1 from its start
        proxy.delay_s = 5.0  # each frame up takes 5 s: c's round needs over 20 s
        url = f"ws://127.0.0.1:{port}"
        a = run.start("a", client_command(url, artifacts, work / "a.jsonl", "a", work))
        b = run.start("b", client_command(url, artifacts, work / "b.jsonl", "b", work))
        server.wait_for(rf"round 1/{rounds} closed with 2 clients \(a, b\)")
        proxy.delay_s = 0.0
        server.wait_for(r"c: stale update for round 1 dropped")
        for client in (a, b, c):
            assert client.wait() == 0, client.output
        assert server.wait() == 0, server.output

    first = server_events(work, "round")[0]
    assert first["clients"] == ["a", "b"]
    assert deadline <= first["seconds"] < 20  # held to its deadline, not to c's pace (over 20 s)
    assert [r["client_id"] for r in server_events(work, "stale_update")][:1] == ["c"]
    assert any("c" in r["clients"] for r in server_events(work, "round")[1:]), server.output
    assert_nothing_counted_twice(work, rounds)
