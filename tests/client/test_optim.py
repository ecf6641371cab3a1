"""The numpy AdamW must follow torch.optim.AdamW step for step, and must refuse bad gradients atomically."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from edgesplit.client.optim import AdamW
from edgesplit.errors import TrainingError

torch = pytest.importorskip("torch")  # the reference implementation; absent on a client-only install

# LoRA-like shapes: A (rank, in), B (out, rank), plus a vector.
SHAPES = {"layer0.q.lora_A": (4, 16), "layer0.q.lora_B": (24, 4), "layer0.bias": (7,)}
NUM_STEPS = 20


def assert_close_to_torch(actual: NDArray[np.float32], expected: NDArray[np.float32]) -> None:
    """Equal to 1e-6 relative, measured against the tensor's scale.

    Bit equality is not on offer: torch's vectorised CPU kernels fuse multiply-adds and its sqrt is not
    correctly rounded (up to 0.75 ulp on AVX-512), so results differ from numpy's by an ulp here and there.
    An entry that has moved close to zero keeps the rounding error it picked up at the tensor's scale.
    """
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * float(np.abs(expected).max()))


def random_params(seed: int) -> dict[str, NDArray[np.float32]]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def random_grads(rng: np.random.Generator, scale: float) -> dict[str, NDArray[np.float32]]:
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}


@pytest.mark.parametrize(
    ("lr", "weight_decay", "max_grad_norm"),
    [
        (1e-3, 0.0, None),
        (1e-2, 0.01, None),
        (5e-2, 0.1, None),
        (1e-2, 0.01, 1.0),  # grads have norm ~ 3 * sqrt(183) ~ 40, so clipping acts on every step
        (1e-2, 0.0, 1e3),  # a bound that is never reached: clipping must change nothing
    ],
)
def test_matches_torch_adamw(lr: float, weight_decay: float, max_grad_norm: float | None) -> None:
    params = random_params(seed=0)
    torch_params = {name: torch.nn.Parameter(torch.from_numpy(p.copy())) for name, p in params.items()}
    ours = AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    reference = torch.optim.AdamW(
        list(torch_params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    )

    rng = np.random.default_rng(1)
    for _ in range(NUM_STEPS):
        grads = random_grads(rng, scale=3.0)
        for name, param in torch_params.items():
            param.grad = torch.from_numpy(grads[name].copy())
        # An infinite bound makes clip_grad_norm_ only measure the norm, which step() also returns.
        clip_bound = float("inf") if max_grad_norm is None else max_grad_norm
        expected_norm = float(torch.nn.utils.clip_grad_norm_(list(torch_params.values()), clip_bound))
        reference.step()

        grad_norm = ours.step(grads)

        assert grad_norm == pytest.approx(expected_norm, rel=1e-6)
        for name, param in params.items():
            assert param.dtype == np.float32
            assert_close_to_torch(param, torch_params[name].detach().numpy())

    state = ours.state_dict()
    assert state["step"] == NUM_STEPS
    for name, torch_param in torch_params.items():
        torch_state = reference.state[torch_param]
        assert_close_to_torch(state["exp_avg"][name], torch_state["exp_avg"].numpy())
        assert_close_to_torch(state["exp_avg_sq"][name], torch_state["exp_avg_sq"].numpy())


def test_step_updates_the_callers_arrays_in_place() -> None:
    params = random_params(seed=0)
    arrays_before = dict(params)
    values_before = {name: p.copy() for name, p in params.items()}

    AdamW(params, lr=1e-2).step(random_grads(np.random.default_rng(2), scale=1.0))

    for name, param in params.items():
        assert param is arrays_before[name]
        assert not np.array_equal(param, values_before[name])


def test_clipping_does_not_modify_the_callers_gradients() -> None:
    grads = random_grads(np.random.default_rng(3), scale=10.0)
    grads_before = {name: g.copy() for name, g in grads.items()}

    AdamW(random_params(seed=0), max_grad_norm=0.1).step(grads)

    for name, grad in grads.items():
        np.testing.assert_array_equal(grad, grads_before[name])


def bad_grads(case: str) -> dict[str, NDArray[Any]]:
    grads: dict[str, NDArray[Any]] = random_grads(np.random.default_rng(4), scale=1.0)
    if case == "nan":
        grads["layer0.q.lora_B"][3, 1] = np.nan
    elif case == "inf":
        grads["layer0.q.lora_B"][0, 0] = -np.inf
    elif case == "float64 beyond float32":
        grads["layer0.q.lora_B"] = grads["layer0.q.lora_B"].astype(np.float64) * 1e300
    elif case == "missing":
        del grads["layer0.q.lora_B"]
    elif case == "wrong shape":
        grads["layer0.q.lora_B"] = grads["layer0.q.lora_B"].T.copy()
    elif case == "integer":
        grads["layer0.q.lora_B"] = np.ones(SHAPES["layer0.q.lora_B"], dtype=np.int64)
    elif case == "unknown name":
        grads["layer9.lora_B"] = np.ones(3, dtype=np.float32)
        return grads
    return grads


@pytest.mark.parametrize(
    "case", ["nan", "inf", "float64 beyond float32", "missing", "wrong shape", "integer", "unknown name"]
)
def test_bad_gradient_is_rejected_and_nothing_changes(case: str) -> None:
    params = random_params(seed=0)
    optimizer = AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    optimizer.step(random_grads(np.random.default_rng(5), scale=1.0))  # so the moments are not all zero
    params_before = {name: p.copy() for name, p in params.items()}
    state_before = optimizer.state_dict()

    with pytest.raises(TrainingError, match="layer0.q.lora_B" if case != "unknown name" else "layer9.lora_B"):
        optimizer.step(bad_grads(case))

    for name, param in params.items():
        np.testing.assert_array_equal(param, params_before[name])
    state_after = optimizer.state_dict()
    assert state_after["step"] == state_before["step"]
    for name in SHAPES:
        np.testing.assert_array_equal(state_after["exp_avg"][name], state_before["exp_avg"][name])
        np.testing.assert_array_equal(state_after["exp_avg_sq"][name], state_before["exp_avg_sq"][name])


def test_state_dict_round_trip_resumes_identically() -> None:
    rng = np.random.default_rng(6)
    grads = [random_grads(rng, scale=1.0) for _ in range(10)]
    params = random_params(seed=0)
    original = AdamW(params, lr=1e-2, weight_decay=0.05, max_grad_norm=2.0)
    for step_grads in grads[:5]:
        original.step(step_grads)

    state = original.state_dict()
    assert all(isinstance(moment, np.ndarray) for moment in state["exp_avg"].values())
    resumed_params = {name: p.copy() for name, p in params.items()}
    resumed = AdamW(resumed_params, lr=1e-2, weight_decay=0.05, max_grad_norm=2.0)
    resumed.load_state_dict(state)
    # The loaded state must be the optimiser's own copy: changing the checkpoint afterwards has no effect.
    state["exp_avg"]["layer0.bias"][:] = 1e9

    for step_grads in grads[5:]:
        original.step(step_grads)
        resumed.step(step_grads)

    for name in SHAPES:
        np.testing.assert_array_equal(resumed_params[name], params[name])
    assert resumed.state_dict()["step"] == 10


def test_state_dict_is_a_copy() -> None:
    optimizer = AdamW(random_params(seed=0))
    optimizer.step(random_grads(np.random.default_rng(7), scale=1.0))
    state = optimizer.state_dict()
    state["exp_avg"]["layer0.bias"][:] = 123.0

    assert not np.any(optimizer.state_dict()["exp_avg"]["layer0.bias"] == 123.0)


def test_invalid_state_is_rejected_and_nothing_changes() -> None:
    optimizer = AdamW(random_params(seed=0))
    optimizer.step(random_grads(np.random.default_rng(8), scale=1.0))
    good = optimizer.state_dict()

    missing = optimizer.state_dict()
    del missing["exp_avg_sq"]["layer0.bias"]
    misshapen = optimizer.state_dict()
    misshapen["exp_avg"]["layer0.bias"] = np.zeros(8, dtype=np.float32)
    not_finite = optimizer.state_dict()
    not_finite["exp_avg"]["layer0.bias"][0] = np.nan
    negative_step = optimizer.state_dict()
    negative_step["step"] = -1

    for bad in (missing, misshapen, not_finite, negative_step):
        with pytest.raises(TrainingError):
            optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    assert after["step"] == good["step"]
    np.testing.assert_array_equal(after["exp_avg"]["layer0.bias"], good["exp_avg"]["layer0.bias"])


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": -1.0}, {"lr": float("nan")}, {"betas": (1.0, 0.999)}, {"eps": -1e-8}, {"weight_decay": -0.1}]
    + [{"max_grad_norm": 0.0}, {"max_grad_norm": float("inf")}],
)
def test_invalid_hyperparameters_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TrainingError):
        AdamW(random_params(seed=0), **kwargs)


def test_parameters_must_be_float32() -> None:
    with pytest.raises(TrainingError, match="float32"):
        AdamW({"w": np.zeros(3, dtype=np.float64)})  # type: ignore[dict-item]
    with pytest.raises(TrainingError, match="no parameters"):
        AdamW({})
