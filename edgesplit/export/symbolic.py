"""Symbolic sequence length: the head traced once for every length from MIN_SEQ_LEN to max_seq_len.

`trace_head(..., dynamic=True)` hands `aot_function` fake tensors whose sequence axis is a symbol of a shape
environment (`fake_inputs`): the token inputs are (batch, s) and everything else keeps its concrete size, so
the traced graphs compute the positions, the causal mask and the rotary angles from `sym_size(input_ids, 1)`
in the graph instead of carrying them as constants. The partitioner then saves a few symbolic sizes (such as
2*s, the rows of a flattened matmul) for the backward next to the saved tensors; `drop_saved_sizes` removes
them from the forward's outputs and recomputes them in the backward from the activation gradients' length,
so both graphs keep the tensor-only signatures that trainable.py rewrites and exports.

`export_arguments` gives torch.export concrete example tensors (the traced length) and the `dynamic_shapes`
that name the symbolic axis `seq` (allowed MIN_SEQ_LEN..max_seq_len; a derived size such as 2*seq where an
input has one). torch.export checks every guard the trace recorded against that range and refuses a graph
that would only hold at some lengths; a length of 1 is outside it because tracing specialises sizes 0 and 1.
"""

from __future__ import annotations

from typing import Any, cast

import sympy
import torch
from torch import fx

from edgesplit.client.artifacts import MIN_SEQ_LEN, SEQ_AXIS


def fake_inputs(
    constants: list[torch.Tensor], input_ids: torch.Tensor, lora: list[torch.Tensor]
) -> tuple[Any, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Fake tensors of one fake mode: the constants and LoRA matrices static, input_ids (B, s) and an
    all-ones attention mask of its shape (one symbol s for both)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    context: Any = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC])
    with mode:
        fake_constants: list[torch.Tensor] = [mode.from_tensor(value, static_shapes=True) for value in constants]
        fake_ids = mode.from_tensor(input_ids, symbolic_context=context, source=ConstantSource("input_ids"))
        fake_tokens = [fake_ids, torch.ones_like(fake_ids)]
        fake_lora: list[torch.Tensor] = [mode.from_tensor(value, static_shapes=True) for value in lora]
    if not isinstance(fake_ids.shape[1], torch.SymInt) or isinstance(fake_ids.shape[0], torch.SymInt):
        raise RuntimeError(f"input_ids did not get a symbolic length and a fixed batch: {fake_ids.shape}")
    return mode, fake_constants, fake_tokens, fake_lora


def _is_size(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.SymInt)


def drop_saved_sizes(forward: fx.GraphModule, backward: fx.GraphModule) -> None:
    """Take the symbolic sizes out of what the forward saves; the backward recomputes them from its last input.

    aot_autograd's forward returns (outputs, saved tensors, saved sizes) and its backward takes (saved sizes,
    saved tensors, tangents). Every saved size is a polynomial in the sequence length s; the tangent (the
    activation gradients, (B, s, H)) gives s in the backward.
    """
    output = next(node for node in forward.graph.nodes if node.op == "output")
    results = list(cast("list[fx.Node]", output.args[0]))
    sizes = [node for node in results if _is_size(node)]
    output.args = (tuple(node for node in results if not _is_size(node)),)
    forward.graph.eliminate_dead_code()
    forward.recompile()

    placeholders = [node for node in backward.graph.nodes if node.op == "placeholder"]
    size_inputs = [node for node in placeholders if _is_size(node)]
    if len(size_inputs) != len(sizes):
        raise RuntimeError(f"the backward takes {len(size_inputs)} sizes, the forward saves {len(sizes)}")
    for node in size_inputs:
        node.replace_all_uses_with(backward_size(backward, node.meta["val"]))
        backward.graph.erase_node(node)
    backward.graph.lint()
    backward.recompile()


def backward_size(backward: fx.GraphModule, value: torch.SymInt) -> Any:
    """Nodes (before the backward's first operation) computing the size `value` from the tangent's length."""
    placeholders = [node for node in backward.graph.nodes if node.op == "placeholder"]
    tangent = placeholders[-1]  # the activation gradients, (B, s, H)
    length_size = tangent.meta["val"].shape[1]
    first_op = next(node for node in backward.graph.nodes if node.op != "placeholder")
    with backward.graph.inserting_before(first_op):
        length = backward.graph.call_function(torch.ops.aten.sym_size.int, (tangent, 1))
        length.meta["val"] = length_size
        return _build(backward.graph, sympy.expand(value.node.expr), _symbol(length_size), length)


def _symbol(size: Any) -> sympy.Symbol:
    if not isinstance(size, torch.SymInt) or not isinstance(size.node.expr, sympy.Symbol):
        raise RuntimeError(f"the activation gradients' length is not the sequence symbol: {size}")
    return size.node.expr


def _build(graph: fx.Graph, expr: sympy.Expr, symbol: sympy.Symbol, length: fx.Node) -> Any:
    """FX nodes computing `expr`, a polynomial in `symbol` with integer coefficients, from `length`."""
    import operator

    polynomial = sympy.Poly(expr, symbol)
    if any(not coefficient.is_integer for coefficient in polynomial.all_coeffs()):
        raise RuntimeError(f"a saved size is not an integer polynomial of the sequence length: {expr}")
    total: Any = None
    for (power,), coefficient in polynomial.terms():
        term: Any = int(coefficient)
        for _ in range(power):
            term = graph.call_function(operator.mul, (term, length))
        total = term if total is None else graph.call_function(operator.add, (total, term))
    return 0 if total is None else total


def export_arguments(
    graph: fx.GraphModule, max_seq_len: int
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any] | None, ...]]:
    """Zero example tensors at the traced length and torch.export's dynamic_shapes for `graph`'s inputs."""
    from torch.export import Dim

    seq = Dim(SEQ_AXIS, min=MIN_SEQ_LEN, max=max_seq_len)
    examples: list[torch.Tensor] = []
    shapes: list[dict[int, Any] | None] = []
    for node in graph.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        if value is None:
            raise RuntimeError(f"placeholder {node.target} has no recorded shape")
        examples.append(torch.zeros(tuple(_hint(size) for size in value.shape), dtype=value.dtype))
        dims: dict[int, Any] = {}
        for index, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                dims[index] = _dim(size.node.expr, seq)
        shapes.append(dims or None)
    return tuple(examples), tuple(shapes)


def _hint(size: Any) -> int:
    """The traced (example) value of a size."""
    return int(size.node.hint) if isinstance(size, torch.SymInt) else int(size)


def _dim(expr: sympy.Expr, seq: Any) -> Any:
    """`seq`, or a size derived from it (a * seq + b), for one symbolic input size."""
    symbols = list(expr.free_symbols)
    if len(symbols) != 1:
        raise RuntimeError(f"an input size depends on {len(symbols)} symbols: {expr}")
    polynomial = sympy.Poly(expr, symbols[0])
    if polynomial.degree() > 1:
        raise RuntimeError(f"an input size is not linear in the sequence length: {expr}")
    slope, offset = (int(c) for c in (polynomial.coeff_monomial(symbols[0]), polynomial.coeff_monomial(1)))
    if (slope, offset) == (1, 0):
        return seq
    return slope * seq + offset
