"""Server strategies: split runs the tail, FedLLM averages adapters, KD averages and distils logits; one registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgesplit.client.local import distil_positions, proxy_top_k
from edgesplit.errors import ArtifactError, ProtocolError, TrainingError
from edgesplit.server.strategies import (
    FRAMEWORKS,
    STRATEGIES,
    FedLlmStrategy,
    KdSettings,
    KdStrategy,
    SplitStrategy,
    StrategyOptions,
    build_strategy,
)


def write_lines(path: Path, count: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        a = int(rng.integers(0, 60))
        rows.append(json.dumps({"prompt": f"w{a}", "completion": f"w{a + 1} w{a + 2}"}))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_fedllm_averages_adapters_and_evaluates(tiny_artifacts, tmp_path) -> None:
    strategy = FedLlmStrategy(tiny_artifacts("llama", full_model=True), write_lines(tmp_path / "e.jsonl", 4, 0), 2)
    first = {k: np.ones_like(v) for k, v in strategy.global_adapters.items()}
    second = {k: np.zeros_like(v) for k, v in strategy.global_adapters.items()}
    merged = strategy.aggregate([(first, 1), (second, 3)])
    assert all(np.allclose(v, 0.25) for v in merged.values())
    assert strategy.evaluate() > 0


def test_kd_averages_logits_and_distils_into_the_global_model(tiny_artifacts, tmp_path) -> None:
    artifacts = tiny_artifacts("llama", full_model=True)
    strategy = KdStrategy(
        artifacts,
        write_lines(tmp_path / "e.jsonl", 4, 0),
        2,
        write_lines(tmp_path / "proxy.jsonl", 5, 1),
        learning_rate=0.05,
        settings=KdSettings(top_k=4),
    )
    before = {k: v.copy() for k, v in strategy.global_adapters.items()}
    updates = []
    for seed, samples in ((2, 10), (3, 30)):
        rng = np.random.default_rng(seed)
        adapters = {k: (rng.standard_normal(v.shape) * 0.3).astype(np.float32) for k, v in before.items()}
        values, indices = proxy_top_k(strategy.head, adapters, strategy.proxy, k=4)
        update = {"proxy_values": values, "proxy_indices": indices}
        strategy.check_update(update)
        updates.append((update, samples))
    result = strategy.aggregate(updates)
    assert result["proxy_values"].shape == (5, strategy.head.manifest.max_seq_len, 4)
    assert any(not np.allclose(before[k], strategy.global_adapters[k]) for k in before)  # it distilled
    with pytest.raises(TrainingError, match="vocabulary"):
        strategy.check_update(
            {"proxy_values": updates[0][0]["proxy_values"], "proxy_indices": updates[0][0]["proxy_indices"] + 10_000}
        )


def test_kd_global_model_learns_the_completions_of_a_labelled_proxy(tiny_artifacts, tmp_path) -> None:
    """KD distils on the labelled proxy's completions only, and the server's global model, distilling the
    clients' consensus there, gets better at those completions: its eval loss on them falls."""
    artifacts = tiny_artifacts("llama", full_model=True)
    proxy_file = write_lines(tmp_path / "proxy.jsonl", 8, 1)
    strategy = KdStrategy(artifacts, proxy_file, 4, proxy_file, learning_rate=0.05, settings=KdSettings(top_k=4))
    head, proxy = strategy.head, strategy.proxy
    # The proxy's labels travel in the Welcome: the clients distil where the server does.
    assert np.array_equal(strategy.welcome_tensors()["proxy.labels"], proxy.labels)
    positions = distil_positions(proxy)
    # Where the next token is a completion's (or its EOS): never the prompt or the padding.
    assert positions.sum() == (proxy.labels != -100).sum() > 0
    values, indices = proxy_top_k(head, head.initial_adapters(), proxy, k=4)
    assert np.all(values[positions == 0] == 0) and np.all(values[positions == 1].sum(axis=-1) > 0)
    # A client that knows the completions: all its mass on the proxy's next token, at those positions.
    rows, columns = np.nonzero(positions)
    known_values, known_indices = np.zeros_like(values), np.zeros_like(indices)
    known_values[rows, columns, 0] = 1.0
    known_indices[rows, columns, 0] = proxy.labels[rows, columns + 1]
    before = strategy.evaluate()
    assert before is not None
    for _ in range(6):
        strategy.aggregate([({"proxy_values": known_values, "proxy_indices": known_indices}, 1)])
    after = strategy.evaluate()
    assert after is not None and after < before - 0.15, (before, after)  # 4.86 -> 4.63 here


def test_whole_model_strategies_refuse_split_artifacts(tiny_artifacts) -> None:
    with pytest.raises(ArtifactError, match="--full-model"):
        FedLlmStrategy(tiny_artifacts("llama", 1), None, 1)


def test_the_registry_is_the_one_list_of_frameworks() -> None:
    assert FRAMEWORKS == tuple(STRATEGIES) == ("split", "fedllm", "kd")
    with pytest.raises(ValueError, match="--framework must be one of split, fedllm, kd"):
        build_strategy("fedprox", StrategyOptions(artifacts=Path("unused")))


def test_split_strategy_runs_the_tail_and_averages_the_head_adapters(tiny_artifacts, tmp_path) -> None:
    artifacts = tiny_artifacts("llama", 1)
    strategy = build_strategy("split", StrategyOptions(artifacts, write_lines(tmp_path / "e.jsonl", 4, 0), 1))
    assert isinstance(strategy, SplitStrategy) and strategy.settings() == {}
    manifest = strategy.head.manifest
    batch, length = manifest.batch_size, manifest.max_seq_len
    rng = np.random.default_rng(0)
    tensors = {
        "activations": rng.standard_normal(manifest.activations_shape).astype(np.float32),
        "attention_mask": np.ones((batch, length), dtype=np.int64),
        "labels": rng.integers(0, manifest.vocab_size, (batch, length)),
    }
    strategy.check_step(tensors)
    before = strategy.tail_state()["lora"]
    outcome = strategy.train_step(tensors)
    assert outcome.loss > 0 and outcome.activation_grads is not None
    assert outcome.activation_grads.shape == manifest.activations_shape
    assert any(not np.array_equal(before[n], v) for n, v in strategy.tail_state()["lora"].items())  # it learnt
    with pytest.raises(TrainingError, match="NaN"):
        strategy.check_step({**tensors, "activations": tensors["activations"] * np.nan})
    with pytest.raises(TrainingError, match="vocabulary"):
        strategy.check_step({**tensors, "labels": tensors["labels"] + manifest.vocab_size})
    adapters = strategy.welcome_tensors()
    with pytest.raises(TrainingError, match="AdapterUpdate carries"):
        strategy.check_update({"stranger": np.zeros(2, dtype=np.float32)})
    ones = {k: np.ones_like(v) for k, v in adapters.items()}
    threes = {k: np.full_like(v, 3.0) for k, v in adapters.items()}
    strategy.check_update(ones)
    merged = strategy.aggregate([(ones, 1), (threes, 1)])
    assert all(np.allclose(v, 2.0) for v in merged.values())
    assert strategy.welcome_tensors() is merged  # the next Welcome carries the new global adapters
    assert strategy.evaluate() > 0


def test_split_refuses_full_model_artifacts_and_the_others_refuse_activations(tiny_artifacts) -> None:
    with pytest.raises(ArtifactError, match="--full-model export"):
        SplitStrategy(StrategyOptions(tiny_artifacts("llama", full_model=True)))
    strategy = build_strategy("fedllm", StrategyOptions(tiny_artifacts("llama", full_model=True)))
    with pytest.raises(ProtocolError, match="send no activations"):
        strategy.check_step({})
    assert strategy.tail_state()["lora"] == {}  # nothing of the server's own to checkpoint


def test_every_framework_has_a_strategy_a_trainer_and_a_name_in_the_protocol() -> None:
    # Adding a framework is one strategy (server), one trainer (client) and its name in the protocol's
    # settings record, which both sides validate: the three lists must name the same frameworks.
    from edgesplit.client.session_settings import FRAMEWORKS as PROTOCOL_FRAMEWORKS
    from edgesplit.client.trainers import TRAINERS
    from edgesplit.server.strategies import STRATEGIES

    assert set(STRATEGIES) == set(TRAINERS) == set(PROTOCOL_FRAMEWORKS)


def test_a_checkpoint_for_other_adapters_is_refused_before_anything_is_copied() -> None:
    import numpy as np
    import pytest

    from edgesplit.errors import ArtifactError
    from edgesplit.server.strategies import load_global_adapters

    live = {"layers.0.self_attn.q_proj.lora_A": np.zeros((2, 4), np.float32)}
    with pytest.raises(ArtifactError, match="unknown: \\['lora.0.q_proj.A'\\].*fresh --checkpoint-dir"):
        load_global_adapters(live, {"lora.0.q_proj.A": np.ones((2, 4), np.float32)})
    with pytest.raises(ArtifactError, match="shape \\(2, 3\\)"):
        load_global_adapters(live, {"layers.0.self_attn.q_proj.lora_A": np.ones((2, 3), np.float32)})
    assert not live["layers.0.self_attn.q_proj.lora_A"].any()
    load_global_adapters(live, {"layers.0.self_attn.q_proj.lora_A": np.ones((2, 4), np.float32)})
    assert live["layers.0.self_attn.q_proj.lora_A"].all()


def test_eval_data_with_no_target_token_in_the_window_is_refused_at_start(tiny_artifacts, tmp_path) -> None:
    from edgesplit.errors import DataError

    long_prompt = " ".join(f"w{i}" for i in range(40))  # far past the 16-token window: no completion token left
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text(json.dumps({"prompt": long_prompt, "completion": "w1 w2"}) + "\n")
    options = StrategyOptions(artifacts=tiny_artifacts("llama"), eval_data=eval_data, eval_batches=2)
    with pytest.raises(DataError, match="none of its 1 examples keeps a completion token.*window of 16 tokens"):
        build_strategy("split", options)
    fine = write_lines(tmp_path / "fine.jsonl", 4, 0)
    assert build_strategy("split", StrategyOptions(artifacts=tiny_artifacts("llama"), eval_data=fine)).eval_set
