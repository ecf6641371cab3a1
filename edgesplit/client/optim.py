"""AdamW in numpy, for the client's LoRA matrices: the edge client never imports torch.

It follows `torch.optim.AdamW` (single-tensor path, amsgrad off) operation for operation, so that a client
trained here and a model trained with PyTorch on the same gradients end up with the same weights:

    p  *= 1 - lr * weight_decay                       decoupled weight decay, before the moments
    m  += (1 - beta1) * (g - m)                       torch's lerp_
    v   = beta2 * v + (1 - beta2) * g * g
    p  -= lr / (1 - beta1**t) * m / (sqrt(v) / sqrt(1 - beta2**t) + eps)

A step is all or nothing: every gradient is checked (present, right shape, finite) before any parameter or
moment changes, so one bad tensor from the backward graph cannot leave the adapters half-updated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

import numpy as np
from numpy.typing import NDArray

from edgesplit.errors import TrainingError

# What torch.nn.utils.clip_grad_norm_ adds to the norm so that an all-zero gradient does not divide by zero.
_CLIP_EPS = 1e-6


class AdamWState(TypedDict):
    """What a checkpoint needs to resume the optimiser: plain float32 arrays keyed like the parameters.

    The hyperparameters are not part of it: they come from the run's configuration, which may change them.
    """

    step: int
    exp_avg: dict[str, NDArray[np.float32]]
    exp_avg_sq: dict[str, NDArray[np.float32]]


class AdamW:
    """AdamW over a dict of float32 arrays, updated in place.

    `params` is kept by reference: after `step` the caller's arrays hold the new weights, so they can be fed
    to the ONNX head directly. `lr` is a plain attribute so that a schedule can change it between steps.
    """

    def __init__(
        self,
        params: dict[str, NDArray[np.float32]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = None,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay, max_grad_norm)
        if not params:
            raise TrainingError("AdamW got no parameters to optimise")
        for name, param in params.items():
            if not isinstance(param, np.ndarray) or param.dtype != np.float32:
                kind = param.dtype if isinstance(param, np.ndarray) else type(param).__name__
                raise TrainingError(f"parameter {name!r} must be a float32 numpy array, got {kind}")
            if not param.flags.writeable:
                raise TrainingError(f"parameter {name!r} is read-only; AdamW updates parameters in place")
        self.params = params
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.step_count = 0
        self.exp_avg = {name: np.zeros_like(param) for name, param in params.items()}
        self.exp_avg_sq = {name: np.zeros_like(param) for name, param in params.items()}

    def step(self, grads: Mapping[str, NDArray[Any]]) -> float:
        """Apply one update from `grads` (one array per parameter, same names and shapes).

        Returns the global L2 norm of the gradients before clipping, as clip_grad_norm_ does, for logging.
        Raises TrainingError, changing nothing, if a gradient is missing, unexpected, misshapen or not finite.
        """
        checked = self._check_grads(grads)
        grad_norm = _global_norm(checked.values())
        if self.max_grad_norm is not None:
            # torch always multiplies by min(coef, 1); skipping a multiply by exactly 1.0 gives the same bits.
            clip_coef = min(self.max_grad_norm / (grad_norm + _CLIP_EPS), 1.0)
            if clip_coef < 1.0:
                checked = {name: grad * np.float32(clip_coef) for name, grad in checked.items()}

        self.step_count += 1
        lr = float(self.lr)  # a schedule may have set a numpy scalar, which would promote float32 maths
        beta1, beta2 = self.betas
        # Python floats, as in torch: the scalars are computed in double and applied to float32 tensors.
        bias_correction1 = 1.0 - beta1**self.step_count
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.step_count)
        step_size = lr / bias_correction1
        decay = 1.0 - lr * self.weight_decay

        for name, grad in checked.items():
            param, exp_avg, exp_avg_sq = self.params[name], self.exp_avg[name], self.exp_avg_sq[name]
            if self.weight_decay != 0.0:
                param *= decay
            exp_avg += (1.0 - beta1) * (grad - exp_avg)
            exp_avg_sq *= beta2
            exp_avg_sq += (1.0 - beta2) * grad * grad
            denom = np.sqrt(exp_avg_sq) / bias_correction2_sqrt + self.eps
            param -= step_size * exp_avg / denom
        return grad_norm

    def state_dict(self) -> AdamWState:
        """A copy of the moments and the step count, safe to save while training goes on."""
        return {
            "step": self.step_count,
            "exp_avg": {name: moment.copy() for name, moment in self.exp_avg.items()},
            "exp_avg_sq": {name: moment.copy() for name, moment in self.exp_avg_sq.items()},
        }

    def load_state_dict(self, state: AdamWState) -> None:
        """Resume from `state_dict()` output; checks everything first and changes nothing if it is invalid."""
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise TrainingError(f"optimiser state has an invalid step count {step!r}")
        exp_avg = self._check_moments("exp_avg", state["exp_avg"])
        exp_avg_sq = self._check_moments("exp_avg_sq", state["exp_avg_sq"])
        for name, moment in exp_avg_sq.items():
            if (moment < 0).any():
                raise TrainingError(f"optimiser state exp_avg_sq[{name!r}] has negative entries")
        self.step_count = int(step)
        self.exp_avg = exp_avg
        self.exp_avg_sq = exp_avg_sq

    def _check_grads(self, grads: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[np.float32]]:
        """Validate every gradient against its parameter; return them as float32, in parameter order."""
        unexpected = sorted(set(grads) - set(self.params))
        if unexpected:
            raise TrainingError(f"gradients for unknown parameters: {', '.join(unexpected)}")
        checked: dict[str, NDArray[np.float32]] = {}
        for name, param in self.params.items():
            if name not in grads:
                raise TrainingError(f"no gradient for parameter {name!r}")
            checked[name] = _as_finite_float32(f"gradient {name!r}", grads[name], param.shape)
        return checked

    def _check_moments(self, label: str, moments: Mapping[str, NDArray[Any]]) -> dict[str, NDArray[np.float32]]:
        if set(moments) != set(self.params):
            missing = sorted(set(self.params) - set(moments))
            unexpected = sorted(set(moments) - set(self.params))
            raise TrainingError(
                f"optimiser state {label} does not match the parameters (missing: {missing or 'none'}, "
                f"unexpected: {unexpected or 'none'})"
            )
        return {
            # copy=True: the optimiser must own its moments, not alias the caller's checkpoint arrays.
            name: _as_finite_float32(f"optimiser state {label}[{name!r}]", moments[name], param.shape).copy()
            for name, param in self.params.items()
        }


def _as_finite_float32(what: str, array: NDArray[Any], shape: tuple[int, ...]) -> NDArray[np.float32]:
    if not isinstance(array, np.ndarray) or not np.issubdtype(array.dtype, np.floating):
        kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
        raise TrainingError(f"{what} must be a floating-point numpy array, got {kind}")
    if array.shape != shape:
        raise TrainingError(f"{what} has shape {array.shape}, expected {shape}")
    # Check before casting: a float64 value beyond float32's range would otherwise become inf silently.
    if not np.isfinite(array).all():
        raise TrainingError(f"{what} contains NaN or Inf; refusing to update the adapters")
    with np.errstate(over="ignore"):  # reported below, by name, instead of as a numpy warning
        converted = array.astype(np.float32, copy=False)
    if not np.isfinite(converted).all():
        raise TrainingError(f"{what} overflows float32")
    return converted


def _global_norm(grads: Iterable[NDArray[np.float32]]) -> float:
    # float64 accumulation: a float32 sum of squares can overflow where the norm itself is representable.
    return math.sqrt(sum(float(np.square(grad, dtype=np.float64).sum()) for grad in grads))


def _check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, max_grad_norm: float | None
) -> None:
    # The same bounds torch.optim.AdamW enforces, plus finiteness, which it does not check.
    if not (math.isfinite(lr) and lr >= 0.0):
        raise TrainingError(f"AdamW learning rate must be a finite number >= 0, got {lr}")
    for index, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise TrainingError(f"AdamW betas[{index}] must be in [0, 1), got {beta}")
    if not (math.isfinite(eps) and eps >= 0.0):
        raise TrainingError(f"AdamW eps must be a finite number >= 0, got {eps}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise TrainingError(f"AdamW weight_decay must be a finite number >= 0, got {weight_decay}")
    if max_grad_norm is not None and not (math.isfinite(max_grad_norm) and max_grad_norm > 0.0):
        raise TrainingError(f"max_grad_norm must be a finite number > 0, or None for no clipping; got {max_grad_norm}")
