"""The adapter out of a federation: loaded with plain transformers + peft, it computes the split model's logits.

A short real run (a server and one client over websockets) trains both halves; the exported adapter on the
whole base model, and the merged weights, must give the logits of the ONNX head with the global adapters
followed by the PyTorch tail with its LoRA.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from loopback import federated_run
from transformers import AutoModelForCausalLM

from edgesplit.cli import main as edgesplit_main
from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError
from edgesplit.lora_names import parse_adapter_name
from edgesplit.server.adapter import CONFIG_FILE, WEIGHTS_FILE, export_adapter
from edgesplit.server.checkpoint import load_latest
from edgesplit.server.tail import Tail

ROUNDS, STEPS, LEARNING_RATE = 2, 2, 0.02


def write_data(path: Path) -> None:
    rng = np.random.default_rng(1)
    lines = []
    for _ in range(8):
        a = int(rng.integers(0, 60))
        lines.append(json.dumps({"prompt": f"w{a} w{a + 3}", "completion": f"w{a + 1} w{a + 2}"}))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def trained(tiny_artifacts, tmp_path_factory) -> dict[str, tuple[Path, Path]]:  # type: ignore[no-untyped-def]
    """family -> (artifacts, checkpoint directory) of a finished short run, one per family."""
    runs = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"run-{family}")
        artifacts = tiny_artifacts(family, 1)
        write_data(root / "data.jsonl")
        asyncio.run(federated_run(artifacts, root / "data.jsonl", root / "ckpt", ROUNDS, STEPS, LEARNING_RATE))
        runs[family] = (artifacts, root / "ckpt")
    return runs


def split_logits(artifacts: Path, checkpoint_dir: Path, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The split model's logits (B, T, V): the ONNX head with the global adapters, then the tail with its LoRA."""
    checkpoint = load_latest(checkpoint_dir)
    assert checkpoint is not None
    activations = Head(artifacts, verify=False).forward(input_ids, mask, checkpoint.global_adapters).activations
    tail = Tail(artifacts)
    with torch.no_grad():
        for name, parameter in tail.adapters.items():
            parameter.copy_(torch.from_numpy(checkpoint.tail_lora[name]))
        logits = tail._logits(torch.from_numpy(activations), torch.from_numpy(mask))  # (B, T, V)
    return logits.numpy()


def model_logits(model: torch.nn.Module, input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        output = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask), use_cache=False)
    return output.logits.float().numpy()  # type: ignore[no-any-return]


def sample_batch(artifacts: Path) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) token ids and mask as the head was traced for; the second row right-padded."""
    manifest = Head(artifacts, verify=False).manifest
    rows, width = manifest.batch_size, manifest.max_seq_len
    input_ids = np.random.default_rng(3).integers(3, manifest.vocab_size - 32, size=(rows, width)).astype(np.int64)
    mask = np.ones((rows, width), dtype=np.int64)
    mask[1, width // 2 :] = 0
    input_ids[mask == 0] = manifest.pad_token_id or 0
    return input_ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_and_merged_model_give_the_split_models_logits(trained, tmp_path, family) -> None:
    from peft import PeftModel

    artifacts, checkpoint_dir = trained[family]
    finished, adapter_dir = export_adapter(checkpoint_dir, artifacts, tmp_path / "adapter")
    assert finished == ROUNDS
    assert (adapter_dir / CONFIG_FILE).is_file() and (adapter_dir / WEIGHTS_FILE).is_file()
    base_dir = json.loads((adapter_dir / CONFIG_FILE).read_text())["base_model_name_or_path"]

    input_ids, mask = sample_batch(artifacts)
    expected = split_logits(artifacts, checkpoint_dir, input_ids, mask)
    real = mask.astype(bool)  # padded positions are never read: compare where the mask is 1

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    from_peft = model_logits(peft_model, input_ids, mask)
    np.testing.assert_allclose(from_peft[real], expected[real], rtol=1e-4, atol=1e-4)

    # The adapter matters: the base model alone is measurably elsewhere, so the match above is no accident.
    base_only = model_logits(AutoModelForCausalLM.from_pretrained(base_dir), input_ids, mask)
    assert np.abs(base_only[real] - expected[real]).max() > 1e-3

    _, merged_dir = export_adapter(checkpoint_dir, artifacts, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not hasattr(merged, "peft_config")
    np.testing.assert_allclose(model_logits(merged, input_ids, mask)[real], expected[real], rtol=1e-4, atol=1e-4)


def test_a_chosen_round_is_exported_and_a_missing_one_is_refused(trained, tmp_path) -> None:
    artifacts, checkpoint_dir = trained[FAMILIES[0]]
    finished, _ = export_adapter(checkpoint_dir, artifacts, tmp_path / "first", round_number=1)
    assert finished == 1
    with pytest.raises(ArtifactError, match=r"no round 9 \(rounds there: 1, 2\)"):
        export_adapter(checkpoint_dir, artifacts, tmp_path / "late", round_number=9)


def test_no_checkpoint_is_a_clear_error_from_the_command(trained, tmp_path, capsys) -> None:
    artifacts, _ = trained[FAMILIES[0]]
    argv = ["adapter", "--checkpoint", str(tmp_path / "nowhere"), "--artifacts", str(artifacts)]
    assert edgesplit_main([*argv, "--out", str(tmp_path / "out")]) == 1
    assert "no checkpoint directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no finished round"):
        export_adapter(tmp_path / "empty", artifacts, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_artifacts_of_another_cut_or_model_are_refused(trained, tiny_artifacts, tmp_path) -> None:
    llama_artifacts, checkpoint_dir = trained["llama"]
    with pytest.raises(ArtifactError, match="do not match these artifacts"):
        export_adapter(checkpoint_dir, tiny_artifacts("llama", 2), tmp_path / "other-cut")
    with pytest.raises(ArtifactError, match="do not match these artifacts"):
        export_adapter(checkpoint_dir, tiny_artifacts("gpt2", 1), tmp_path / "other-model")
    assert not (tmp_path / "other-cut").exists() and not (tmp_path / "other-model").exists()

    # A tail LoRA that lost a layer's matrix is refused too, naming it.
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint_dir, broken)
    from safetensors.numpy import load_file, save_file

    latest = broken / (broken / "latest").read_text().strip() / "tail_lora.safetensors"
    tail = load_file(str(latest))
    dropped = sorted(tail)[0]
    del tail[dropped]
    save_file(tail, str(latest))
    with pytest.raises(ArtifactError, match=dropped.replace(".", r"\.")):
        export_adapter(broken, llama_artifacts, tmp_path / "out")


def test_the_commands_export_an_adapter_and_generate_with_it(trained, tmp_path, capsys) -> None:
    artifacts, checkpoint_dir = trained[FAMILIES[0]]
    adapter_dir = tmp_path / "my-adapter"
    argv = ["adapter", "--checkpoint", str(checkpoint_dir), "--artifacts", str(artifacts), "--out", str(adapter_dir)]
    assert edgesplit_main(argv) == 0
    said = capsys.readouterr().out
    assert f"round {ROUNDS} written to {adapter_dir}" in said and "edgesplit generate --adapter" in said

    out = tmp_path / "outputs.jsonl"
    argv = ["generate", "--adapter", str(adapter_dir), "--prompt", "w4 w7", "--max-new-tokens", "3", "--out", str(out)]
    assert edgesplit_main(argv) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == "w4 w7\n" and isinstance(record["output"], str)  # as training formats it


@pytest.mark.parametrize("family", FAMILIES)
def test_the_gguf_adapter_holds_the_matrices_under_llama_cpp_names(trained, tmp_path, family) -> None:
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from edgesplit.server.adapter import load_round_adapters, round_directory, write_gguf_for_base

    artifacts, checkpoint_dir = trained[family]
    manifest = Head(artifacts, verify=False).manifest
    _, head, tail = load_round_adapters(round_directory(checkpoint_dir, None))
    adapters = {**head, **tail}
    path = write_gguf_for_base(manifest, artifacts, adapters, tmp_path / "adapter.gguf")

    reader = gguf.GGUFReader(str(path))
    alpha_field = reader.fields[gguf.Keys.Adapter.LORA_ALPHA]
    assert float(alpha_field.parts[alpha_field.data[0]][0]) == manifest.lora.alpha
    tensors = {tensor.name: np.asarray(tensor.data) for tensor in reader.tensors}
    assert len(tensors) == len(adapters)
    # The reading side's own inverse (transformers' loader of llama.cpp files) must give back PEFT's matrices.
    config = json.loads((artifacts / "tail" / "config.json").read_text())
    processor = LlamaTensorProcessor(config=config)
    module_names = {"self_attn.q_proj": "attn_q", "self_attn.v_proj": "attn_v", "attn.c_attn": "attn_qkv"}
    for name, value in adapters.items():
        parsed = parse_adapter_name(name)
        stored = tensors[f"blk.{parsed.layer}.{module_names[parsed.module_path]}.weight.lora_{parsed.matrix.lower()}"]
        if family == "llama" and parsed.matrix == "B":  # B's rows are the weight's rows; A's columns are not
            stored = processor.process(stored, f"blk.{parsed.layer}.{module_names[parsed.module_path]}.weight").weights
        np.testing.assert_array_equal(stored, value, err_msg=name)
    if family == "llama":  # q's B really was reordered: the plain copy would not pass the check above
        q_b = adapters["layers.2.self_attn.q_proj.lora_B"]
        assert not np.array_equal(tensors["blk.2.attn_q.weight.lora_b"], q_b)


def test_a_gguf_base_gets_the_gguf_adapter_beside_the_peft_one(trained, tmp_path) -> None:
    artifacts, checkpoint_dir = trained["llama"]
    from_gguf = tmp_path / "artifacts"
    shutil.copytree(artifacts, from_gguf)
    manifest = json.loads((from_gguf / "manifest.json").read_text())
    manifest["model"]["source"] = str(tmp_path / "base.Q4_1.gguf")  # as an export of a .gguf file records it
    (from_gguf / "manifest.json").write_text(json.dumps(manifest))

    _, adapter_dir = export_adapter(checkpoint_dir, from_gguf, tmp_path / "adapter")
    assert (adapter_dir / "adapter.gguf").is_file() and (adapter_dir / WEIGHTS_FILE).is_file()
    _, plain_dir = export_adapter(checkpoint_dir, artifacts, tmp_path / "plain")
    assert not (plain_dir / "adapter.gguf").exists()


def test_no_gguf_adapter_for_a_base_whose_gguf_layout_is_unknown(tmp_path) -> None:
    """Qwen2 shares the llama family's layer layout, not Llama's GGUF layout (no interleaved q and k rows)."""
    from types import SimpleNamespace

    from edgesplit.server.adapter import write_gguf_for_base

    manifest = SimpleNamespace(architecture="Qwen2ForCausalLM", family="llama")
    with pytest.raises(ArtifactError, match="no GGUF adapter for a Qwen2ForCausalLM base"):
        write_gguf_for_base(manifest, tmp_path, {}, tmp_path / "adapter.gguf")  # type: ignore[arg-type]
    assert not (tmp_path / "adapter.gguf").exists()
