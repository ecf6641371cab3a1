"""The int8 layouts: blocked DequantizeLinear (and MatMulNBits' blocks) and the aligned external data file,
checked against numpy and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesplit.export.onnx_files import ALIGN_MIN_BYTES, ALIGNMENT, save_with_aligned_data
from edgesplit.export.quantize import (
    BLOCK_SIZE,
    dequantize_blocks,
    quantize_blocks,
    quantize_blocks_along_k,
    quantize_model,
)


@pytest.mark.parametrize("k", [BLOCK_SIZE * 3, BLOCK_SIZE * 3 + 5])  # a whole number of blocks, and a ragged end
def test_blocks_round_trip_within_half_a_step(k: int) -> None:
    weights = np.random.default_rng(0).standard_normal((k, 24)).astype(np.float32)
    weights[7, 3] = 40.0  # an outlier only costs its own block precision
    codes, scales = quantize_blocks(weights)
    assert codes.dtype == np.uint8 and codes.shape == (24, -(-k // BLOCK_SIZE), BLOCK_SIZE)
    restored = dequantize_blocks(codes, scales, k)
    step = np.repeat(scales.reshape(24, -1), BLOCK_SIZE, axis=1)[:, :k].T
    assert np.all(np.abs(restored - weights) <= step / 2 + 1e-6)
    assert np.abs(restored - weights)[BLOCK_SIZE:, 3].max() < 0.05  # the other blocks of column 3 kept their scale


def matmul_model(weights: np.ndarray) -> onnx.ModelProto:
    k, n = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, n])],
        [numpy_helper.from_array(weights, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("k", [160, 150])  # a whole number of blocks, and a ragged end
def test_matmul_becomes_blocked_dequantize_that_either_route_runs(tmp_path: Path, k: int) -> None:
    from edgesplit.client.cpu import Route
    from edgesplit.client.head import ROUTE_SESSION_CONFIG

    rng = np.random.default_rng(1)
    weights = (rng.standard_normal((k, 96)) * 0.05).astype(np.float32)
    x = rng.standard_normal((8, k)).astype(np.float32)
    model = matmul_model(weights)
    report = quantize_model(model)
    assert report.quantized == ["w"] and [n.op_type for n in model.graph.node] == ["DequantizeLinear", "MatMul"]
    assert next(e.version for e in model.opset_import if e.domain == "") == 21
    assert report.bytes_after < 0.3 * report.bytes_before
    save_with_aligned_data(model, tmp_path / "q.onnx")
    codes, scales = quantize_blocks_along_k(weights)
    dequantized = codes.astype(np.float32) * np.repeat(scales, BLOCK_SIZE, axis=0)[:k]
    assert np.abs(dequantized - weights).max() <= scales.max() / 2 + 1e-6
    exact = x @ weights
    outputs = {}
    for route, config in ROUTE_SESSION_CONFIG.items():
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{route.value}.onnx")
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        outputs[route] = ort.InferenceSession(str(tmp_path / "q.onnx"), options).run(None, {"x": x})[0]
        ops = [n.op_type for n in onnx.load(str(tmp_path / f"{route.value}.onnx")).graph.node]
        # What the route means: the runtime's int8 kernel, or a float MatMul on weights dequantised at load.
        assert ops == (["MatMulNBits"] if route is Route.INT8_DOT else ["MatMul"]), (route, ops)
    # Dequantised at load: float32 products of the int8 weights, to float rounding.
    np.testing.assert_allclose(outputs[Route.FP32_DEQUANTISED], x @ dequantized, rtol=1e-4, atol=1e-5)
    # int8 dot products also round x per block of 32 to int8: a little further from the exact product.
    assert np.linalg.norm(outputs[Route.INT8_DOT] - exact) / np.linalg.norm(exact) < 0.03


def test_external_data_is_page_aligned_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tensors = {
        "big": rng.standard_normal((ALIGN_MIN_BYTES // 4 + 3,)).astype(np.float32),
        "small": np.arange(3, dtype=np.float32),
        "ints": rng.integers(0, 100, (50, 11)).astype(np.int64),
        "big2": rng.standard_normal((ALIGN_MIN_BYTES // 4,)).astype(np.float32),
    }
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}.out"]) for name in tensors],
        "constants",
        [],
        [
            helper.make_tensor_value_info(f"{name}.out", helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in tensors.items()
        ],
        [numpy_helper.from_array(value, name) for name, value in tensors.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    save_with_aligned_data(model, tmp_path / "m.onnx")
    stored = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    offsets = {
        t.name: int(next(e.value for e in t.external_data if e.key == "offset"))
        for t in stored.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }
    assert set(offsets) == {"big", "ints", "big2"}  # "small" is under the threshold and stays in the graph
    assert offsets["big"] % ALIGNMENT == 0 and offsets["big2"] % ALIGNMENT == 0  # the large ones can be mapped
    assert offsets["ints"] % ALIGNMENT != 0  # a medium one is packed right after the tensor before it
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    for tensor in loaded.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(tensor), tensors[tensor.name])
    outputs = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {})
    for value, expected in zip(outputs, tensors.values(), strict=True):
        np.testing.assert_array_equal(value, expected)
