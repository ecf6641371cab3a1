"""Weight-only int8 quantisation of the head's frozen weights, per output channel.

Activations stay float32: MISSION.md measured 16% relative error at layer 4 for dynamic (per-tensor,
activation-quantising) int8, too lossy for training. Here only the frozen weights shrink, and each output
channel gets its own scale, so the error is that of rounding each weight to 1/254 of its channel's range.

Two rewrites, both plain ONNX ops that every ONNX Runtime build runs (x86, arm64):
  MatMul(x, W)      ->  MatMul(x, DequantizeLinear(W_q, scale[N], axis=1))          W: (K, N), N outputs
  Gather(E, ids)    ->  Cast(Gather(E_q, ids)) * Unsqueeze(Gather(scale[V], ids))    E: (V, H), a row each
The LoRA matrices are graph inputs, not initializers, so they stay float32 and trainable; the gradient graph
gets the same treatment for the weights it holds. ONNX Runtime keeps DequantizeLinear of a constant out of
constant folding, so the weights stay int8 in memory and are dequantised one matrix at a time while running.

ONNX Runtime 1.32 (the version measured) fuses DequantizeLinear + MatMul into its 8-bit MatMulNBits (blocks
of 32 along K, accuracy_level 4: activations quantised per block of 32 to int8, integer dot products), so
the matmuls run ~1.3x faster than float32 on an AVX-512 VNNI core, and the activations' error at SmolLM2's
layer 4 goes from 1.2% (weights alone, accuracy_level 0) to 1.5%; runtimes without 8-bit MatMulNBits (added
in 1.22) run the plain DequantizeLinear + MatMul. Writing MatMulNBits ourselves was measured too: no faster
than the fused form, ~15 MB less resident after loading, but a contrib op that older runtimes cannot run.

Why not onnxruntime.quantization / optimum: their dynamic and static modes quantise activations too (the
16% above); their weight-only mode (MatMulNBits) is 4-bit-first and blockwise, and leaves Gather alone, where
the embedding table is most of the head's bytes. See docs/export.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

MIN_ELEMENTS = 4096  # smaller constants (norm weights, masks) are not worth a scale tensor


@dataclass
class QuantizeReport:
    quantized: list[str]
    skipped: list[str]
    bytes_before: int
    bytes_after: int


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    return uses


def quantize_per_channel(weights: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis`: weights ~= q * scale."""
    reduce_axes = tuple(i for i in range(weights.ndim) if i != axis)
    peak = np.max(np.abs(weights), axis=reduce_axes)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    shape = [1] * weights.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
    return quantized, scale


def quantize_model(model: onnx.ModelProto) -> QuantizeReport:
    """Rewrite `model` in place: 2-D float initializers used as MatMul weights or Gather tables become int8."""
    graph = model.graph
    uses = _consumers(graph)
    report = QuantizeReport([], [], 0, 0)
    new_nodes: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []  # (anchor, nodes to insert before it)
    kept: list[onnx.TensorProto] = []
    added: list[onnx.TensorProto] = []
    for initializer in graph.initializer:
        weights = numpy_helper.to_array(initializer)
        size = weights.nbytes
        report.bytes_before += size
        consumers = uses.get(initializer.name, [])
        is_matmul = consumers and all(n.op_type == "MatMul" and i == 1 for n, i in consumers)
        is_gather = consumers and all(n.op_type == "Gather" and i == 0 for n, i in consumers)
        eligible = weights.dtype == np.float32 and weights.ndim == 2 and weights.size >= MIN_ELEMENTS
        if not eligible or not (is_matmul or is_gather):
            if eligible:
                report.skipped.append(initializer.name)
            kept.append(initializer)
            report.bytes_after += size
            continue
        name = initializer.name
        axis = 1 if is_matmul else 0
        quantized, scale = quantize_per_channel(weights, axis)
        added += [numpy_helper.from_array(quantized, f"{name}.int8"), numpy_helper.from_array(scale, f"{name}.scale")]
        report.bytes_after += quantized.nbytes + scale.nbytes
        report.quantized.append(name)
        if is_matmul:
            dequantize = helper.make_node(
                "DequantizeLinear", [f"{name}.int8", f"{name}.scale"], [name], name=f"{name}.dequantize", axis=1
            )
            new_nodes.append((consumers[0][0], [dequantize]))
            continue
        for position, (gather, _) in enumerate(consumers):
            ids = gather.input[1]
            prefix = f"{name}.gather{position}"
            nodes = [
                helper.make_node("Gather", [f"{name}.int8", ids], [f"{prefix}.rows"], name=f"{prefix}.rows", axis=0),
                helper.make_node("Cast", [f"{prefix}.rows"], [f"{prefix}.float"], name=f"{prefix}.cast", to=1),
                helper.make_node("Gather", [f"{name}.scale", ids], [f"{prefix}.scale"], name=f"{prefix}.scales"),
                helper.make_node("Unsqueeze", [f"{prefix}.scale", f"{prefix}.axes"], [f"{prefix}.scale2"]),
                helper.make_node("Mul", [f"{prefix}.float", f"{prefix}.scale2"], [gather.output[0]]),
            ]
            added.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{prefix}.axes"))
            new_nodes.append((gather, nodes))
    # Rebuild the node list in order: replacement nodes go where the anchor stood; replaced Gathers go away.
    replaced = {id(anchor) for anchor, nodes in new_nodes if anchor.op_type == "Gather" and len(nodes) > 1}
    inserts: dict[int, list[onnx.NodeProto]] = {}
    for anchor, nodes in new_nodes:
        inserts.setdefault(id(anchor), []).extend(nodes)
    ordered: list[onnx.NodeProto] = []
    for node in graph.node:
        ordered.extend(inserts.get(id(node), []))
        if id(node) not in replaced:
            ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    return report
