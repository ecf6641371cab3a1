"""FedAvg is the sample-weighted mean of the clients' tensors, and refuses updates it cannot average."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from edgesplit.errors import TrainingError
from edgesplit.server.aggregate import fedavg

SHAPES = {"layers.0.self_attn.q_proj.lora_A": (4, 16), "layers.0.self_attn.q_proj.lora_B": (24, 4)}


def client_tensors(seed: int) -> dict[str, NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def test_weighted_mean_with_unequal_counts() -> None:
    clients = [client_tensors(seed) for seed in range(3)]
    counts = [10, 1, 89]

    averaged = fedavg(list(zip(clients, counts, strict=True)))

    assert set(averaged) == set(SHAPES)
    for name in SHAPES:
        expected = sum(n * c[name].astype(np.float64) for c, n in zip(clients, counts, strict=True)) / 100
        assert averaged[name].dtype == np.float32
        np.testing.assert_allclose(averaged[name], expected, rtol=1e-6)


def test_equal_counts_give_the_plain_mean() -> None:
    clients = [client_tensors(seed) for seed in range(4)]

    averaged = fedavg([(tensors, 7) for tensors in clients])

    for name in SHAPES:
        np.testing.assert_allclose(
            averaged[name], np.mean([c[name] for c in clients], axis=0, dtype=np.float64), rtol=1e-6
        )


def test_a_single_client_is_returned_unchanged_as_a_copy() -> None:
    tensors = client_tensors(seed=0)

    averaged = fedavg([(tensors, 13)])

    for name in SHAPES:
        np.testing.assert_array_equal(averaged[name], tensors[name])
        assert not np.shares_memory(averaged[name], tensors[name])


def test_a_client_with_no_examples_has_no_effect() -> None:
    first, second = client_tensors(seed=0), client_tensors(seed=1)

    averaged = fedavg([(first, 5), (second, 0)])

    for name in SHAPES:
        np.testing.assert_array_equal(averaged[name], first[name])


def test_float16_and_float64_inputs_give_float32() -> None:
    tensors = client_tensors(seed=0)
    as_float16 = {name: t.astype(np.float16) for name, t in tensors.items()}
    as_float64 = {name: t.astype(np.float64) for name, t in tensors.items()}

    averaged = fedavg([(as_float16, 1), (as_float64, 1)])

    for name in SHAPES:
        assert averaged[name].dtype == np.float32
        expected = (as_float16[name].astype(np.float64) + as_float64[name]) / 2
        np.testing.assert_allclose(averaged[name], expected, rtol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_average_lies_between_the_clients_values(counts: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    clients = [{"w": rng.standard_normal(32).astype(np.float32)} for _ in counts]

    averaged = fedavg(list(zip(clients, counts, strict=True)))["w"]

    stacked = np.stack([c["w"] for c in clients])
    # A float32 rounding of the float64 mean may step just outside the range, by at most half an ulp.
    slack = np.spacing(np.abs(stacked).max(axis=0))
    assert np.all(averaged >= stacked.min(axis=0) - slack)
    assert np.all(averaged <= stacked.max(axis=0) + slack)


def with_tensor(name: str, value: NDArray[Any]) -> dict[str, NDArray[Any]]:
    tensors: dict[str, NDArray[Any]] = dict(client_tensors(seed=1))
    tensors[name] = value
    return tensors


def without_tensor(name: str) -> dict[str, NDArray[Any]]:
    tensors: dict[str, NDArray[Any]] = dict(client_tensors(seed=1))
    del tensors[name]
    return tensors


def with_nan(name: str) -> dict[str, NDArray[Any]]:
    tensors: dict[str, NDArray[Any]] = dict(client_tensors(seed=1))
    tensors[name][2, 3] = np.nan
    return tensors


# id -> (the second client's tensors, its example count, what the error must say)
BAD_SECOND_CLIENT: dict[str, tuple[dict[str, NDArray[Any]], Any, str]] = {
    "negative count": (client_tensors(seed=1), -3, "client 1: example count must be >= 0"),
    "float count": (client_tensors(seed=1), 2.5, "client 1: example count must be an int"),
    "bool count": (client_tensors(seed=1), True, "client 1: example count must be an int"),
    "missing tensor": (
        without_tensor("layers.0.self_attn.q_proj.lora_B"),
        4,
        r"client 1 sent different tensors.*missing: \['layers.0.self_attn.q_proj.lora_B'\]",
    ),
    "extra tensor": (with_tensor("extra", np.zeros(2, np.float32)), 4, r"unexpected: \['extra'\]"),
    "wrong shape": (
        with_tensor("layers.0.self_attn.q_proj.lora_B", np.zeros((4, 24), np.float32)),
        4,
        "'layers.0.self_attn.q_proj.lora_B' has shape",
    ),
    "nan": (
        with_nan("layers.0.self_attn.q_proj.lora_B"),
        4,
        "client 1: tensor 'layers.0.self_attn.q_proj.lora_B' contains NaN or Inf",
    ),
    "inf": (
        with_tensor("layers.0.self_attn.q_proj.lora_A", np.full((4, 16), np.inf, np.float32)),
        4,
        "'layers.0.self_attn.q_proj.lora_A' contains",
    ),
    "integer tensor": (
        with_tensor("layers.0.self_attn.q_proj.lora_A", np.zeros((4, 16), np.int64)),
        4,
        "floating-point array",
    ),
}


@pytest.mark.parametrize(
    ("second_client", "count", "message"), list(BAD_SECOND_CLIENT.values()), ids=list(BAD_SECOND_CLIENT)
)
def test_bad_update_names_the_client_and_tensor(
    second_client: dict[str, NDArray[Any]], count: Any, message: str
) -> None:
    with pytest.raises(TrainingError, match=message):
        fedavg([(client_tensors(seed=0), 4), (second_client, count)])


def test_no_updates_is_an_error() -> None:
    with pytest.raises(TrainingError, match="no client updates"):
        fedavg([])


def test_zero_total_examples_is_an_error() -> None:
    with pytest.raises(TrainingError, match="0 examples in total"):
        fedavg([(client_tensors(seed=0), 0), (client_tensors(seed=1), 0)])


def test_a_client_with_no_tensors_is_an_error() -> None:
    with pytest.raises(TrainingError, match="client 0 sent no tensors"):
        fedavg([({}, 3)])


def test_average_top_k_equals_the_dense_weighted_mean() -> None:
    from edgesplit.client.losses import densify, top_k
    from edgesplit.server.aggregate import average_top_k

    rng = np.random.default_rng(0)
    vocab, k = 12, 4
    mask = np.ones((3, 5), dtype=np.int64)
    clients = []
    for weight in (10, 30):
        values, indices = top_k(rng.standard_normal((3, 5, vocab)).astype(np.float32) * 2, k, mask)
        clients.append((values, indices, weight))
    values, indices = average_top_k(clients, k=vocab)  # keep everything: compare with the dense mean
    dense = sum(densify(v, i, vocab) * (w / 40) for v, i, w in clients)
    np.testing.assert_allclose(densify(values, indices, vocab), dense / dense.sum(-1, keepdims=True), atol=1e-6)
    top_values, top_indices = average_top_k(clients, k=2)
    assert top_values.shape == (3, 5, 2)
    assert np.all(top_values[..., 0] >= top_values[..., 1])
    expected_first = np.argmax(dense, axis=-1)
    np.testing.assert_array_equal(top_indices[..., 0], expected_first)
