"""The tail's device and precision: the choice of device (a fake torch.cuda where no GPU can exist), and a
real bf16 tail on the CPU whose loss stays close to fp32's while its LoRA and optimiser state stay fp32."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from edgesplit.errors import EdgesplitError
from edgesplit.server.placement import Placement, check_names, choose_placement, resolve_device
from edgesplit.server.tail import OptimizerSettings, Tail


@dataclass
class FakeCuda:
    count: int

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count


@pytest.mark.parametrize(
    ("asked", "gpus", "resolved"),
    [("auto", 0, "cpu"), ("auto", 2, "cuda:0"), ("cpu", 2, "cpu"), ("cuda", 1, "cuda:0"), ("cuda:1", 2, "cuda:1")],
)
def test_the_device_is_resolved_against_the_gpus_there_are(asked: str, gpus: int, resolved: str) -> None:
    assert resolve_device(asked, FakeCuda(gpus)) == resolved


def test_a_gpu_that_does_not_exist_is_refused_with_what_exists() -> None:
    with pytest.raises(EdgesplitError, match=r"no CUDA GPU is visible.*--device cpu"):
        resolve_device("cuda", FakeCuda(0))
    with pytest.raises(EdgesplitError, match=r"2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2", FakeCuda(2))
    # The real torch.cuda of this machine, which has no GPU: refused, not a crash at the first tensor.
    if not torch.cuda.is_available():
        with pytest.raises(EdgesplitError, match="no CUDA GPU"):
            choose_placement("cuda:0", "fp32")


@pytest.mark.parametrize(("device", "dtype"), [("gpu", "fp32"), ("cuda:x", "fp32"), ("cpu", "int8")])
def test_misspelt_flags_are_refused_without_torch(device: str, dtype: str) -> None:
    with pytest.raises(ValueError, match="--device|--dtype"):
        check_names(device, dtype)
    with pytest.raises(ValueError, match="resolved device"):
        Placement("auto")


def test_serve_refuses_a_missing_gpu_before_loading_anything(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    # Artifacts that do not exist: the device is refused first, in a second, without a traceback.
    command = [sys.executable, "-m", "edgesplit.cli", "serve", "--artifacts", str(tmp_path), "--device", "cuda:3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no CUDA GPU is visible" in done.stderr and "Traceback" not in done.stderr


def batch(tail: Tail, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch_size, seq, hidden = tail.manifest.activations_shape
    activations = rng.normal(0, 1, (batch_size, seq, hidden)).astype(np.float32)
    mask = np.ones((batch_size, seq), dtype=np.int64)
    labels = rng.integers(0, tail.manifest.vocab_size, (batch_size, seq)).astype(np.int64)
    return activations, mask, labels


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_bf16_tail_on_the_cpu_trains_close_to_fp32_with_fp32_lora(tiny_artifacts, family: str) -> None:  # type: ignore[no-untyped-def]
    artifacts = tiny_artifacts(family, 1)
    settings = OptimizerSettings(learning_rate=0.01)
    exact = Tail(artifacts, settings, seed=0, device="cpu", dtype="fp32")
    half = Tail(artifacts, settings, seed=0, device="cpu", dtype="bf16")
    frozen = [p for p in half.model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen if p.is_floating_point())
    assert all(p.dtype == torch.float32 for p in half.adapters.values())
    initial = exact.lora_state()
    for seed in range(2):
        (loss32, grads32), (loss16, grads16) = (t.train_step(*batch(t, seed)) for t in (exact, half))
        assert grads16 is not None and grads32 is not None and grads16.dtype == np.float32
        assert loss16 == pytest.approx(loss32, rel=0.02)
        cosine = float(np.sum(grads16 * grads32) / np.linalg.norm(grads16) / np.linalg.norm(grads32))
        assert cosine > 0.95
    state = half.state_dict()
    moments = [v for per in state["optimizer"]["state"].values() for v in per.values() if torch.is_tensor(v)]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert all(value.dtype == np.float32 for value in state["lora"].values())
    # They learnt the same thing: the adapters moved the same way (AdamW's sign-like steps differ where a
    # gradient is near zero, so the direction is compared, not each element).
    moved = [np.concatenate([(t.lora_state()[n] - initial[n]).ravel() for n in initial]) for t in (exact, half)]
    assert float(moved[0] @ moved[1] / np.linalg.norm(moved[0]) / np.linalg.norm(moved[1])) > 0.9
    loss, tokens = half.eval_loss(*batch(half, 9))
    assert tokens > 0 and loss == pytest.approx(exact.eval_loss(*batch(exact, 9))[0], rel=0.02)


def test_fp16_on_the_cpu_is_checked_by_running_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgesplit.server.placement import check_dtype

    check_dtype("fp16", "cpu")  # this torch runs fp16 on this CPU: accepted
    real_softmax = torch.nn.functional.softmax

    def no_half(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if tensor.dtype == torch.float16:  # as a torch build without fp16 CPU kernels answers
            raise RuntimeError("\"softmax_lastdim_kernel_impl\" not implemented for 'Half'")
        return real_softmax(tensor, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.nn.functional, "softmax", no_half)
    with pytest.raises(EdgesplitError, match=r"cannot run fp16 on this CPU.*--dtype bf16 or fp32"):
        check_dtype("fp16", "cpu")
    check_dtype("bf16", "cpu")
