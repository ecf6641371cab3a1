"""A dynamic-length head's frozen weights are held once by the client and fed to both graphs (client/fed.py,
export/fed.py): neither graph keeps a weight of its own, the backward reads the forward's arrays (the very same
numpy objects), the embedding rows come from the file one token at a time, and a damaged weights file is
refused with a line that says to export again. That the fed head computes what the PyTorch head computes, at
every length and in a real run, is tests/server/test_dynamic_seq.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file

from edgesplit.client.artifacts import LAYOUT_FED, load_manifest
from edgesplit.client.cpu import Route
from edgesplit.client.fed import (
    EMBEDDINGS_INPUT,
    FROZEN_PREFIX,
    TABLE,
    TABLE_INT8,
    TABLE_SCALE,
    WEIGHTS_FILE,
    FedWeights,
)
from edgesplit.client.head import Head
from edgesplit.errors import ArtifactError, TrainingError
from edgesplit.export.quantize import MIN_ELEMENTS

FAMILY = "llama"


@pytest.fixture(scope="module")
def fp32(tiny_artifacts) -> Path:  # type: ignore[no-untyped-def]
    return tiny_artifacts(FAMILY, 1, dynamic_seq=True)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def int8(tiny_artifacts) -> Path:  # type: ignore[no-untyped-def]
    return tiny_artifacts(FAMILY, 1, dynamic_seq=True, quantize="int8")  # type: ignore[no-any-return]


def _large_constants(path: Path) -> list[str]:
    graph = onnx.load(str(path)).graph
    return [t.name for t in graph.initializer if len(t.dims) == 2 and int(np.prod(t.dims)) >= MIN_ELEMENTS]


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_neither_graph_holds_a_weight_and_the_backward_reads_the_forwards(kind: str, request: Any) -> None:
    root: Path = request.getfixturevalue(kind)
    manifest = load_manifest(root)
    assert manifest.fed_weights == WEIGHTS_FILE and WEIGHTS_FILE in manifest.stage("head").files
    assert WEIGHTS_FILE in manifest.stage("head_grad").files
    assert manifest.int8_layout == (LAYOUT_FED if kind == "int8" else None)
    assert _large_constants(root / "head.onnx") == [] and _large_constants(root / "head_grad.onnx") == []

    forward_inputs = {i.name for i in onnx.load(str(root / "head.onnx")).graph.input}
    backward_inputs = {i.name for i in onnx.load(str(root / "head_grad.onnx")).graph.input}
    frozen_forward = {name for name in forward_inputs if name.startswith(FROZEN_PREFIX)}
    frozen_backward = {name for name in backward_inputs if name.startswith(FROZEN_PREFIX)}
    assert EMBEDDINGS_INPUT in forward_inputs and frozen_forward
    assert frozen_backward and frozen_backward <= frozen_forward  # no weight of the backward's own
    stored = load_file(str(root / WEIGHTS_FILE))
    assert {name for name in stored if name.startswith(FROZEN_PREFIX)} == frozen_forward
    codes = [stored[name] for name in frozen_forward if name.endswith(".q8")]
    assert (len(codes) > 0) == (kind == "int8") and all(code.dtype == np.int8 for code in codes)

    head = Head(root)
    graphs = next(iter(head._graphs.values()))
    assert head.route == (Route.INT8_HELD.value if kind == "int8" else "fp32")
    for name in frozen_backward:  # one array in memory, handed to both sessions
        assert graphs.backward_fed[name] is graphs.forward_fed[name] is head.fed.arrays[name]  # type: ignore[union-attr]
    if kind == "int8":  # each dequantisation waits for its product's input (export/fed.py: order_dequantize)
        for path in (root / "head.onnx", root / "head_grad.onnx"):
            nodes = onnx.load(str(path)).graph.node
            fed_dequantize = [
                n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0].startswith(FROZEN_PREFIX)
            ]
            assert fed_dequantize and all(n.input[1].endswith(".after.scales") for n in fed_dequantize)


@pytest.mark.parametrize("kind", ["fp32", "int8"])
def test_embedding_rows_are_read_from_the_file_as_the_table_holds_them(kind: str, request: Any) -> None:
    root: Path = request.getfixturevalue(kind)
    manifest = load_manifest(root)
    stored = load_file(str(root / WEIGHTS_FILE))
    table = stored[TABLE] if kind == "fp32" else stored[TABLE_INT8].astype(np.float32) * stored[TABLE_SCALE][:, None]
    fed = FedWeights(root / WEIGHTS_FILE, manifest.vocab_size)
    ids = np.array([[0, 5, 5, manifest.vocab_size - 1], [7, 0, 3, 3]], dtype=np.int64)
    np.testing.assert_array_equal(fed.embed(ids), table[ids])
    with pytest.raises(TrainingError, match=f"token ids must lie in 0..{manifest.vocab_size - 1}"):
        fed.embed(np.array([[manifest.vocab_size]]))


def test_the_exported_table_is_the_models(fp32: Path, tiny_model_dirs: dict[str, Path]) -> None:
    from safetensors.numpy import load_file as load_numpy

    model_weights = load_numpy(str(next(tiny_model_dirs[FAMILY].glob("*.safetensors"))))
    table = next(value for name, value in model_weights.items() if name.endswith("embed_tokens.weight"))
    np.testing.assert_array_equal(load_file(str(fp32 / WEIGHTS_FILE))[TABLE], table)


def test_a_damaged_weights_file_is_refused_with_what_to_do(fp32: Path, tmp_path: Path) -> None:
    copy = tmp_path / "artifacts"
    shutil.copytree(fp32, copy)
    weights = copy / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:4])
    with pytest.raises(ArtifactError, match="not a safetensors file.*export again"):
        Head(copy, verify=False)
    stored = load_file(str(fp32 / WEIGHTS_FILE))
    from safetensors.numpy import save_file

    save_file({name: value for name, value in stored.items() if name != TABLE}, str(weights))
    with pytest.raises(ArtifactError, match="holds no embedding table"):
        Head(copy, verify=False)
    save_file({TABLE: stored[TABLE][:3]}, str(weights))
    with pytest.raises(ArtifactError, match="the manifest's vocabulary"):
        Head(copy, verify=False)
    save_file({name: value for name, value in stored.items() if not name.startswith(FROZEN_PREFIX)}, str(weights))
    with pytest.raises(ArtifactError, match="which the head's graphs take: export again"):
        Head(copy, verify=False)


def test_a_backward_weight_is_the_forwards_transposed(fp32: Path) -> None:
    """What share_weights matched: the Gemm reads the forward's (K, N) weight with transB."""
    forward = onnx.load(str(fp32 / "head.onnx"))
    backward = onnx.load(str(fp32 / "head_grad.onnx"))
    gemms = [n for n in backward.graph.node if n.op_type == "Gemm"]
    assert gemms and all(n.input[1].startswith(FROZEN_PREFIX) for n in gemms)
    assert all(any(a.name == "transB" and a.i == 1 for a in n.attribute) for n in gemms)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in forward.graph.input}
    assert all(len(shapes[n.input[1]]) == 2 for n in gemms)


def test_weights_in_graphs_keeps_the_old_layout_and_computes_the_same(
    int8: Path, fp32: Path, tiny_artifacts: Any
) -> None:
    in_graphs = tiny_artifacts(FAMILY, 1, dynamic_seq=True, quantize="int8", weights_in_graphs=True)
    manifest = load_manifest(in_graphs)
    assert manifest.fed_weights is None and manifest.int8_layout == "dequantize-linear"
    assert not (in_graphs / WEIGHTS_FILE).exists() and _large_constants(in_graphs / "head_grad.onnx")
    held, graphs = Head(int8), Head(in_graphs, int8_route=Route.FP32_DEQUANTISED)
    # The int8 head held once does not fragment the arena over changing lengths; the others shrink it after a run.
    assert held._run_options is None and graphs._run_options is not None and Head(fp32)._run_options is not None
    rng = np.random.default_rng(0)
    ids = rng.integers(0, manifest.vocab_size, (manifest.batch_size, 7))
    mask = np.ones_like(ids)
    adapters = held.initial_adapters()
    np.testing.assert_allclose(
        held.forward(ids, mask, adapters).activations,
        graphs.forward(ids, mask, adapters).activations,
        rtol=1e-5,
        atol=1e-5,
    )


def test_weights_in_graphs_without_dynamic_seq_is_refused() -> None:
    from edgesplit.errors import ExportError
    from edgesplit.export.exporter import ExportConfig

    with pytest.raises(ExportError, match="--weights-in-graphs goes with --dynamic-seq"):
        ExportConfig(max_seq_len=16, weights_in_graphs=True)


def test_gpt2_whose_ids_are_viewed_first_and_whose_weights_are_gemms_is_fed_too(tiny_artifacts: Any) -> None:
    """GPT-2 reshapes input_ids before its lookup and multiplies by Conv1D weights with Gemm: the lookup still
    leaves the graph, the layer weights are fed, and the export's self-check (against PyTorch) passed."""
    root = tiny_artifacts("gpt2", 1, dynamic_seq=True)
    manifest = load_manifest(root)
    assert manifest.fed_weights == WEIGHTS_FILE and manifest.self_check is not None
    forward = onnx.load(str(root / "head.onnx")).graph
    assert EMBEDDINGS_INPUT in {i.name for i in forward.input}
    assert [name for name in _large_constants(root / "head.onnx") if "wte" in name or "h_" in name] == []
    assert [name for name in _large_constants(root / "head_grad.onnx") if "_h_" in name] == []
    head = Head(root)
    ids = np.arange(2 * 5).reshape(2, 5) % manifest.vocab_size
    step = head.forward(ids, np.ones_like(ids), head.initial_adapters())
    grads = head.backward(step, np.full(step.activations.shape, 1e-3, dtype=np.float32))
    assert set(grads) == set(manifest.lora.matrices) and all(np.all(np.isfinite(g)) for g in grads.values())
