"""Weight-only int8 quantisation of the head's frozen weights: blocks of 32 weights along the input dimension.

Activations are not quantised ahead of time: MISSION.md measured 16% relative error at layer 4 for dynamic
(per-tensor, activation-quantising) int8, too lossy for training, and on SmolLM2's head at cut 4 this module's
measurements agree (14% on the activations, 40-80% on the LoRA gradients when every matmul of the forward and
the gradient graph quantises its input per tensor). Here the frozen weights shrink, each block of 32 weights
along K with its own scale:

  MatMul(x, W)      ->  MatMul(x, DequantizeLinear(W_q, scales, axis=0, block_size=32))    W: (K, N), W_q int8
  Gather(E, ids)    ->  Cast(Gather(E_q, ids)) * Unsqueeze(Gather(scale[V], ids))          E: (V, H), a row each

The blocked DequantizeLinear (ONNX opset 21) says only what the weights are; the device's ONNX Runtime
chooses at load how to multiply by them (the client's route, edgesplit/client/cpu.py, picks the session
option):
  - int8-dot: its QDQ fusion turns DequantizeLinear + MatMul into MatMulNBits (ONNX Runtime's block-quantised
    matmul, 8-bit on CPU since 1.22) with `session.qdq_matmulnbits_accuracy_level` 4: each block of 32
    activations is quantised to int8 on the fly and multiplied with integer dot products (VNNI on x86, the
    dot-product instructions on arm64);
  - fp32-dequantised: with `session.disable_quant_qdq` the fusion is off and constant folding dequantises
    each weight once, at load: plain float32 MatMul, the fp32 head's speed on a CPU without integer dot
    products (the file stays int8; the memory of those weights is the fp32 head's).
The manifest says so (`int8_layout`: "dequantize-linear"). Older int8 exports wrote MatMulNBits nodes directly
and have no int8_layout: they always run int8-dot.

Measured on this repository's benchmark machine
(2-core AMD EPYC with AVX-512 VNNI, ONNX Runtime 1.32, SmolLM2 cut 4, batch 4 x 128, against the fp32 head):

  form                                        step    activations  LoRA grads (max, median)
  DequantizeLinear per channel (the old one)  1.00x   1.5%         12.7%, 6.8%
  MatMulNBits, blocks of 32, accuracy 4       0.97x   1.3%          7.5%, 5.4%
  MatMulNBits, blocks of 32, accuracy 0       1.20x   0.6%          3.3%, 2.6%   (weights only, fp32 compute)
  DynamicQuantizeMatMul (per-tensor inputs)   0.50x   14%          80%, 40%

ONNX Runtime 1.32 already fused the old DequantizeLinear + MatMul into MatMulNBits with per-channel scales,
so the speed is the same; per-block scales halve the gradient error, and writing MatMulNBits directly saves
the fused copy of each weight that the runtime made at load (see docs/benchmarks.md for the memory).

The LoRA matrices are graph inputs, not initializers, so they stay float32 and trainable; the gradient graph
gets the same treatment for the (transposed) weights it holds.

Why not onnxruntime.quantization / optimum: their dynamic and static modes quantise activations per tensor
(the 14-16% above); their weight-only mode (MatQuantizer, MatMulNBits) is 4-bit-first (4-bit weights gave
~10% error on one random-weight matmul here, 8-bit 0.8%) and leaves Gather alone, where the embedding table
is most of the head's bytes. See docs/export.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEQUANTIZE_OPSET = 21  # blocked DequantizeLinear (block_size) is opset 21
MIN_ELEMENTS = 1024  # smaller constants (norm weights, masks, tiny test layers) are not worth a scale tensor
BLOCK_SIZE = 32  # weights per scale along K in MatMulNBits
ACCURACY_LEVEL = 4  # MatMulNBits may quantise its input per block to int8 and use integer dot products
MS_DOMAIN = "com.microsoft"


@dataclass
class QuantizeReport:
    quantized: list[str]
    skipped: list[str]
    bytes_before: int
    bytes_after: int


def input_uses(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
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


def quantize_blocks(weights: np.ndarray, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' 8-bit layout for a (K, N) weight: codes (N, blocks, block_size) uint8, scales (N * blocks).

    Symmetric: each block of `block_size` weights along K (zero-padded at the end) gets scale = max|w| / 127,
    and the codes are round(w / scale) + 128, the zero point MatMulNBits assumes for 8 bits when none is given.
    """
    k, n = weights.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = weights
    by_block = padded.T.reshape(n, blocks, block_size)
    peak = np.max(np.abs(by_block), axis=2)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.round(by_block / scale[:, :, None]), -127, 127).astype(np.int16) + 128
    return codes.astype(np.uint8), scale.reshape(-1)


def quantize_blocks_along_k(weights: np.ndarray, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Blocked DequantizeLinear's layout for a (K, N) weight: codes (K, N) int8, scales (ceil(K / block), N).

    The same symmetric blocks as `quantize_blocks` (scale = max|w| / 127 over each block of `block_size`
    along K; the last block may be short), without a zero point.
    """
    k, n = weights.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = weights
    peak = np.max(np.abs(padded.reshape(blocks, block_size, n)), axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.round(weights / np.repeat(scale, block_size, axis=0)[:k]), -127, 127).astype(np.int8)
    return codes, scale


def dequantize_blocks(codes: np.ndarray, scale: np.ndarray, k: int) -> np.ndarray:
    """The (K, N) float32 weight that `quantize_blocks`' codes stand for (for tests and error reports)."""
    n, blocks, block_size = codes.shape
    values = (codes.astype(np.float32) - 128.0) * scale.reshape(n, blocks)[:, :, None]
    return np.ascontiguousarray(values.reshape(n, blocks * block_size)[:, :k].T)


def quantize_model(model: onnx.ModelProto) -> QuantizeReport:
    """Rewrite `model` in place: 2-D float initializers used as MatMul weights or Gather tables become int8.

    MatMul weights become int8 blocks behind a blocked DequantizeLinear (the model moves to opset 21);
    embedding tables become int8 rows with a scale each.
    """
    graph = model.graph
    uses = input_uses(graph)
    report = QuantizeReport([], [], 0, 0)
    new_nodes: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []  # (anchor, nodes to insert before it)
    kept: list[onnx.TensorProto] = []
    added: list[onnx.TensorProto] = []
    for initializer in graph.initializer:
        weights = numpy_helper.to_array(initializer)
        size = weights.nbytes
        report.bytes_before += size
        consumers = uses.get(initializer.name, [])
        # A Gemm reads its weight the same way (a dynamic-length head's backward, export/fed.py: transB)
        is_matmul = consumers and all(n.op_type in ("MatMul", "Gemm") and i == 1 for n, i in consumers)
        is_gather = consumers and all(n.op_type == "Gather" and i == 0 for n, i in consumers)
        eligible = weights.dtype == np.float32 and weights.ndim == 2 and weights.size >= MIN_ELEMENTS
        if not eligible or not (is_matmul or is_gather):
            if eligible:
                report.skipped.append(initializer.name)
            kept.append(initializer)
            report.bytes_after += size
            continue
        name = initializer.name
        if is_matmul:
            codes, scale = quantize_blocks_along_k(weights)
            added += [numpy_helper.from_array(codes, f"{name}.q8"), numpy_helper.from_array(scale, f"{name}.scales")]
            report.bytes_after += codes.nbytes + scale.nbytes
            report.quantized.append(name)
            for position, (matmul, _) in enumerate(consumers):
                # One DequantizeLinear per MatMul: the runtime's fusion takes a pair whose weight has one reader.
                weight = f"{name}.dequantized{position}"
                dequantize = helper.make_node(
                    "DequantizeLinear",
                    [f"{name}.q8", f"{name}.scales"],
                    [weight],
                    name=f"{name}.dequantize{position}",
                    axis=0,
                    block_size=BLOCK_SIZE,
                )
                replacement = onnx.NodeProto()
                replacement.CopyFrom(matmul)  # a Gemm keeps its attributes (transB) and bias
                replacement.input[1] = weight
                replacement.name = f"{name}.{matmul.op_type.lower()}{position}"
                new_nodes.append((matmul, [dequantize, replacement]))
            continue
        quantized, scale = quantize_per_channel(weights, 0)
        added += [numpy_helper.from_array(quantized, f"{name}.int8"), numpy_helper.from_array(scale, f"{name}.scale")]
        report.bytes_after += quantized.nbytes + scale.nbytes
        report.quantized.append(name)
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
    # Rebuild the node list in order: replacement nodes go where the anchor stood, and the anchor goes away.
    replaced = {id(anchor) for anchor, _ in new_nodes}
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
    if report.quantized:
        _use_opset(model, DEQUANTIZE_OPSET)
    return report


def _use_opset(model: onnx.ModelProto, version: int) -> None:
    """Raise the default domain's opset to `version`. The operators the head uses (MatMul, Gather, Cast, Pad,
    Reshape, Softmax, ...) changed between 18 and 21 only by taking more types, so their meaning holds; the
    export's self-check runs the result against the model."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < version:
            entry.version = version


def store_saved_as_float16(forward: onnx.ModelProto, backward: onnx.ModelProto) -> list[str]:
    """Hand the tensors saved for backward from one graph to the other in float16, halving what they hold.

    Each float32 output of `forward` that `backward` reads as an input (not `activations`, which goes to the
    server) is cast to float16 right after it is made in the forward graph and back to float32 just before
    its first use in the backward graph. For SmolLM2 cut at layer 4, batch 4 x 128, that is 45 MB of gate and up
    projections, attention inputs and norm statistics. float16 keeps 11 significant bits (relative rounding
    error 2^-11 ~ 0.05%), against the ~1% that the int8 weights already cost, which is why only the int8
    export does it. Returns the names of the tensors changed.
    """
    shared = {value.name for value in backward.graph.input}
    changed: list[str] = []
    for output in forward.graph.output:
        kind = output.type.tensor_type
        if output.name == "activations" or output.name not in shared or kind.elem_type != onnx.TensorProto.FLOAT:
            continue
        name = output.name
        nodes = list(forward.graph.node)
        producer = next(index for index, node in enumerate(nodes) if name in node.output)
        for node in nodes:  # the producer now writes name.f32, and a Cast right after it writes name
            node.output[:] = [f"{name}.f32" if value == name else value for value in node.output]
            node.input[:] = [f"{name}.f32" if value == name else value for value in node.input]
        cast = helper.make_node("Cast", [f"{name}.f32"], [name], name=f"{name}.to_half", to=onnx.TensorProto.FLOAT16)
        nodes.insert(producer + 1, cast)  # early: the float32 copy can go once the forward is done with it
        del forward.graph.node[:]
        forward.graph.node.extend(nodes)
        kind.elem_type = onnx.TensorProto.FLOAT16
        changed.append(name)
    for graph_input in backward.graph.input:
        if graph_input.name not in changed:
            continue
        name = graph_input.name
        graph_input.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
        nodes = list(backward.graph.node)
        first = next(index for index, node in enumerate(nodes) if name in node.input)
        for node in nodes:
            node.input[:] = [f"{name}.f32" if value == name else value for value in node.input]
        cast = helper.make_node("Cast", [name], [f"{name}.f32"], name=f"{name}.to_float", to=onnx.TensorProto.FLOAT)
        nodes.insert(first, cast)
        del backward.graph.node[:]
        backward.graph.node.extend(nodes)
    return changed
