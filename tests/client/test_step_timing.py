"""The client's account of a step's time: the server's queue and compute apart, never one lump."""

from __future__ import annotations

import pytest

from edgesplit.client.client import round_close_text, server_phases, step_time_text
from edgesplit.client.protocol import RoundResult
from edgesplit.client.trainers import StepResult


def test_the_wait_splits_into_the_servers_queue_its_compute_and_the_network() -> None:
    outcome = StepResult(
        2.0, server_seconds=0.9, wait_seconds=1.0, server_queue_seconds=0.6, server_compute_seconds=0.25
    )
    phases = server_phases(1.0, outcome)
    assert phases == pytest.approx({"server_queue": 0.6, "server_compute": 0.25, "network": 0.15})
    text = step_time_text({"head_forward": 0.2, **phases})
    assert text == "1200 ms (server queue 600, server compute 250, network 150, device 200)"


def test_a_server_that_does_not_split_its_time_is_not_said_to_compute_all_of_it() -> None:
    phases = server_phases(1.0, StepResult(2.0, server_seconds=0.9, wait_seconds=1.0))
    assert phases == pytest.approx({"server": 0.9, "network": 0.1})
    assert "server compute" not in step_time_text(phases) and "server 900" in step_time_text(phases)
    assert step_time_text({"local_step": 0.5}) == "500 ms"


def test_the_round_close_says_how_much_was_the_servers_evaluation() -> None:
    with_eval = round_close_text(62.0, RoundResult(0, 1, False, 2.0, {}, eval_seconds=37.0))
    assert with_eval == "the round closed 62.0 s after this client's update (of which the server's evaluation 37.0 s)"
    assert "evaluation" not in round_close_text(3.0, RoundResult(0, 1, False, None, {}))
