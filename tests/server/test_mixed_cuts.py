"""A federation of devices at different cuts: one mixed-cut export, a real server, three real clients at
cuts 1, 2 and 3 (the third chosen by its device profile); and, with every client at one cut, the server
computes exactly what it computes for a single-cut export."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from loopback import Processes, client_command, free_port, serve_command, write_task

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.data import encode_examples, load_tokenizer, read_jsonl
from edgesplit.client.metrics import read_jsonl as read_metrics
from edgesplit.server.aggregate import fedavg
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.strategies import SplitStrategy, StrategyOptions, load_global_adapters

sys.path.insert(0, str(Path(__file__).parents[1]))
from tiny_models import save_tiny_model  # noqa: E402

ROUNDS, STEPS = 2, 3
EXPORT = dict(batch_size=2, max_seq_len=16, lora_rank=4, lora_alpha=8.0)
CUTS = {"a": 1, "b": 2, "c": 3}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("deep") / "llama4", num_hidden_layers=4)


@pytest.fixture(scope="module")
def mixed_artifacts(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgesplit.export.exporter import ExportConfig, export

    out = tmp_path_factory.mktemp("mixed") / "artifacts"
    export(ExportConfig(model=str(model_dir), cut_layers=(1, 2, 3), out=out, **EXPORT))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def run(mixed_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("run")
    for seed, name in enumerate(CUTS):
        write_task(work / f"{name}.jsonl", seed=seed + 1, count=12 + 8 * seed)
    write_task(work / "eval.jsonl", seed=9, count=8)
    port = free_port()
    chosen = {"a": ["--cut-layer", "1"], "b": ["--cut-layer", "2"]}
    # c names no cut: its profile and budget choose (the deepest cut that fits 4 GB: 3).
    chosen["c"] = ["--device-profile", "raspberry-pi-4", "--max-memory-mb", "4000"]
    extra = ["--eval-data", str(work / "eval.jsonl")]
    with Processes() as processes:
        server = processes.start(
            "server", serve_command(mixed_artifacts, port, work, rounds=ROUNDS, steps=STEPS, min_clients=3, extra=extra)
        )
        server.wait_for("listening on")
        clients = {
            name: processes.start(
                name,
                client_command(
                    f"ws://127.0.0.1:{port}", mixed_artifacts, work / f"{name}.jsonl", name, work, chosen[name]
                ),
            )
            for name in CUTS
        }
        codes = {name: client.wait(240) for name, client in clients.items()}
        server_code = server.wait(60)
        outputs = {name: client.output for name, client in clients.items()}
        return {"work": work, "codes": codes, "outputs": outputs, "server": server.output, "server_code": server_code}


def test_three_clients_at_three_cuts_train_together(run) -> None:  # type: ignore[no-untyped-def]
    for name, code in run["codes"].items():
        assert code == 0, f"client {name} failed:\n{run['outputs'][name]}"
    assert run["server_code"] == 0, run["server"]
    assert f"round {ROUNDS}/{ROUNDS} closed with 3 clients" in run["server"]
    assert "cut 3: the deepest exported cut" in run["outputs"]["c"]  # chosen, and why, printed
    records = read_metrics(run["work"] / "server.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    assert {r["client_id"]: r["cut_layer"] for r in steps} == CUTS
    rounds = [r for r in records if r["event"] == "round"]
    assert rounds[-1]["cut_layers"] == CUTS
    evals = [r["eval_loss"] for r in records if r["event"] in ("eval", "round")]
    assert evals[-1] < evals[0]  # the federation learnt


def test_each_adapter_is_averaged_over_whoever_trained_it(run, mixed_artifacts: Path) -> None:  # type: ignore[no-untyped-def]
    checkpoint = load_latest(run["work"] / "ckpt")
    assert checkpoint is not None and checkpoint.round == ROUNDS
    assert checkpoint.extra["cut_layers"] == CUTS
    updates, samples = checkpoint.updates, checkpoint.extra["num_samples"]
    # Each device sent its own layers only.
    for name, cut in CUTS.items():
        assert {int(n.split(".")[1]) for n in updates[name]} == set(range(cut))
    # Layer 0 is every device's and no tail's: plain FedAvg.
    layer0 = [({n: v for n, v in updates[c].items() if n.startswith("layers.0.")}, samples[c]) for c in CUTS]
    for name, value in fedavg(layer0).items():
        np.testing.assert_allclose(checkpoint.global_adapters[name], value, rtol=1e-6, atol=1e-7)
    # Layers 1 and 2 are also the tail's: the result was written back into it, one value per adapter.
    shared = [n for n in checkpoint.global_adapters if not n.startswith("layers.0.")]
    assert shared and {int(n.split(".")[1]) for n in shared} == {1, 2}
    for name in shared:
        assert np.array_equal(checkpoint.global_adapters[name], checkpoint.tail_lora[name])
    # A restarted server takes the checkpoint back as it was written.
    strategy = SplitStrategy(StrategyOptions(mixed_artifacts))
    load_global_adapters(strategy.global_adapters, checkpoint.global_adapters)
    strategy.load_tail_state({"lora": checkpoint.tail_lora, "optimizer": checkpoint.tail_optimizer})
    assert set(strategy.client_adapters(2)) == {
        n for n in checkpoint.global_adapters if n[:9] in ("layers.0.", "layers.1.")
    }
    # The PEFT adapter of the whole model: layer 0 from the devices, the other layers from the tail.
    from safetensors.numpy import load_file

    from edgesplit.server.adapter import export_adapter

    out = run["work"] / "adapter"
    export_adapter(run["work"] / "ckpt", mixed_artifacts, out)
    written = load_file(str(out / "adapter_model.safetensors"))
    assert len(written) == len(checkpoint.tail_lora) + 4  # layers 1-3 from the tail, layer 0's four matrices


def test_with_every_client_at_one_cut_the_server_computes_what_a_single_cut_export_gives(
    mixed_artifacts: Path, model_dir: Path, tmp_path: Path
) -> None:
    from edgesplit.export.exporter import ExportConfig, export

    single = tmp_path / "single"
    export(ExportConfig(model=str(model_dir), cut_layer=1, out=single, **EXPORT))  # type: ignore[arg-type]
    # The cut's device artifact is the single-cut export's head, file for file; the tail is the same.
    device, whole = load_manifest(mixed_artifacts / "cut1"), load_manifest(single)
    assert device.files == {n: h for n, h in whole.files.items() if not n.startswith("tail/")}
    mixed = load_manifest(mixed_artifacts)
    assert {n: h for n, h in mixed.files.items() if n.startswith("tail/")} == {
        n: h for n, h in whole.files.items() if n.startswith("tail/")
    }
    servers = [SplitStrategy(StrategyOptions(single)), SplitStrategy(StrategyOptions(mixed_artifacts))]
    write_task(tmp_path / "data.jsonl", seed=4, count=6)
    encoded = encode_examples(load_tokenizer(single), read_jsonl(tmp_path / "data.jsonl"), 16, whole.eos_token_id, 0)
    rng = np.random.default_rng(0)
    for step in range(3):
        rows = np.arange(2 * step, 2 * step + 2)
        adapters = servers[0].global_adapters
        activations = servers[0].head.forward(encoded.input_ids[rows], encoded.attention_mask[rows], adapters)
        tensors = {
            "activations": activations.activations,
            "attention_mask": encoded.attention_mask[rows],
            "labels": encoded.labels[rows],
        }
        single_step, mixed_step = servers[0].train_step(tensors), servers[1].train_step(tensors, 1)
        assert single_step.loss == mixed_step.loss
        assert np.array_equal(single_step.activation_grads, mixed_step.activation_grads)
    updates = [
        ({n: rng.normal(size=v.shape).astype(np.float32) for n, v in servers[0].global_adapters.items()}, count)
        for count in (3, 5, 11)
    ]
    single_result, mixed_result = servers[0].aggregate(updates), servers[1].aggregate(updates)
    for name, value in single_result.items():
        assert np.array_equal(mixed_result[name], value)
    single_tail, mixed_tail = servers[0].tail_state()["lora"], servers[1].tail_state()["lora"]
    assert single_tail.keys() == mixed_tail.keys()
    assert all(np.array_equal(single_tail[n], mixed_tail[n]) for n in single_tail)


def test_a_client_of_a_mixed_export_must_say_which_cut(mixed_artifacts: Path, tmp_path: Path) -> None:
    from edgesplit.client.client_cli import main as client_main
    from edgesplit.errors import ArtifactError

    common = ["--server", "ws://127.0.0.1:9", "--artifacts", str(mixed_artifacts), "--data", str(tmp_path / "x")]
    with pytest.raises(ArtifactError, match=r"holds heads for cuts \[1, 2, 3\]: choose one with --cut-layer"):
        client_main([*common, "--client-id", "a"])
    with pytest.raises(ArtifactError, match=r"no head for cut 5: the exported cuts are \[1, 2, 3\]"):
        client_main([*common, "--client-id", "a", "--cut-layer", "5"])
    with pytest.raises(ArtifactError, match="no exported cut fits raspberry-pi-4's budget of 10 MiB"):
        client_main([*common, "--client-id", "a", "--device-profile", "raspberry-pi-4", "--max-memory-mb", "10"])


def test_the_server_admits_a_client_at_an_exported_cut_only(mixed_artifacts: Path) -> None:
    from edgesplit.errors import ArtifactError

    manifest = load_manifest(mixed_artifacts)
    assert manifest.cut_layers == (1, 2, 3) and manifest.cut_layer == 1
    cut2 = load_manifest(mixed_artifacts / "cut2").manifest_hash
    assert manifest.client_cut(cut2, 2) == 2 and manifest.client_cut(cut2, None) == 2
    with pytest.raises(ArtifactError, match="says cut 3 but runs the artifacts of cut 2"):
        manifest.client_cut(cut2, 3)
    assert manifest.client_cut("0" * 16, 2) is None  # unknown artifacts: the fingerprint check refuses them
