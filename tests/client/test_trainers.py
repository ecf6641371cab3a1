"""The client's trainers, one per framework, driven through a fake runtime: no server, no sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgesplit.client.data import Batch, EncodedSet, encode_examples, iterate_batches, read_jsonl
from edgesplit.client.head import Head
from edgesplit.client.local import LocalTrainer
from edgesplit.client.protocol import (
    FRAMEWORKS,
    Activations,
    Gradients,
    Message,
    RoundResult,
    SessionSettings,
    Wire,
)
from edgesplit.client.trainers import TRAINERS, FedLlmTrainer, KdTrainer, SplitTrainer, trainer_for
from edgesplit.errors import EdgesplitError, ProtocolError


class FakeRuntime:
    """Runs compute inline, records phases, and answers each message with `answer(message)`."""

    def __init__(self, answer: Callable[[Message], Message] | None = None) -> None:
        self.answer = answer
        self.phases: list[str] = []
        self.sent: list[Message] = []

    async def compute(self, phase: str, function: Callable[..., Any], *args: object) -> Any:
        self.phases.append(phase)
        return function(*args)

    async def offload(self, function: Callable[..., Any], *args: object) -> Any:
        return function(*args)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        self.phases.append(name)
        yield

    def phase(self, name: str) -> Any:
        return self._phase(name)

    async def exchange(self, message: Message) -> Message:
        self.sent.append(message)
        assert self.answer is not None, "this trainer should not talk to the server"
        return self.answer(message)


def settings(framework: str = "split", **extra: Any) -> SessionSettings:
    kd = {"top_k": 3, "temperature": 1.0, "client_distill_epochs": 1} if framework == "kd" else {}
    return SessionSettings(
        steps_per_round=2,
        learning_rate=0.01,
        wire=Wire.FP32,
        batch_size=2,
        max_seq_len=16,
        framework=framework,
        **{**kd, **extra},
    )


def task(artifacts: Path, tmp_path: Path, count: int = 4) -> tuple[Head, EncodedSet]:
    lines = [json.dumps({"prompt": f"w{i} w{i + 3}", "completion": f"w{i + 1} w{i + 2}"}) for i in range(count)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    head = Head(artifacts)
    tokenizer = Tokenizer.from_file(str(artifacts / "tokenizer.json"))
    manifest = head.manifest
    examples = read_jsonl(tmp_path / "data.jsonl")
    return head, encode_examples(tokenizer, examples, manifest.max_seq_len, manifest.eos_token_id, 0)


def first_batch(head: Head, encoded: EncodedSet) -> Batch:
    return next(iterate_batches(encoded, head.manifest.batch_size, seed=0))


def copy(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: value.copy() for name, value in arrays.items()}


def test_one_trainer_per_framework_and_the_welcome_picks_it(tiny_artifacts: Callable[..., Path]) -> None:
    assert sorted(TRAINERS) == sorted(FRAMEWORKS)
    assert all(trainer.framework == name for name, trainer in TRAINERS.items())
    split_head = Head(tiny_artifacts("llama", 1))
    assert type(trainer_for(split_head, split_head.initial_adapters(), settings())) is SplitTrainer
    full_head = Head(tiny_artifacts("llama", full_model=True))
    assert type(trainer_for(full_head, full_head.initial_adapters(), settings("fedllm"))) is FedLlmTrainer
    assert type(trainer_for(full_head, full_head.initial_adapters(), settings("kd"))) is KdTrainer
    with pytest.raises(EdgesplitError, match="--full-model export"):
        SplitTrainer(full_head, full_head.initial_adapters(), settings())


def test_a_split_step_sends_the_heads_activations_and_applies_the_gradients(
    tiny_artifacts: Callable[..., Path], tmp_path: Path
) -> None:
    head, encoded = task(tiny_artifacts("llama", 1), tmp_path)
    initial = head.initial_adapters()
    trainer = SplitTrainer(head, copy(initial), settings())
    batch = first_batch(head, encoded)

    def server(message: Message) -> Message:
        assert isinstance(message, Activations)
        grads = np.full_like(message.tensors["activations"], 0.01)
        return Gradients(message.round, message.step, 3.5, 0.25, {"activation_grads": grads})

    runtime = FakeRuntime(server)
    result = asyncio.run(trainer.step(batch, 1, 0, runtime))
    assert (result.loss, result.server_seconds) == (3.5, 0.25) and result.wait_seconds is not None
    assert runtime.phases == ["head_forward", "encode", "grad_graph", "optimizer"]
    (sent,) = runtime.sent
    assert isinstance(sent, Activations) and (sent.round, sent.step, sent.stage) == (1, 0, "split")
    expected = head.forward(batch.input_ids, batch.attention_mask, initial).activations
    np.testing.assert_allclose(sent.tensors["activations"], expected, rtol=1e-6)
    np.testing.assert_array_equal(sent.tensors["labels"], batch.labels)
    assert any(not np.array_equal(trainer.adapters[name], initial[name]) for name in initial), "no update"


def test_a_split_step_without_gradients_for_a_trainable_head_is_a_protocol_error(
    tiny_artifacts: Callable[..., Path], tmp_path: Path
) -> None:
    head, encoded = task(tiny_artifacts("llama", 1), tmp_path)
    trainer = SplitTrainer(head, head.initial_adapters(), settings())
    runtime = FakeRuntime(lambda message: Gradients(0, 0, 1.0, 0.0, {}))
    with pytest.raises(ProtocolError, match="no activation_grads"):
        asyncio.run(trainer.step(first_batch(head, encoded), 0, 0, runtime))


def test_a_welcome_of_a_new_round_replaces_the_adapters_and_one_of_the_same_round_keeps_them(
    tiny_artifacts: Callable[..., Path],
) -> None:
    head = Head(tiny_artifacts("llama", 1))
    own = {name: value + 1 for name, value in head.initial_adapters().items()}
    trainer = SplitTrainer(head, copy(own), settings())
    global_adapters = head.initial_adapters()
    trainer.take_welcome(global_adapters, new_round=False)
    assert all(np.array_equal(trainer.adapters[name], own[name]) for name in own)
    trainer.take_welcome(global_adapters, new_round=True)
    assert all(np.array_equal(trainer.adapters[name], global_adapters[name]) for name in own)


def test_a_fedllm_step_is_a_local_step_and_uploads_the_adapters(
    tiny_artifacts: Callable[..., Path], tmp_path: Path
) -> None:
    head, encoded = task(tiny_artifacts("llama", full_model=True), tmp_path)
    batch = first_batch(head, encoded)
    reference = LocalTrainer(head, head.initial_adapters(), learning_rate=0.01)
    expected_loss = reference.cross_entropy_step(batch)
    trainer = FedLlmTrainer(head, head.initial_adapters(), settings("fedllm"))
    runtime = FakeRuntime()  # no answer: a FedLLM step must not talk to the server
    result = asyncio.run(trainer.step(batch, 0, 0, runtime))
    assert result.loss == pytest.approx(expected_loss) and result.server_seconds is None
    assert runtime.phases == ["local_step"] and runtime.sent == []
    upload = asyncio.run(trainer.upload(runtime))
    for name, value in reference.adapters.items():
        np.testing.assert_allclose(upload[name], value, rtol=1e-6)


def test_kd_uploads_top_k_on_the_proxy_set_and_distils_towards_the_result(
    tiny_artifacts: Callable[..., Path], tmp_path: Path
) -> None:
    head, proxy = task(tiny_artifacts("llama", full_model=True), tmp_path, count=3)
    trainer = KdTrainer(head, head.initial_adapters(), settings("kd"))
    with pytest.raises(ProtocolError, match="proxy.input_ids"):
        trainer.take_welcome(head.initial_adapters(), new_round=True)  # adapters, not the proxy set
    trainer.take_welcome({"proxy.input_ids": proxy.input_ids, "proxy.attention_mask": proxy.attention_mask}, True)
    runtime = FakeRuntime()
    upload = asyncio.run(trainer.upload(runtime))
    assert set(upload) == {"proxy_values", "proxy_indices"}
    assert upload["proxy_values"].shape == (3, head.manifest.max_seq_len, 3)
    before = copy(trainer.adapters)
    # The last round's result changes nothing; an earlier one distils towards its targets.
    asyncio.run(trainer.take_result(RoundResult(0, 1, True, None, upload), runtime))
    assert all(np.array_equal(trainer.adapters[name], before[name]) for name in before)
    targets = {"proxy_values": np.ones_like(upload["proxy_values"]) / 3, "proxy_indices": upload["proxy_indices"]}
    asyncio.run(trainer.take_result(RoundResult(0, 1, False, None, targets), runtime))
    assert any(not np.array_equal(trainer.adapters[name], before[name]) for name in before)
