"""The device's defence on what goes up (--activation-noise, --activation-clip): the function, its flags, and a
split step whose frame carries the noised activations."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgesplit.client.client import main_summary
from edgesplit.client.client_cli import main
from edgesplit.client.data import encode_examples, iterate_batches, read_jsonl
from edgesplit.client.defences import MAX_SIGMA, ActivationDefence
from edgesplit.client.head import Head
from edgesplit.client.protocol import Activations, Gradients, Message, SessionSettings, Wire, decode, encode
from edgesplit.client.trainers import SplitTrainer
from edgesplit.errors import EdgesplitError


def token_norms(values: np.ndarray) -> np.ndarray:
    return np.linalg.norm(values.astype(np.float64), axis=-1)


def test_the_noise_is_sigma_times_each_tokens_norm_whatever_its_scale() -> None:
    rng = np.random.default_rng(1)
    # Tokens of very different scales, as the residual stream has: the ratio must hold for each.
    h = (rng.standard_normal((4, 64, 256)) * rng.uniform(0.01, 100.0, (4, 64, 1))).astype(np.float32)
    for sigma in (0.1, 1.0, 3.0):
        noised = ActivationDefence(sigma, rng=np.random.default_rng(2)).apply(h)
        assert noised.dtype == np.float32 and noised.shape == h.shape
        ratio = token_norms(noised - h) / token_norms(h)
        assert abs(float(np.mean(ratio)) - sigma) < 0.03 * sigma
        assert float(np.max(np.abs(ratio - sigma))) < 0.25 * sigma  # every token, not only on average


def test_clipping_bounds_each_tokens_norm_before_the_noise() -> None:
    rng = np.random.default_rng(3)
    h = (rng.standard_normal((2, 32, 128)) * rng.uniform(0.1, 10.0, (2, 32, 1))).astype(np.float32)
    clip = float(np.median(token_norms(h)))
    defence = ActivationDefence(1e-6, clip=clip, rng=np.random.default_rng(4))
    out = defence.apply(h)
    norms = token_norms(out)
    expected = np.minimum(token_norms(h), clip)
    np.testing.assert_allclose(norms, expected, rtol=1e-4)
    # Direction kept: clipping scales, it does not turn.
    cosine = np.sum(out * h, axis=-1) / (norms * token_norms(h))
    assert float(np.min(cosine)) > 0.9999


def test_the_gradient_goes_through_the_clip_exactly() -> None:
    """Against central differences of sum(g * clip(h)), in float64, on tokens both inside and outside the clip."""
    rng = np.random.default_rng(5)
    h = rng.standard_normal((1, 3, 6))
    h *= (np.array([0.5, 2.0, 4.0]) / np.linalg.norm(h, axis=-1))[..., None]  # norms 0.5, 2 and 4
    g = rng.standard_normal(h.shape)
    defence = ActivationDefence(1e-9, clip=1.0, rng=np.random.default_rng(0))

    def clipped(values: np.ndarray) -> np.ndarray:
        _, scale = defence._clip_scale(values)
        return values * scale

    numeric = np.zeros_like(h)
    for index in np.ndindex(h.shape):
        step = np.zeros_like(h)
        step[index] = 1e-6
        numeric[index] = (np.sum(g * clipped(h + step)) - np.sum(g * clipped(h - step))) / 2e-6
    np.testing.assert_allclose(defence.backward(h, g), numeric, rtol=1e-5, atol=1e-8)
    # Without a clip the gradient passes unchanged (the noise's scale is a constant).
    assert ActivationDefence(0.5).backward(h, g) is g


def test_the_noise_is_fresh_and_not_the_runs_seed() -> None:
    h = np.ones((1, 4, 8), dtype=np.float32)
    assert not np.array_equal(ActivationDefence(0.5).apply(h), ActivationDefence(0.5).apply(h))


@pytest.mark.parametrize(
    ("sigma", "clip", "expected"),
    [
        (0.0, None, "--activation-noise 0.0 is not a number above 0"),
        (-0.1, None, "is not a number above 0"),
        (math.nan, None, "--activation-noise nan"),
        (MAX_SIGMA * 2, None, f"at most {MAX_SIGMA:g}"),
        (0.3, 0.0, "--activation-clip 0.0 is not a number above 0"),
        (0.3, math.inf, "--activation-clip inf"),
    ],
)
def test_out_of_range_settings_are_refused_with_what_they_mean(sigma: float, clip: float | None, expected: str) -> None:
    with pytest.raises(EdgesplitError, match=expected.replace("(", r"\(")):
        ActivationDefence(sigma, clip)


def _arguments() -> list[str]:
    # Neither the artifacts nor the data exist: a refusal that mentions them came too late.
    return ["--server", "ws://127.0.0.1:8765", "--artifacts", "no-such-dir", "--data", "no.jsonl", "--client-id", "a"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--activation-clip", "5"], "--activation-clip needs --activation-noise"),
        (["--activation-noise", "0"], "--activation-noise 0.0 is not a number above 0"),
        (["--activation-noise", "nan"], "'nan' is not a finite number"),
        (["--activation-noise", "lots"], "'lots' is not a number"),
        (["--activation-noise", "0.3", "--activation-clip", "-1"], "--activation-clip -1.0 is not a number above 0"),
    ],
)
def test_the_flags_are_checked_before_anything_loads(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*_arguments(), *flags])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "no-such" not in err and "Traceback" not in err


def test_the_summary_line_says_the_defence_is_on() -> None:
    summary = {
        "final_loss": 2.0,
        "first_loss": 3.0,
        "steps": 4,
        "rounds": 1,
        "bytes_up": 1e6,
        "bytes_down": 1e6,
        "peak_rss_mb": 100.0,
        "energy_j": 1.0,
        "energy_method": "estimated",
        "energy_source": "x",
        "activation_defence": {"sigma": 0.3, "clip": 50.0},
    }
    assert "activations noised (sigma 0.3, clip 50)" in main_summary(summary)
    assert "noised" not in main_summary(summary | {"activation_defence": None})


class _Runtime:
    def __init__(self, answer: Callable[[Message], Message]) -> None:
        self.answer = answer
        self.frames: list[bytes] = []

    async def compute(self, phase: str, function: Callable[..., Any], *args: object) -> Any:
        return function(*args)

    async def offload(self, function: Callable[..., Any], *args: object) -> Any:
        return function(*args)

    @contextmanager
    def _phase(self) -> Iterator[None]:
        yield

    def phase(self, name: str) -> Any:
        return self._phase()

    async def exchange(self, message: Message) -> Message:
        self.frames.append(encode(message))  # what the wire carries
        return self.answer(message)


def test_a_split_steps_frame_carries_noised_activations_and_the_step_still_trains(
    tiny_artifacts: Callable[..., Path], tmp_path: Path
) -> None:
    artifacts = tiny_artifacts("llama", 1)
    lines = [json.dumps({"prompt": f"w{i} w{i + 3}", "completion": f"w{i + 1} w{i + 2}"}) for i in range(4)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    head = Head(artifacts)
    manifest = head.manifest
    tokenizer = Tokenizer.from_file(str(artifacts / "tokenizer.json"))
    encoded = encode_examples(tokenizer, read_jsonl(tmp_path / "data.jsonl"), manifest.max_seq_len, 2, 0)
    batch = next(iterate_batches(encoded, manifest.batch_size, seed=0))
    settings = SessionSettings(
        steps_per_round=1, learning_rate=0.01, wire=Wire.FP32, batch_size=2, max_seq_len=16, framework="split"
    )
    initial = head.initial_adapters()
    trainer = SplitTrainer(head, {name: value.copy() for name, value in initial.items()}, settings)
    trainer.defence = ActivationDefence(0.5, clip=1e6, rng=np.random.default_rng(7))

    def server(message: Message) -> Message:
        assert isinstance(message, Activations)
        grads = np.full_like(message.tensors["activations"], 0.01)
        return Gradients(message.round, message.step, 3.0, 0.0, {"activation_grads": grads})

    runtime = _Runtime(server)
    asyncio.run(trainer.step(batch, 0, 0, runtime))
    (frame,) = runtime.frames
    sent = decode(frame)
    assert isinstance(sent, Activations)
    clean = head.forward(batch.input_ids, batch.attention_mask, initial).activations
    uploaded = sent.tensors["activations"]
    ratio = token_norms(uploaded - clean) / token_norms(clean)
    assert abs(float(np.mean(ratio)) - 0.5) < 0.1  # H = 32: a noisier estimate of the ratio than above
    assert float(np.min(ratio)) > 0.1, "a token went up without its noise"
    np.testing.assert_array_equal(sent.tensors["labels"], batch.labels)
    assert any(not np.array_equal(trainer.adapters[name], initial[name]) for name in initial), "no update"


def test_a_u_shaped_steps_lower_frame_carries_noised_activations_and_no_labels(
    tiny_artifacts: Callable[..., Path], tmp_path: Path
) -> None:
    """In the U-shaped split the defence noises what goes up at the lower cut; the gradient going up at the
    upper cut is the device's top's, and the labels never travel."""
    from edgesplit.client.top import Top
    from edgesplit.client.trainers import UShapedTrainer

    artifacts = tiny_artifacts("llama", 1, top_layers=1)
    lines = [json.dumps({"prompt": f"w{i} w{i + 3}", "completion": f"w{i + 1} w{i + 2}"}) for i in range(4)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    head, top = Head(artifacts), Top(artifacts)
    tokenizer = Tokenizer.from_file(str(artifacts / "tokenizer.json"))
    encoded = encode_examples(tokenizer, read_jsonl(tmp_path / "data.jsonl"), head.manifest.max_seq_len, 2, 0)
    batch = next(iterate_batches(encoded, head.manifest.batch_size, seed=0))
    settings = SessionSettings(
        steps_per_round=1, learning_rate=0.01, wire=Wire.FP32, batch_size=2, max_seq_len=16, exchange="u_shaped"
    )
    initial = {**head.initial_adapters(), **top.initial_adapters()}
    trainer = UShapedTrainer(head, {name: value.copy() for name, value in initial.items()}, settings, top)
    trainer.defence = ActivationDefence(0.5, clip=1e6, rng=np.random.default_rng(7))

    def server(message: Message) -> Message:
        if isinstance(message, Activations):  # the middle: its output is what came up, here
            return Activations(message.round, message.step, {"activations": message.tensors["activations"]}, "upper")
        assert isinstance(message, Gradients)
        grads = np.full_like(message.tensors["activation_grads"], 0.01)
        return Gradients(message.round, message.step, 0.0, 0.0, {"activation_grads": grads})

    runtime = _Runtime(server)
    loss = asyncio.run(trainer.step(batch, 0, 0, runtime)).loss
    assert np.isfinite(loss)
    lower, upper = (decode(frame) for frame in runtime.frames)
    assert isinstance(lower, Activations) and isinstance(upper, Gradients)
    clean = head.forward(batch.input_ids, batch.attention_mask, head.initial_adapters()).activations
    ratio = token_norms(lower.tensors["activations"] - clean) / token_norms(clean)
    assert abs(float(np.mean(ratio)) - 0.5) < 0.1
    assert float(np.min(ratio)) > 0.1, "a token went up without its noise"
    assert "labels" not in lower.tensors and "labels" not in upper.tensors
    assert any(not np.array_equal(trainer.adapters[name], initial[name]) for name in initial), "no update"
