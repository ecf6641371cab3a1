"""Robust aggregation: the pure functions, and one real run where a poisoned update drags FedAvg and not the
median."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from loopback import Processes, activations, adapters, free_port, hello_frame, probe, serve_command

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.protocol import AdapterUpdate, encode
from edgesplit.errors import TrainingError
from edgesplit.server.aggregate import fedavg
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.robust import AggregationRule, clipped_fedavg, coordinate_median, trimmed_mean


def honest_clients(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"a": rng.normal(0, 0.1, (4, 3)), "b": rng.normal(0, 0.1, (5,))} for _ in range(count)]


def moved(clients: list[dict[str, np.ndarray]], index: int, by: float) -> list[dict[str, np.ndarray]]:
    changed = [dict(tensors) for tensors in clients]
    changed[index] = {name: array + by for name, array in clients[index].items()}
    return changed


def largest_change(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.max(np.abs(a[name] - b[name]))) for name in a)


def test_one_outlier_far_away_does_not_move_the_median_or_the_trimmed_mean() -> None:
    clients = honest_clients(7)
    for far in (1e3, 1e6):
        # The outlier lands above every honest value: the median and the trimmed mean come from the same
        # order statistics as when it sat a little higher than them (its move is 1.0 for the reference).
        for rule in (coordinate_median, lambda c: trimmed_mean(c, 0.2)):
            near_result, far_result = rule(moved(clients, 3, 1.0)), rule(moved(clients, 3, far))
            assert largest_change(near_result, far_result) < 1e-6
        assert largest_change(fedavg([(t, 1) for t in moved(clients, 3, far)]), fedavg([(t, 1) for t in clients])) > 100


def test_the_trimmed_mean_trims_the_named_share_at_each_end() -> None:
    values = [{"x": np.array([v], np.float32)} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert trimmed_mean(values, 0.2)["x"][0] == pytest.approx(3.0)  # 1 and 100 dropped
    assert trimmed_mean(values, 0.0)["x"][0] == pytest.approx(22.0)  # nothing dropped: the mean
    assert coordinate_median(values)["x"][0] == pytest.approx(3.0)


def test_clipping_bounds_any_one_clients_influence() -> None:
    previous = {"a": np.zeros((4, 3)), "b": np.zeros(5)}
    clients = honest_clients(4)
    attacker = {name: np.full_like(array, 1e3) for name, array in previous.items()}
    for claimed in (1, 10**9):  # even a huge self-reported count cannot buy more than clip_norm
        result = clipped_fedavg([*((t, 10) for t in clients), (attacker, claimed)], previous, clip_norm=0.5)
        norm = np.sqrt(sum(float(np.sum(np.square(result[n] - previous[n]))) for n in previous))
        assert norm <= 0.5 + 1e-6
    # Changes already shorter than the bound are FedAvg exactly.
    small = clipped_fedavg([(t, 3) for t in clients], previous, clip_norm=100.0)
    reference = fedavg([(t, 3) for t in clients])
    assert largest_change(small, reference) < 1e-6


@pytest.mark.parametrize("attack", [1e6, -1e6, "random"])
def test_one_attacker_among_five_clients_moves_the_global_no_further_than_each_rule_allows(attack: object) -> None:
    """Four honest clients and one that sends what it likes and claims 10**9 examples."""
    honest = honest_clients(4, seed=3)
    previous = {name: np.zeros_like(array) for name, array in honest[0].items()}
    rng = np.random.default_rng(7)
    attacker = {
        name: rng.normal(0, 1e6, array.shape) if attack == "random" else np.full_like(array, float(attack))  # type: ignore[arg-type]
        for name, array in honest[0].items()
    }
    updates = [*((tensors, 100) for tensors in honest), (attacker, 10**9)]
    low = {name: np.min([c[name] for c in honest], axis=0) for name in previous}
    high = {name: np.max([c[name] for c in honest], axis=0) for name in previous}
    # The median and the trimmed mean (one of five trimmed at each end): every value stays among the honest.
    for rule in (AggregationRule("median"), AggregationRule("trimmed-mean", trim_fraction=0.2)):
        result = rule.aggregate(updates, previous)
        for name in previous:
            assert np.all(result[name] >= low[name] - 1e-6) and np.all(result[name] <= high[name] + 1e-6), rule.name
    # Clipping: the whole round's move is at most clip_norm, whatever the attacker sends or claims.
    result = AggregationRule("clipped", clip_norm=0.25).aggregate(updates, previous)
    assert np.sqrt(sum(float(np.sum(np.square(result[n] - previous[n]))) for n in previous)) <= 0.25 + 1e-6
    # FedAvg, for contrast, is the attacker's.
    assert largest_change(AggregationRule().aggregate(updates, previous), previous) > 1e3


def test_the_rule_checks_its_parameters_and_fedavg_stays_the_default() -> None:
    clients = [(t, 2) for t in honest_clients(3)]
    default = AggregationRule()
    assert default.name == "fedavg"
    assert largest_change(default.aggregate(clients, {}), fedavg(clients)) == 0.0
    for bad in ({"name": "mean"}, {"trim_fraction": 0.5}, {"trim_fraction": -0.1}, {"clip_norm": 0.0}):
        with pytest.raises(ValueError):
            AggregationRule(**bad)  # type: ignore[arg-type]
    broken = [clients[0], ({"a": np.full((4, 3), np.nan), "b": np.zeros(5)}, 2)]
    with pytest.raises(TrainingError):
        AggregationRule("median").aggregate(broken, {})


def test_a_poisoned_update_drags_fedavg_and_not_the_median(tiny_artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One real run under --aggregation median; FedAvg of the very updates it checkpointed is the contrast."""
    artifacts = tiny_artifacts("llama", 1)
    manifest = load_manifest(artifacts, verify=False)
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    step = encode(activations(manifest))
    honest, poisoned = adapters(manifest, 0.01), adapters(manifest, 500.0)  # finite, within MAX_ADAPTER_ABS
    updates = {"a": honest, "b": honest, "evil": poisoned}
    with Processes() as run:
        extra = ["--aggregation", "median"]
        server = run.start(
            "server", serve_command(artifacts, port, tmp_path, rounds=1, steps=1, min_clients=3, extra=extra)
        )
        server.wait_for("listening on")
        threads = [
            threading.Thread(
                target=probe, args=(url, hello_frame(name, manifest), step, encode(AdapterUpdate(0, 8, tensors, {})))
            )
            for name, tensors in updates.items()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert server.wait(120) == 0, server.output

    checkpoint = load_latest(tmp_path / "ckpt")
    assert checkpoint is not None and checkpoint.round == 1 and set(checkpoint.updates) == set(updates)
    for name, array in checkpoint.global_adapters.items():
        np.testing.assert_allclose(array, honest[name])  # the median: the honest value
    dragged = fedavg([(tensors, 8) for tensors in checkpoint.updates.values()])
    assert min(float(np.min(array)) for array in dragged.values()) > 100  # FedAvg: a third of the way to 500
