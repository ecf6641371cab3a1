"""What the server checks of an admitted peer's numbers before they touch the shared state.

One peer must not stop or poison a federation: a Hello's fields, an update's sample count and adapters, the
magnitude of activations, and the state that is about to be committed (a round's global adapters, a
checkpoint) are checked here. Pure functions over numpy; the limits are named so the docs can cite them
(docs/security.md, "One peer must not poison the run").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from edgesplit.client.protocol import Hello, Wire
from edgesplit.client.tensors import is_int
from edgesplit.errors import ProtocolError, TrainingError

# FedAvg weighs each update by its sample count: one client claiming an astronomical count would replace the
# global model, and a count past float range overflows the average. No edge device holds a billion examples.
MAX_NUM_SAMPLES = 10**9
# Adapter entries are small (LoRA matrices start near 0 and move by learning-rate-sized steps); an entry past
# this is an attack or a diverged client, and FedAvg would carry it into every client's model.
MAX_ADAPTER_ABS = 1e4
# The root mean square of one token's activation vector at the cut. Real hidden states sit far below it: a
# residual stream's RMS is of order 1 to 100 even with the "massive activations" of a few channels
# (a few thousand in one channel of a 4096-wide Llama state is an RMS of about 60). One value of 2e38 in a
# token makes that token's RMS about 1e36 and the tail's layer norm overflow; it is refused here.
MAX_ACTIVATION_RMS = 1e4
# Names that pass the client-id pattern but mean something else as a file name in a checkpoint.
RESERVED_CLIENT_IDS = frozenset({".", "..", "latest"})
# Manifest.manifest_hash is a sha256 hex digest's first 16 characters; a whole digest is accepted too.
_SHA256_HEX = re.compile(r"[0-9a-f]{16,64}")
# The largest finite value each wire can carry; int8 rows carry a float32 scale, so any finite float32.
_WIRE_MAX = {Wire.FP32: float(np.finfo(np.float32).max), Wire.FP16: float(np.finfo(np.float16).max)}


def check_hello(hello: Hello) -> None:
    """The Hello fields the message's own checks leave to the server; ProtocolError (refused) if bad."""
    if hello.client_id in RESERVED_CLIENT_IDS:
        raise ProtocolError(f"client_id {hello.client_id!r} is reserved; choose another")
    if _SHA256_HEX.fullmatch(hello.manifest_hash) is None:
        raise ProtocolError("manifest_hash must be a sha256 hex digest or its prefix (16 to 64 characters of 0-9 a-f)")
    problem = num_samples_problem(hello.num_samples)
    if problem is not None:
        raise ProtocolError(problem)


def num_samples_problem(value: object) -> str | None:
    """Why a sample count cannot weigh an update, or None if it can."""
    if not is_int(value):
        return f"num_samples must be an integer, got a {type(value).__name__}"
    if not 0 <= value <= MAX_NUM_SAMPLES:
        return f"num_samples must be between 0 and {MAX_NUM_SAMPLES:,}"
    return None


def update_problem(num_samples: object, tensors: Mapping[str, np.ndarray], wire: Wire) -> str | None:
    """Why an AdapterUpdate must be dropped from the round, or None: its count, and adapters that are not
    finite, past MAX_ADAPTER_ABS, or that the session's wire could not carry back."""
    problem = num_samples_problem(num_samples)
    if problem is not None:
        return problem
    for name, array in tensors.items():
        if not np.issubdtype(array.dtype, np.floating):
            continue  # KD's int64 indices: the strategy checked them
        problem = values_problem(f"adapter {name}", array, min(MAX_ADAPTER_ABS, wire_max(wire)))
        if problem is not None:
            return problem
    return None


def values_problem(what: str, array: np.ndarray, limit: float) -> str | None:
    if array.size == 0:
        return None
    if not np.all(np.isfinite(array)):
        return f"{what} holds NaN or Inf"
    largest = float(np.max(np.abs(array.astype(np.float64))))
    if largest > limit:
        return f"{what} holds {largest:.3g}, beyond the limit of {limit:.3g}"
    return None


def wire_max(wire: Wire) -> float:
    return _WIRE_MAX.get(wire, _WIRE_MAX[Wire.FP32])


def check_activation_scale(activations: np.ndarray) -> None:
    """TrainingError if any token's activation vector has an RMS past MAX_ACTIVATION_RMS.

    activations (B, T, H); the RMS is over H, in float64 so that the check itself cannot overflow."""
    rms = np.sqrt(np.mean(np.square(activations.astype(np.float64)), axis=-1))  # (B, T)
    largest = float(np.max(rms)) if rms.size else 0.0
    if not largest <= MAX_ACTIVATION_RMS:
        raise TrainingError(
            f"activations out of range: a token's root mean square is {largest:.3g}, "
            f"the limit is {MAX_ACTIVATION_RMS:.3g}"
        )


def check_result(tensors: Mapping[str, np.ndarray], wire: Wire) -> None:
    """A round's result must be finite and fit the session's wire before it is committed: a result no
    Welcome or RoundResult could carry would stop every client."""
    for name, array in tensors.items():
        if np.issubdtype(array.dtype, np.floating):
            problem = values_problem(f"the round's {name}", array, wire_max(wire))
            if problem is not None:
                raise TrainingError(problem)


def check_finite_state(what: str, state: Any) -> None:
    """TrainingError naming the first non-finite array in a nested state (dicts, lists, numpy, torch):
    a poisoned state is never written to a checkpoint, where a restart would load it."""
    for path, array in _arrays(state, what):
        if array.size and not np.all(np.isfinite(array)):
            raise TrainingError(f"{path} is not finite; it is not checkpointed")


def _arrays(value: Any, path: str) -> Iterable[tuple[str, np.ndarray]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _arrays(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _arrays(item, f"{path}[{index}]")
    elif isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            yield path, value
    elif hasattr(value, "detach") and hasattr(value, "is_floating_point"):  # a torch tensor, without importing torch
        if value.is_floating_point():
            yield path, value.detach().float().cpu().numpy()
