"""Where the tail runs and in what precision: `edgesplit serve --device auto|cpu|cuda|cuda:N --dtype fp32|bf16|fp16`.

The frozen base weights take the chosen precision on the chosen device; the LoRA matrices and AdamW's state
stay fp32 (PEFT computes each adapter in its own dtype and casts the sum back). The activations that come in
and the gradients that go out are numpy fp32 at the edge of the tail, whatever runs inside.

Both choices are checked before anything loads: a CUDA device that does not exist, or fp16 on a CPU whose
torch build cannot run it, is refused with what to do instead. torch is imported only when a choice is
resolved, so the configuration can be checked without it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

from edgesplit.errors import EdgesplitError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class CudaInfo(Protocol):
    """What placement asks of `torch.cuda` (a fake stands in for it where no GPU can exist)."""

    def is_available(self) -> bool: ...

    def device_count(self) -> int: ...


def check_names(device: str, dtype: str) -> None:
    """The flags' spelling, without torch: ValueError saying what is accepted."""
    if _DEVICE.fullmatch(device) is None:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


@dataclass(frozen=True)
class Placement:
    """A resolved choice: `device` is "cpu" or "cuda:N", `dtype` a key of DTYPES."""

    device: str
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        check_names(self.device, self.dtype)
        if self.device in ("auto", "cuda"):
            raise ValueError(f"a Placement names a resolved device (cpu or cuda:N), got {self.device!r}")

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, DTYPES[self.dtype])

    def describe(self) -> str:
        return f"{self.device}, {self.dtype} base weights (LoRA and optimiser fp32)"


def resolve_device(device: str, cuda: CudaInfo | None = None) -> str:
    """ "auto" -> the first GPU if there is one, else "cpu"; "cuda" -> "cuda:0"; a GPU that is not there is an
    EdgesplitError. `cuda`: torch.cuda unless a test passes a fake."""
    check_names(device, "fp32")
    if device == "cpu":
        return "cpu"
    if cuda is None:
        import torch

        cuda = torch.cuda
    available = cuda.is_available()
    count = cuda.device_count() if available else 0
    if device == "auto":
        return "cuda:0" if count > 0 else "cpu"
    index = int(device.partition(":")[2] or 0)
    if count == 0:
        raise EdgesplitError(
            f"--device {device}: no CUDA GPU is visible to this torch build (is it a CPU build? see setup.sh's "
            "EDGESPLIT_TORCH_INDEX); use --device cpu, or auto to take a GPU only where there is one"
        )
    if index >= count:
        raise EdgesplitError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return f"cuda:{index}"


def check_dtype(dtype: str, device: str) -> None:
    """Refuse a precision this device cannot train in: fp16 on a CPU where torch cannot run a layer's forward
    and backward in it, and bf16 on a GPU without bf16 support."""
    import torch

    if dtype == "fp16" and device == "cpu":
        try:
            layer = torch.nn.Linear(8, 8).to(torch.float16)
            inputs = torch.ones(2, 8, dtype=torch.float16, requires_grad=True)
            torch.nn.functional.softmax(layer(inputs), dim=-1).sum().backward()  # type: ignore[no-untyped-call]
        except RuntimeError as error:
            raise EdgesplitError(
                f"--dtype fp16: torch {torch.__version__} cannot run fp16 on this CPU ({error}); use --dtype bf16 "
                "or fp32"
            ) from None
    if dtype == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise EdgesplitError(f"--dtype bf16: the GPU {device} does not support bf16; use --dtype fp16 or fp32")


def choose_placement(device: str, dtype: str, cuda: CudaInfo | None = None) -> Placement:
    """The flags -> a checked Placement, before any weights load."""
    check_names(device, dtype)
    resolved = resolve_device(device, cuda)
    check_dtype(dtype, resolved)
    return Placement(resolved, dtype)


def place_model(model: Any, placement: Placement) -> None:
    """Move `model` to the placement's device, its frozen parameters into the placement's dtype; the trainable
    ones (the LoRA matrices) stay fp32, and so does AdamW's state built on them."""
    model.to(placement.device)
    dtype = placement.torch_dtype
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype != dtype and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)
