"""Rewrite a dynamic-length head's two graphs so that the client holds each frozen weight once (client/fed.py).

Run on the exported float32 graphs, around the int8 quantiser:

  take_out_embedding   (before)  the forward's Gather(table, input_ids) becomes a graph input, input_embeds
  share_weights        (before)  each large MatMul (or Gemm) weight of the forward is renamed frozen.<n>; a backward
                                 weight that is one of them transposed (torch's backward multiplies by W^T)
                                 becomes Gemm(x, frozen.<n>, transB=1) on x flattened to 2-D, one equal to one
                                 of them reads it by name
  quantize_model                 (int8) puts a DequantizeLinear before each product: the same codes in both
  feed_frozen          (after)   every frozen.* constant leaves both graphs for graph inputs; the arrays go to
                                 head_weights.safetensors
  order_dequantize     (after)   each DequantizeLinear of a fed weight waits for its product's input (a
                                 zero from Shape(x) added to its scales): ONNX Runtime otherwise ran a third
                                 of them first, which held 33 MB of float32 weights for the whole forward

Why Gemm: the backward needs x @ W^T. MatMul(x, Transpose(W)) would make the runtime keep a transposed
copy, and com.microsoft's FusedMatMul with transB transposed a copy at each step (measured: 158 MB more at
the peak); Gemm's transB is the GEMM kernel's own.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgesplit.client.fed import EMBEDDINGS_INPUT, FROZEN_PREFIX, TABLE, TABLE_INT8, TABLE_SCALE
from edgesplit.errors import ExportError
from edgesplit.export.quantize import MIN_ELEMENTS, input_uses, quantize_per_channel


def _rename_input(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if value == old else value for value in node.input]


def _is_weight(tensor: onnx.TensorProto, uses: dict[str, list[tuple[onnx.NodeProto, int]]]) -> bool:
    """A 2-D float32 constant of at least MIN_ELEMENTS read only as a MatMul's right-hand side."""
    consumers = uses.get(tensor.name, [])
    size = int(np.prod(tensor.dims)) if tensor.dims else 0
    return (
        tensor.data_type == onnx.TensorProto.FLOAT
        and len(tensor.dims) == 2
        and size >= MIN_ELEMENTS
        and bool(consumers)
        and all(_right_hand_side(node, index) for node, index in consumers)
    )


def _right_hand_side(node: onnx.NodeProto, index: int) -> bool:
    """`node` multiplies by its input `index` as it is: MatMul's B, or a Gemm's B without transB (GPT-2)."""
    if index != 1:
        return False
    if node.op_type == "MatMul":
        return True
    attributes = {attribute.name: attribute.i for attribute in node.attribute}
    return node.op_type == "Gemm" and not attributes.get("transA", 0) and not attributes.get("transB", 0)


_VIEWS = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast")  # keep the ids' order and values


def _from_input_ids(producers: dict[str, onnx.NodeProto], name: str) -> bool:
    """Whether `name` is input_ids, or input_ids through reshapes and casts only (GPT-2 views them first)."""
    while name != "input_ids":
        node = producers.get(name)
        if node is None or node.op_type not in _VIEWS:
            return False
        name = node.input[0]
    return True


def take_out_embedding(forward: onnx.ModelProto) -> np.ndarray:
    """Remove the forward's token embedding lookup; the graph takes its result as `input_embeds` (B, T, H)."""
    graph = forward.graph
    constants = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    lookups = [
        node
        for node in graph.node
        if node.op_type == "Gather"
        and node.input[0] in constants
        and all(attribute.i == 0 for attribute in node.attribute if attribute.name == "axis")
        and _from_input_ids(producers, node.input[1])
    ]
    if len(lookups) != 1:
        raise ExportError(f"the head's graph looks up its token embeddings {len(lookups)} times; expected once")
    lookup = lookups[0]
    table = numpy_helper.to_array(constants[lookup.input[0]])
    if table.ndim != 2:
        raise ExportError(f"the token embedding table has shape {table.shape}; expected (vocab, hidden)")
    # The lookup's result keeps its name (a graph output, when the backward reads it); where the ids were
    # reshaped first, the rows (B, T, H) are reshaped to the ids' shape.
    if lookup.input[1] == "input_ids":
        nodes = [helper.make_node("Identity", [EMBEDDINGS_INPUT], [lookup.output[0]], name="embeddings")]
    else:
        width = "embeddings.width"
        graph.initializer.append(numpy_helper.from_array(np.array([table.shape[1]], dtype=np.int64), width))
        nodes = [
            helper.make_node("Shape", [lookup.input[1]], ["embeddings.ids_shape"], name="embeddings.ids_shape"),
            helper.make_node("Concat", ["embeddings.ids_shape", width], ["embeddings.shape"], axis=0),
            helper.make_node("Reshape", [EMBEDDINGS_INPUT, "embeddings.shape"], [lookup.output[0]], name="embeddings"),
        ]
    position = list(graph.node).index(lookup)
    graph.node.remove(lookup)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    if not input_uses(graph).get(lookup.input[0]):
        graph.initializer.remove(constants[lookup.input[0]])
    ids = next(value for value in graph.input if value.name == "input_ids")
    dims: list[Any] = [dim.dim_param or dim.dim_value for dim in ids.type.tensor_type.shape.dim]
    graph.input.append(helper.make_tensor_value_info(EMBEDDINGS_INPUT, onnx.TensorProto.FLOAT, [*dims, table.shape[1]]))
    return table


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def share_weights(forward: onnx.ModelProto, backward: onnx.ModelProto | None) -> int:
    """Name the forward's weights frozen.<n> and point the backward's copies (transposed or not) at them.

    Returns how many backward weights now read a forward one. A backward weight that matches none stays a
    constant of its own graph.
    """
    uses = input_uses(forward.graph)
    weights: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(list(forward.graph.initializer)):
        if not _is_weight(tensor, uses):
            continue
        name = f"{FROZEN_PREFIX}{index}"
        _rename_input(forward.graph, tensor.name, name)
        tensor.name = name
        weights[name] = numpy_helper.to_array(tensor)
    if backward is None:
        return 0
    same = {_digest(array): name for name, array in weights.items()}
    transposed = {_digest(array.T): name for name, array in weights.items()}
    graph = backward.graph
    uses = input_uses(graph)
    shared = 0
    added: set[str] = set()
    for tensor in list(graph.initializer):
        if not _is_weight(tensor, uses):
            continue
        digest = _digest(numpy_helper.to_array(tensor))
        if digest in same:
            _rename_input(graph, tensor.name, same[digest])
            target = same[digest]
        elif digest in transposed:
            target = transposed[digest]
            for node, _ in uses[tensor.name]:
                if node.op_type == "Gemm":  # already 2-D: read the forward's weight transposed
                    node.input[1] = target
                    _set_attribute(node, "transB", 1)
                else:
                    _gemm_transposed(graph, node, target, weights[target].shape)
        else:
            continue
        graph.initializer.remove(tensor)
        if target not in added:
            graph.initializer.append(numpy_helper.from_array(weights[target], target))
            added.add(target)
        shared += 1
    return shared


def _set_attribute(node: onnx.NodeProto, name: str, value: int) -> None:
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _gemm_transposed(graph: onnx.GraphProto, matmul: onnx.NodeProto, weight: str, shape: tuple[int, ...]) -> None:
    """Replace MatMul(x, W^T) (x: (..., N)) by Gemm on x flattened to (-1, N) and `weight` W (K, N), transB."""
    k, n = shape
    prefix = f"{matmul.name or matmul.output[0]}.gemm"
    constants = {
        f"{prefix}.rows": np.array([-1, n], dtype=np.int64),
        f"{prefix}.width": np.array([k], dtype=np.int64),
        f"{prefix}.start": np.array([0], dtype=np.int64),
        f"{prefix}.end": np.array([-1], dtype=np.int64),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    x = matmul.input[0]
    nodes = [
        helper.make_node("Reshape", [x, f"{prefix}.rows"], [f"{prefix}.x2"], name=f"{prefix}.flatten"),
        helper.make_node("Gemm", [f"{prefix}.x2", weight], [f"{prefix}.y2"], name=prefix, transB=1),
        helper.make_node("Shape", [x], [f"{prefix}.shape"], name=f"{prefix}.shape"),
        helper.make_node("Slice", [f"{prefix}.shape", f"{prefix}.start", f"{prefix}.end"], [f"{prefix}.lead"]),
        helper.make_node("Concat", [f"{prefix}.lead", f"{prefix}.width"], [f"{prefix}.out"], axis=0),
        helper.make_node("Reshape", [f"{prefix}.y2", f"{prefix}.out"], list(matmul.output), name=f"{prefix}.unflatten"),
    ]
    position = list(graph.node).index(matmul)
    graph.node.remove(matmul)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)


def feed_frozen(forward: onnx.ModelProto, backward: onnx.ModelProto | None) -> dict[str, np.ndarray]:
    """Turn every frozen.* constant of both graphs into a graph input; return the arrays, once each."""
    arrays: dict[str, np.ndarray] = {}
    for model in (forward, backward):
        if model is None:
            continue
        graph = model.graph
        for tensor in list(graph.initializer):
            if not tensor.name.startswith(FROZEN_PREFIX):
                continue
            array = numpy_helper.to_array(tensor)
            previous = arrays.setdefault(tensor.name, array)
            if previous.shape != array.shape or not np.array_equal(previous, array):
                raise ExportError(f"{tensor.name} differs between the head's two graphs")
            graph.initializer.remove(tensor)
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(array.shape)))
    return arrays


def order_dequantize(model: onnx.ModelProto) -> int:
    """Make each DequantizeLinear of a fed weight wait for the input of the product that reads it.

    Adds Shape(x)[0] * 0 to its scales: a data dependency that costs a few scalar operations, where nothing
    else tells ONNX Runtime's ordering that the dequantised weight is not needed before x exists. Returns
    how many were ordered.
    """
    graph = model.graph
    fed = {value.name for value in graph.input if value.name.startswith(FROZEN_PREFIX)}
    uses = input_uses(graph)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), "order.start"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "order.end"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "order.zero"),
        ]
    )
    ordered: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in fed and uses.get(node.output[0]):
            x = uses[node.output[0]][0][0].input[0]
            prefix = f"{node.output[0]}.after"
            ordered += [
                helper.make_node("Shape", [x], [f"{prefix}.shape"]),
                helper.make_node("Slice", [f"{prefix}.shape", "order.start", "order.end"], [f"{prefix}.size"]),
                helper.make_node("Cast", [f"{prefix}.size"], [f"{prefix}.float"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [f"{prefix}.float", "order.zero"], [f"{prefix}.zero"]),
                helper.make_node("Add", [node.input[1], f"{prefix}.zero"], [f"{prefix}.scales"]),
            ]
            node.input[1] = f"{prefix}.scales"
            count += 1
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    return count


def table_tensors(table: np.ndarray, quantize: str) -> dict[str, np.ndarray]:
    """The embedding table as head_weights.safetensors holds it: float32, or int8 rows with a scale each."""
    if quantize != "int8":
        return {TABLE: np.ascontiguousarray(table, dtype=np.float32)}
    codes, scale = quantize_per_channel(table.astype(np.float32), 0)
    return {TABLE_INT8: codes, TABLE_SCALE: scale}
