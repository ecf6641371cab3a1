"""fedavg_by_holder: FedAvg per adapter over whoever trained it, for devices at different cuts."""

from __future__ import annotations

import numpy as np
import pytest

from edgesplit.errors import TrainingError
from edgesplit.server.aggregate import fedavg, fedavg_by_holder


def layer_names(layers: range) -> list[str]:
    return [f"layers.{i}.self_attn.q_proj.lora_{m}" for i in layers for m in "AB"]


def device(cut: int, value: float) -> dict[str, np.ndarray]:
    """A device at `cut` holds layers [0, cut); each matrix filled with `value` plus its layer, to tell apart."""
    return {
        name: np.full((2, 3), value + int(name.split(".")[1]), dtype=np.float32) for name in layer_names(range(cut))
    }


def test_each_adapter_is_averaged_over_its_holders_and_the_tail_for_the_others() -> None:
    # Cuts 1, 2 and 4 with 10, 30 and 60 samples; the tail (from cut 1) holds layers 1.. and trained layer l
    # for every device whose cut is <= l.
    updates = [(device(1, 1.0), 10), (device(2, 2.0), 30), (device(4, 4.0), 60)]
    tail = {name: np.full((2, 3), -1.0, dtype=np.float32) for name in layer_names(range(1, 4))}
    result = fedavg_by_holder(updates, tail)
    assert set(result) == set(layer_names(range(4)))
    layer = lambda i: result[f"layers.{i}.self_attn.q_proj.lora_A"][0, 0]  # noqa: E731
    # layer 0: every device holds it, the tail does not
    assert layer(0) == pytest.approx((10 * 1 + 30 * 2 + 60 * 4) / 100)
    # layer 1: held by the cut-2 and cut-4 devices; the tail trained it for the cut-1 device (10 samples)
    assert layer(1) == pytest.approx((30 * 3 + 60 * 5 + 10 * -1) / 100)
    # layers 2 and 3: the cut-4 device, and the tail for the cut-1 and cut-2 devices (40 samples)
    assert layer(2) == pytest.approx((60 * 6 + 40 * -1) / 100)
    assert layer(3) == pytest.approx((60 * 7 + 40 * -1) / 100)
    assert all(value.dtype == np.float32 for value in result.values())


def test_an_adapter_no_device_sent_this_round_comes_back_as_the_tails() -> None:
    tail = {name: np.full((2, 3), 0.5, dtype=np.float32) for name in layer_names(range(1, 3))}
    result = fedavg_by_holder([(device(1, 1.0), 3), (device(1, 3.0), 1)], tail)
    assert np.array_equal(result["layers.2.self_attn.q_proj.lora_B"], tail["layers.2.self_attn.q_proj.lora_B"])
    assert result["layers.0.self_attn.q_proj.lora_B"][0, 0] == pytest.approx(1.5)


@pytest.mark.parametrize("samples", [(1, 1, 1), (7, 0, 13), (123, 45, 6789)])
def test_with_every_device_at_one_cut_it_is_fedavg_exactly(samples: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(samples))
    names = layer_names(range(2))
    updates = [({n: rng.normal(size=(4, 8)).astype(np.float32) for n in names}, n) for n in samples]
    tail = {name: rng.normal(size=(4, 8)).astype(np.float32) for name in layer_names(range(2, 5))}
    expected = fedavg(updates)
    for server_copy in (None, tail):
        result = fedavg_by_holder(updates, server_copy)
        for name in names:
            assert np.array_equal(result[name], expected[name])  # bit for bit, not approximately
    # The tail's own layers, which no device holds, stay as they were.
    assert all(np.array_equal(fedavg_by_holder(updates, tail)[n], tail[n]) for n in tail)


def test_bad_updates_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(TrainingError, match="no client updates"):
        fedavg_by_holder([])
    with pytest.raises(TrainingError, match="0 examples in total"):
        fedavg_by_holder([(device(1, 1.0), 0)])
    wrong_shape = {"layers.0.self_attn.q_proj.lora_A": np.zeros((3, 3), dtype=np.float32)}
    with pytest.raises(TrainingError, match="shape"):
        fedavg_by_holder([(device(1, 1.0), 1), (wrong_shape, 1)])
    nan = {n: v * np.nan for n, v in device(1, 1.0).items()}
    with pytest.raises(TrainingError, match="NaN"):
        fedavg_by_holder([(device(1, 1.0), 1), (nan, 1)])
    with pytest.raises(TrainingError, match="example count"):
        fedavg_by_holder([(device(1, 1.0), True)])  # type: ignore[list-item]
