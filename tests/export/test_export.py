"""The exporter on tiny models of every family: the ONNX head, its gradient graph and the tail are exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FAMILIES
from transformers import AutoModelForCausalLM

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError, ExportError
from edgesplit.export.exporter import ExportConfig, export
from edgesplit.export.families import family_for, prepare_for_training
from edgesplit.export.lora import HeadWithLora
from edgesplit.server.tail import Tail


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-12))


def load_reference(model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    prepare_for_training(model)
    return model.eval()


def batch(head: Head, seed: int = 0, pad_from: int | None = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (head.manifest.batch_size, head.manifest.max_seq_len)
    input_ids = rng.integers(3, head.manifest.vocab_size, size=shape).astype(np.int64)
    attention_mask = np.ones(shape, dtype=np.int64)
    if pad_from is not None:  # right padding on the last row
        attention_mask[-1, pad_from:] = 0
        input_ids[-1, pad_from:] = 0
    return input_ids, attention_mask


def random_adapters(head: Head, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) * 0.2).astype(np.float32) for n, s in head.manifest.lora.matrices.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cut", ["first", "last"])
@pytest.mark.parametrize("pad_from", [None, 11])
def test_head_matches_pytorch_hidden_state(tiny_artifacts, tiny_model_dirs, family, cut, pad_from) -> None:
    reference = load_reference(tiny_model_dirs[family])
    num_layers = family_for(reference).num_layers(reference)
    cut_layer = 1 if cut == "first" else num_layers - 1
    head = Head(tiny_artifacts(family, cut_layer))
    input_ids, attention_mask = batch(head, pad_from=pad_from)
    activations = head.forward(input_ids, attention_mask, head.initial_adapters()).activations
    with torch.no_grad():
        hidden = reference(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            output_hidden_states=True,
        ).hidden_states[cut_layer]
    assert activations.shape == (2, 16, 32)
    assert relative_error(activations, hidden.numpy()) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cut_layer", [1, 2])
def test_gradient_graph_matches_autograd(tiny_artifacts, tiny_model_dirs, family, cut_layer) -> None:
    head = Head(tiny_artifacts(family, cut_layer))
    adapters = random_adapters(head, seed=1)  # B non-zero, so that every gradient is non-zero
    input_ids, attention_mask = batch(head, seed=2)
    activation_grads = np.random.default_rng(3).standard_normal(head.manifest.activations_shape).astype(np.float32)
    forward = head.forward(input_ids, attention_mask, adapters)
    grads = head.backward(forward, activation_grads)

    reference = load_reference(tiny_model_dirs[family])
    fam = family_for(reference)
    lora = head.manifest.lora
    torch_head = HeadWithLora(fam.build_head(reference, cut_layer), fam, lora.rank, lora.alpha, lora.targets)
    matrices = {n: torch.from_numpy(v.copy()).requires_grad_(True) for n, v in adapters.items()}
    activations = torch_head(torch.from_numpy(input_ids), torch.from_numpy(attention_mask), matrices)
    (activations * torch.from_numpy(activation_grads)).sum().backward()

    assert set(grads) == set(matrices)
    assert relative_error(forward.activations, activations.detach().numpy()) < 1e-4
    for name, tensor in matrices.items():
        assert tensor.grad is not None and float(tensor.grad.abs().max()) > 0
        assert relative_error(grads[name], tensor.grad.numpy()) < 1e-3, name


@pytest.mark.parametrize("family", FAMILIES)
def test_head_then_tail_equals_full_model(tiny_artifacts, tiny_model_dirs, family) -> None:
    artifacts = tiny_artifacts(family, 2)
    head = Head(artifacts)
    tail = Tail(artifacts)
    input_ids, attention_mask = batch(head, seed=4)
    activations = head.forward(input_ids, attention_mask, head.initial_adapters()).activations
    with torch.no_grad():
        split_logits = tail._logits(torch.from_numpy(activations), torch.from_numpy(attention_mask))
        full_logits = load_reference(tiny_model_dirs[family])(
            input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask)
        ).logits
    assert relative_error(split_logits.numpy(), full_logits.numpy()) < 1e-4


def test_manifest_describes_the_files(tiny_artifacts) -> None:
    artifacts = tiny_artifacts("llama", 1)
    manifest = load_manifest(artifacts)
    assert manifest.cut_layer == 1 and manifest.num_layers == 3 and manifest.hidden_size == 32
    assert {
        "head.onnx",
        "head_grad.onnx",
        "head_adapters.safetensors",
        "tokenizer.json",
        "tail/config.json",
        "tail/model.safetensors",
        "tail/lora.json",
    } <= set(manifest.files)
    assert [s.name for s in manifest.head_inputs][:2] == ["input_ids", "attention_mask"]
    assert {f"grad.{n}" for n in manifest.lora.matrices} == {s.name for s in manifest.grad_outputs}
    assert "activation_grads" in {s.name for s in manifest.grad_inputs}
    assert manifest.lora.matrices["layers.0.self_attn.q_proj.lora_A"] == (4, 32)
    assert manifest.lora.matrices["layers.0.self_attn.v_proj.lora_B"] == (16, 4)  # 2 KV heads of 8
    initial = Head(artifacts).initial_adapters()
    assert all(not initial[n].any() for n in initial if n.endswith(".lora_B"))  # B starts at zero, as LoRA does
    assert all(initial[n].any() for n in initial if n.endswith(".lora_A"))
    tail_config = json.loads((artifacts / "tail" / "config.json").read_text())
    assert tail_config["num_hidden_layers"] == 2


def test_tokenizer_json_needs_no_transformers(tiny_artifacts) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_artifacts("llama", 1) / "tokenizer.json"))
    assert tokenizer.encode("w1 w2 w3", add_special_tokens=False).ids == [4, 5, 6]


def test_int8_head_trains_and_stays_close(tiny_artifacts) -> None:
    fp32 = Head(tiny_artifacts("llama", 2))
    int8 = Head(tiny_artifacts("llama", 2, quantize="int8"))

    def head_bytes(head: Head) -> int:
        return sum((head.root / name).stat().st_size for name in ("head.onnx", "head.onnx.data"))

    assert head_bytes(int8) < head_bytes(fp32)
    ops = {node.op_type for node in onnx.load(str(int8.root / "head_grad.onnx"), load_external_data=False).graph.node}
    assert "DequantizeLinear" in ops and "MatMul" in ops  # frozen weights quantised; LoRA and attention matmuls not
    assert int8.manifest.int8_layout == "dequantize-linear"
    adapters = random_adapters(fp32, seed=5)
    input_ids, attention_mask = batch(fp32, seed=6)
    a = fp32.forward(input_ids, attention_mask, adapters)
    b = int8.forward(input_ids, attention_mask, adapters)
    assert relative_error(b.activations, a.activations) < 0.05
    grads = np.ones(fp32.manifest.activations_shape, dtype=np.float32)
    ga, gb = fp32.backward(a, grads), int8.backward(b, grads)
    for name in ga:
        assert relative_error(gb[name], ga[name]) < 0.1, name


def test_frozen_head_has_no_gradient_graph(tiny_artifacts) -> None:
    artifacts = tiny_artifacts("gpt2", 1, frozen_head=True)
    manifest = load_manifest(artifacts)
    assert manifest.frozen_head and "head_grad.onnx" not in manifest.files
    head = Head(artifacts)
    assert not head.trainable
    input_ids, attention_mask = batch(head)
    assert head.forward(input_ids, attention_mask, {}).activations.shape == (2, 16, 32)


@pytest.mark.parametrize("cut_layer", [0, 3, 7, -1])
def test_out_of_range_cut_is_refused(tiny_model_dirs, tmp_path, cut_layer) -> None:
    with pytest.raises(ExportError, match="between 1 and 2"):
        export(ExportConfig(model=str(tiny_model_dirs["llama"]), cut_layer=cut_layer, out=tmp_path / "a"))
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_non_integer_cut_is_refused_by_the_cli(tmp_path, capsys) -> None:
    from edgesplit.export.cli import main

    with pytest.raises(SystemExit):
        main(["--cut-layer", "two", "--out", str(tmp_path / "a")])
    assert "must be an integer" in capsys.readouterr().err


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ExportError, match="hub id, a local model directory"):
        export(ExportConfig(model=str(tmp_path / "no-such-model"), cut_layer=1, out=tmp_path / "a"))


def test_unreadable_gguf_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ExportError, match="could not load model"):
        export(ExportConfig(model=str(bad), cut_layer=1, out=tmp_path / "a"))
    assert not (tmp_path / "a").exists()


def test_existing_output_needs_force(tiny_model_dirs, tmp_path) -> None:
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export(ExportConfig(model=str(tiny_model_dirs["llama"]), cut_layer=1, out=out))
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_output_is_a_clear_error(tiny_model_dirs, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(ExportError, match="cannot write"):
        export(ExportConfig(model=str(tiny_model_dirs["llama"]), cut_layer=1, out=blocker / "sub" / "artifacts"))


def test_unsupported_architecture_names_the_supported_ones(tmp_path) -> None:
    from transformers import BertConfig, BertForMaskedLM

    from edgesplit.export.families import family_for

    with pytest.raises(ExportError, match="llama"):
        family_for(
            BertForMaskedLM(
                BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32)
            )
        )


def test_tampered_artifact_is_refused(tiny_artifacts, tmp_path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_artifacts("llama", 1), copy)
    with (copy / "head_grad.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="head_grad.onnx does not match its manifest"):
        Head(copy)
    (copy / "head_grad.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_manifest(copy)
