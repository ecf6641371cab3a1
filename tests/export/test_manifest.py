"""The manifest (schema 2): stages with where they run, their layers, files and named tensors; old schemas are
refused; a tail runs any layer range of its stage and names its adapters by absolute layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesplit.client.artifacts import SCHEMA_VERSION, Manifest, Stage, TensorSpec, load_manifest
from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError
from edgesplit.lora_names import parse_adapter_name
from edgesplit.server.tail import Tail


def test_stages_describe_head_gradient_graph_and_tail(tiny_artifacts) -> None:
    manifest = load_manifest(tiny_artifacts("llama", 1))
    assert manifest.schema_version == SCHEMA_VERSION == 2
    head, grad, tail = manifest.stages
    assert (head.name, head.runs_on, head.first_layer, head.end_layer) == ("head", "device", 0, 1)
    assert (grad.name, grad.runs_on, grad.layers) == ("head_grad", "device", range(0, 1))
    assert (tail.name, tail.runs_on, tail.layers) == ("tail", "server", range(1, 3))
    assert "head.onnx" in head.files and "head_grad.onnx" in grad.files
    assert set(tail.files) == {"tail/config.json", "tail/model.safetensors", "tail/lora.json"}
    assert {name for stage in manifest.stages for name in stage.files} <= set(manifest.files)
    assert [s.name for s in tail.inputs] == ["activations", "attention_mask", "labels"]
    assert tail.outputs[1] == TensorSpec("activation_grads", "float32", (2, 16, 32))
    # What other code reads keeps its meaning, now derived from the stages.
    assert manifest.cut_layer == 1 and not manifest.full_model and not manifest.frozen_head
    assert manifest.head_inputs == head.inputs and manifest.grad_outputs == grad.outputs
    assert manifest.activations_shape == (2, 16, 32)
    assert set(manifest.lora.matrices) == {s.name for s in head.inputs if s.name.startswith("layers.")}
    assert all(parse_adapter_name(name).layer == 0 for name in manifest.lora.matrices)
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest


def test_a_frozen_or_tailless_export_lists_only_what_it_wrote(tiny_artifacts) -> None:
    frozen = load_manifest(tiny_artifacts("gpt2", 1, frozen_head=True))
    assert [s.name for s in frozen.stages] == ["head", "tail"] and frozen.frozen_head
    assert frozen.lora.matrices == {} and frozen.grad_inputs == ()
    head_only = load_manifest(tiny_artifacts("llama", 2, write_tail=False))
    assert [s.name for s in head_only.stages] == ["head", "head_grad"] and head_only.cut_layer == 2
    with pytest.raises(ArtifactError, match="no 'tail' stage"):
        head_only.stage("tail")


def rewrite_manifest(source: Path, target: Path, change) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(source, target)
    raw = json.loads((target / "manifest.json").read_text())
    change(raw)
    (target / "manifest.json").write_text(json.dumps(raw))
    return target


def test_a_schema_1_manifest_is_refused_with_what_to_do(tiny_artifacts, tmp_path) -> None:
    def as_schema_1(raw: dict) -> None:  # type: ignore[type-arg]
        raw["schema_version"] = 1
        del raw["stages"]  # schema 1 had none: the version must be read before anything else
        raw["cut_layer"] = 1

    old = rewrite_manifest(tiny_artifacts("llama", 1), tmp_path / "old", as_schema_1)
    for load in (load_manifest, Head, Tail):
        with pytest.raises(ArtifactError, match="schema version 1.*re-export the artifacts with this version"):
            load(old)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw["stages"][2].update(runs_on="phone"), "runs on 'phone'"),
        (lambda raw: raw["stages"][2].update(layers=[2, 3]), "the tail starts at layer 2, the head ends at 1"),
        (lambda raw: raw["stages"][2].update(layers=[1, 9]), "ends at layer 9 of 3"),
        (lambda raw: raw["stages"][0]["files"].append("nowhere.onnx"), "does not list"),
        (lambda raw: raw["stages"].pop(0), "no 'head' stage"),
        (lambda raw: raw["stages"][0].pop("inputs"), "malformed"),
    ],
)
def test_a_bad_stage_is_a_clear_error(tiny_artifacts, tmp_path, change, message) -> None:  # type: ignore[no-untyped-def]
    bad = rewrite_manifest(tiny_artifacts("llama", 1), tmp_path / "bad", change)
    with pytest.raises(ArtifactError, match=message):
        load_manifest(bad, verify=False)


def test_a_stage_checks_its_fields() -> None:
    with pytest.raises(ArtifactError, match="first <= end"):
        Stage("head", "device", 3, 1, (), (), ())
    spec = TensorSpec("x", "float32", (1,))
    with pytest.raises(ArtifactError, match="twice"):
        Stage("head", "device", 0, 1, (), (spec, spec), ())
    with pytest.raises(ArtifactError, match="not a list of sizes"):
        TensorSpec("x", "float32", (-1,))


def test_the_tail_names_adapters_by_absolute_layer_and_runs_any_range(tiny_artifacts) -> None:
    artifacts = tiny_artifacts("gpt2", 1)
    whole = Tail(artifacts)
    assert (whole.first_layer, whole.end_layer) == (1, 3)
    assert set(whole.lora_state()) == {
        f"layers.{layer}.attn.c_attn.lora_{matrix}" for layer in (1, 2) for matrix in ("A", "B")
    }
    last = Tail(artifacts, first_layer=2)
    assert set(last.lora_state()) == {"layers.2.attn.c_attn.lora_A", "layers.2.attn.c_attn.lora_B"}

    rng = np.random.default_rng(0)
    activations = rng.standard_normal((2, 16, 32)).astype(np.float32)
    mask = np.ones((2, 16), dtype=np.int64)
    labels = rng.integers(0, 128, size=(2, 16))
    # The layers past the cut are the same weights whichever tail holds them: a tail of layer 2 alone gives
    # the same logits as the whole tail fed with what layer 1 made of the activations.
    import torch

    with torch.no_grad():
        hidden = whole.model(inputs_embeds=torch.from_numpy(activations), output_hidden_states=True).hidden_states[1]
        np.testing.assert_allclose(
            last._logits(hidden, torch.from_numpy(mask)).numpy(),
            whole._logits(torch.from_numpy(activations), torch.from_numpy(mask)).numpy(),
            rtol=1e-4,
            atol=1e-5,
        )
    norm_only = Tail(artifacts, first_layer=3)  # no layer: the final norm and the LM head
    assert norm_only.lora_state() == {}
    loss, grads = norm_only.train_step(activations, mask, labels)
    assert np.isfinite(loss) and grads is not None and grads.shape == activations.shape
    with pytest.raises(ArtifactError, match=r"\[0, 3\) is not within the exported tail stage's \[1, 3\)"):
        Tail(artifacts, first_layer=0)


def test_tail_state_loads_back_by_name_and_refuses_a_foreign_one(tiny_artifacts) -> None:
    tail = Tail(tiny_artifacts("llama", 1))
    state = tail.state_dict()
    changed = {name: value + 1.0 for name, value in state["lora"].items()}
    tail.load_state_dict({"lora": changed, "optimizer": state["optimizer"]})
    assert all(np.array_equal(tail.lora_state()[name], changed[name]) for name in changed)
    renumbered = {name.replace("layers.1.", "layers.0."): value for name, value in changed.items()}
    with pytest.raises(ArtifactError, match="do not fit this tail"):
        tail.load_state_dict({"lora": renumbered, "optimizer": state["optimizer"]})
