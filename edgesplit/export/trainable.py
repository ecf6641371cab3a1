"""Turn a head with LoRA inputs into two ONNX graphs: a forward that saves tensors, and its backward.

PyTorch's own autograd does the differentiation, ahead of time: `aot_function` traces the head with the
frozen weights, the token inputs and the LoRA matrices as graph inputs, and its partitioner splits the joint
graph into
    forward:  (weights, input_ids, attention_mask, lora...) -> (activations, saved...)
    backward: (saved..., activation_grads)                 -> (grad of each input)
We then rewrite both FX graphs before exporting them (the rewrite is what makes them an edge artifact):
  - the frozen weights become constants (ONNX initializers) instead of inputs;
  - a saved tensor that is just a frozen weight becomes a constant of the backward graph, one that is just an
    input (a LoRA matrix, the mask) becomes an input of the backward graph under the same name, and each real
    intermediate becomes a forward output `saved.<n>` and a backward input of the same name;
  - the backward keeps only the LoRA gradients, named `grad.<adapter name>` (edgesplit/lora_names.py).
What the client keeps between its forward and backward is most of its memory, and ONNX Runtime copies every
saved tensor out of the forward (an FX view is free, a graph output is not), so the partition is tuned for it:
  - min-cut rematerialisation (functorch's `min_cut_rematerialization_partition`) instead of saving every
    intermediate: cheap elementwise results (SiLU, norms) are recomputed in the backward;
  - the attention probabilities (B, heads, T, T) are recomputed from the saved queries and keys (one small
    batched matmul and a softmax per layer) instead of being saved;
  - a saved tensor that is a view or copy of another tensor (a reshape, a permute, a GQA `expand` + clone) is
    saved once, as its base, and the view is replayed in the backward;
  - RMSNorm's `pow(x, 2)` and the `pow(x, 1)` of its derivative become `x * x` and `x` (ONNX Runtime's
    Pow is a slow elementwise loop: it took 7-10% of the backward), and the backward of a slice (the
    rotary half-split) pads the gradient with zeros instead of scattering it into a zero tensor through
    ScatterND and 4-D transposes.
For SmolLM2-135M cut at layer 4, batch 4 x 128 (bench/head_step.py), this took the saved tensors from
83.6 MB (82 outputs) to 44 MB (46) and the backward's kernels other than matmuls from ~88 to ~45 ms of one
core's time; the matmuls, ~80% of a step, are what they were.

The graphs are traced for one (batch, seq_len): the partitioned graphs carry concrete sizes, and the client
pads every batch to them; or, with `dynamic=True`, for the batch and a symbolic length (edgesplit/export/
symbolic.py): one pair of graphs whose sequence axis `seq` takes any length from 2 to max_seq_len.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import fx

from edgesplit.export.lora import HeadWithLora
from edgesplit.lora_names import gradient_name

ACTIVATIONS = "activations"
ACTIVATION_GRADS = "activation_grads"


@dataclass
class TracedHead:
    forward: fx.GraphModule  # (input_ids, attention_mask, lora...) -> (activations, saved...)
    backward: fx.GraphModule | None  # (backward inputs...) -> (grad.<lora>...); None for a frozen head
    forward_inputs: list[str]
    forward_outputs: list[str]
    backward_inputs: list[str]
    backward_outputs: list[str]


def _constant_name(parameter_name: str) -> str:
    return "w_" + re.sub(r"[^A-Za-z0-9_]", "_", parameter_name.removeprefix("backbone."))


def trace_head(
    head: HeadWithLora,
    lora: dict[str, torch.Tensor],
    batch_size: int,
    seq_len: int,
    trainable: bool = True,
    dynamic: bool = False,
) -> TracedHead:
    """Trace `head` for (batch_size, seq_len) into rewritten forward and backward FX graphs; with `dynamic`,
    for (batch_size, any length), `seq_len` being the example length the trace is hinted with."""
    from functorch.compile import aot_function, make_boxed_func

    constants = {**dict(head.named_parameters()), **dict(head.named_buffers())}
    constant_names = list(constants)
    constant_values = [value.detach() for value in constants.values()]
    lora_names = list(lora) if trainable else []
    count = len(constant_names)

    def head_function(*args: torch.Tensor) -> torch.Tensor:
        state = dict(zip(constant_names, args[:count], strict=True))
        input_ids, attention_mask = args[count], args[count + 1]
        matrices = dict(zip(lora_names, args[count + 2 :], strict=True))
        if not trainable:
            matrices = {name: torch.zeros(shape) for name, shape in head.shapes.items()}
        activations: torch.Tensor = torch.func.functional_call(head, state, (input_ids, attention_mask, matrices))
        return activations

    captured: dict[str, fx.GraphModule] = {}

    def forward_compiler(graph: fx.GraphModule, _: Any) -> Any:
        captured["forward"] = graph
        return make_boxed_func(graph.forward)

    def backward_compiler(graph: fx.GraphModule, _: Any) -> Any:
        captured["backward"] = graph
        return make_boxed_func(graph.forward)

    compiled = aot_function(
        head_function,
        forward_compiler,
        backward_compiler,
        partition_fn=_partition,
        decompositions=_decompositions(),
    )
    # Example inputs: every position attended, so no branch of the traced mask maths is specialised away.
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    lora_values = [lora[name].detach().clone() for name in lora_names]
    if dynamic:
        from edgesplit.export.symbolic import drop_saved_sizes, fake_inputs

        mode, fake_constants, tokens, fake_lora = fake_inputs(constant_values, input_ids, lora_values)
        with mode:
            activations = compiled(*fake_constants, *tokens, *(value.requires_grad_(True) for value in fake_lora))
            if trainable:
                activations.backward(torch.ones_like(activations))
        if trainable:
            drop_saved_sizes(captured["forward"], captured["backward"])
    else:
        lora_inputs = [value.requires_grad_(True) for value in lora_values]
        activations = compiled(*constant_values, input_ids, attention_mask, *lora_inputs)
        if trainable:
            activations.backward(torch.ones_like(activations))

    for graph in captured.values():
        _simplify_powers(graph)
    if trainable:
        _save_view_bases(captured["forward"], captured["backward"], count)
    input_names = [*(f"__const{i}" for i in range(count)), "input_ids", "attention_mask", *lora_names]
    return _rewrite(captured, constant_names, constant_values, input_names, lora_names, trainable)


def _decompositions() -> dict[Any, Any]:
    from torch._decomp import core_aten_decompositions

    decompositions = dict(core_aten_decompositions())
    decompositions[torch.ops.aten.slice_backward.default] = _slice_backward
    return decompositions


def _slice_backward(
    grad: torch.Tensor, input_sizes: list[int], dim: int, start: int, end: int, step: int
) -> torch.Tensor:
    """The gradient of `x[..., start:end, ...]` (along `dim`) as `grad` padded with zeros: one ONNX Pad."""
    if step != 1:
        from torch._decomp.decompositions import slice_backward

        return slice_backward(grad, input_sizes, dim, start, end, step)  # type: ignore[no-any-return]
    dim %= len(input_sizes)
    size = input_sizes[dim]
    start = min(start + size if start < 0 else start, size)
    end = min(end + size if end < 0 else end, size)
    pads = [0, 0] * (len(input_sizes) - 1 - dim) + [start, size - end]  # last dimension first
    padded: torch.Tensor = torch.ops.aten.constant_pad_nd(grad, pads, 0.0)
    return padded


_VIEWS = {
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.clone.default,
}


def _partition(joint: fx.GraphModule, joint_inputs: Any, **kwargs: Any) -> tuple[fx.GraphModule, ...]:
    """functorch's min-cut partition, with the attention probabilities tagged to be recomputed."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten

    def recompute(node: fx.Node) -> None:
        # Back from the probabilities to the scores matmul (mask, scale and softmax on the way); the matmul's
        # inputs, the queries and keys, are saved anyway.
        if node.op != "call_function" or "recompute" in node.meta:
            return
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        if node.target not in (aten.bmm.default, aten.mm.default):
            for source in node.all_input_nodes:
                recompute(source)

    for node in list(joint.graph.nodes):
        if node.target == aten._softmax.default:
            pending = [node]
            while pending:  # the probabilities and their views (dropout's alias, matmul's expand and clone)
                probabilities = pending.pop()
                recompute(probabilities)
                pending += [user for user in probabilities.users if user.target in _VIEWS]
    return min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)  # type: ignore[no-any-return]


def _simplify_powers(graph: fx.GraphModule) -> None:
    """pow(x, 1) -> x and pow(x, 2) -> x * x: ONNX Runtime's Pow is a slow elementwise loop."""
    aten = torch.ops.aten
    for node in list(graph.graph.nodes):
        if node.target != aten.pow.Tensor_Scalar or node.args[1] not in (1, 2):
            continue
        base = node.args[0]
        if node.args[1] == 1:
            node.replace_all_uses_with(base)
        else:
            with graph.graph.inserting_before(node):
                square = graph.graph.call_function(aten.mul.Tensor, (base, base))
            square.meta = dict(node.meta)
            node.replace_all_uses_with(square)
        graph.graph.erase_node(node)
    graph.recompile()


def _save_view_bases(forward: fx.GraphModule, backward: fx.GraphModule, count: int) -> None:
    """Save the base of each saved view instead of the view, and replay the view in the backward.

    In ONNX a view is a copy, so q and q reshaped for the batched matmul are two saved tensors; and a
    grouped-query `expand` saves its 3x larger result. Saving the base dedupes the first and shrinks the
    second. Views of constants are left alone: `_rewrite` folds those into the backward's constants.
    """
    inputs = _placeholders(forward.graph)
    variable: dict[fx.Node, bool] = {}  # depends on a graph input other than the frozen weights
    for node in forward.graph.nodes:
        if node.op == "placeholder":
            variable[node] = inputs.index(node) >= count
        else:
            variable[node] = any(variable[source] for source in node.all_input_nodes)
    output = _output_node(forward.graph)
    results = list(cast("Sequence[fx.Node]", output.args[0]))  # the forward returns a flat tuple of nodes
    saved_inputs = _placeholders(backward.graph)  # one per saved tensor, in order, then the activation grads
    first_op = next(node for node in backward.graph.nodes if node.op != "placeholder")
    for index, node in enumerate(results[1:]):
        chain: list[fx.Node] = []
        base = node
        while base.op == "call_function" and base.target in _VIEWS:
            chain.append(base)
            base = cast(fx.Node, base.args[0])  # the tensor that the view views
        if not chain or not variable[base]:
            continue
        results[index + 1] = base
        placeholder = saved_inputs[index]
        users = list(placeholder.users)
        value = placeholder
        for view in reversed(chain):
            with backward.graph.inserting_before(first_op):
                target = cast("Callable[..., Any]", view.target)  # a call_function's target is the function
                arguments = fx.node.map_arg(view.args[1:], lambda size: _size_in_backward(backward, size))
                value = backward.graph.call_function(target, (value, *arguments), dict(view.kwargs))
            value.meta = dict(view.meta)
        for user in users:
            user.replace_input_with(placeholder, value)
        placeholder.meta = dict(base.meta)  # the example tensor for export takes its shape from here
    output.args = (tuple(results),)
    forward.graph.eliminate_dead_code()
    forward.recompile()
    backward.graph.lint()
    backward.recompile()


def _size_in_backward(backward: fx.GraphModule, size: fx.Node) -> Any:
    """A view's symbolic size argument (a forward node), recomputed in the backward (symbolic.py)."""
    from edgesplit.export.symbolic import backward_size

    value = size.meta.get("val")
    if not isinstance(value, torch.SymInt):
        raise RuntimeError(f"a saved view takes a tensor argument {size.name}, not a size")
    return backward_size(backward, value)


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op == "placeholder"]


def _output_node(graph: fx.Graph) -> fx.Node:
    output: fx.Node = next(node for node in graph.nodes if node.op == "output")
    return output


def _constant_values(graph: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """Values of those `nodes` that depend on constants alone (no graph input), computed once here."""
    depends_on_input: dict[fx.Node, bool] = {}
    for node in graph.graph.nodes:  # topological order: inputs of a node are decided before it
        depends_on_input[node] = node.op == "placeholder" or any(depends_on_input[n] for n in node.all_input_nodes)
    wanted = {node for node in nodes if not depends_on_input[node]}
    values: dict[fx.Node, torch.Tensor] = {}
    environment: dict[fx.Node, Any] = {}
    for node in graph.graph.nodes:
        if depends_on_input[node] or node.op == "output":
            continue
        if node.op == "get_attr":
            environment[node] = getattr(graph, str(node.target))
        else:
            args = fx.node.map_arg(node.args, lambda n: environment[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: environment[n])
            environment[node] = node.target(*args, **kwargs)
        if node in wanted:
            values[node] = environment[node].detach().clone().contiguous()
    return values


def _rewrite(
    captured: dict[str, fx.GraphModule],
    constant_names: list[str],
    constant_values: list[torch.Tensor],
    input_names: list[str],
    lora_names: list[str],
    trainable: bool,
) -> TracedHead:
    forward = captured["forward"]
    count = len(constant_names)

    # Forward: weight placeholders -> constants (get_attr), the rest renamed after their inputs.
    origin: dict[fx.Node, str] = {}  # node -> "const:<buffer>" or "input:<name>"
    for index, node in enumerate(_placeholders(forward.graph)):
        if index < count:
            buffer = _constant_name(constant_names[index])
            forward.register_buffer(buffer, constant_values[index])
            with forward.graph.inserting_before(node):
                constant = forward.graph.get_attr(buffer)
            node.replace_all_uses_with(constant)
            forward.graph.erase_node(node)
            origin[constant] = f"const:{buffer}"
        else:  # FX names must stay Python identifiers; ONNX names are given at export, by position
            origin[node] = f"input:{input_names[index]}"

    output = _output_node(forward.graph)
    results = list(cast("Sequence[fx.Node]", output.args[0]))  # the forward returns a flat tuple of nodes
    activations, saved = results[0], results[1:]
    saved_kinds: list[str] = []  # per saved tensor: where the backward graph gets it from
    intermediates: list[fx.Node] = []
    folded = _constant_values(forward, [node for node in saved if node not in origin])
    for node in saved:
        if node in origin:
            saved_kinds.append(origin[node])
        elif node in folded:  # e.g. a transposed weight or the causal mask: a constant of the backward
            buffer = f"folded_{len(saved_kinds)}"
            forward.register_buffer(buffer, folded[node])
            saved_kinds.append(f"const:{buffer}")
        elif node in intermediates:  # a base that `_save_view_bases` found behind two views
            saved_kinds.append(f"saved:saved.{intermediates.index(node)}")
        else:
            saved_kinds.append(f"saved:saved.{len(intermediates)}")
            intermediates.append(node)
    output.args = ((activations, *intermediates),)
    forward.graph.eliminate_dead_code()
    forward.graph.lint()
    forward.recompile()
    forward_inputs = ["input_ids", "attention_mask", *lora_names]
    forward_outputs = [ACTIVATIONS, *(f"saved.{i}" for i in range(len(intermediates)))]
    if not trainable:
        output.args = ((activations,),)
        forward.graph.eliminate_dead_code()
        forward.recompile()
        return TracedHead(forward, None, forward_inputs, [ACTIVATIONS], [], [])

    backward = captured["backward"]
    placeholders = _placeholders(backward.graph)
    if len(placeholders) != len(saved) + 1:
        raise RuntimeError(f"unexpected backward signature: {len(placeholders)} inputs for {len(saved)} saved")
    backward_inputs: list[str] = []
    kept: dict[str, fx.Node] = {}
    for node, kind in zip(placeholders, [*saved_kinds, f"input:{ACTIVATION_GRADS}"], strict=True):
        source, name = kind.split(":", 1)
        if source == "const":
            backward.register_buffer(name, getattr(forward, name))
            with backward.graph.inserting_before(node):
                constant = backward.graph.get_attr(name)
            node.replace_all_uses_with(constant)
            backward.graph.erase_node(node)
        elif name in kept:  # the same tensor saved twice: one input feeds both uses
            node.replace_all_uses_with(kept[name])
            backward.graph.erase_node(node)
        else:
            kept[name] = node
            backward_inputs.append(name)

    output = _output_node(backward.graph)
    # Grads of the LoRA inputs, in input order (the backward returns one gradient, or None, per input).
    gradients = list(cast("Sequence[fx.Node | None]", output.args[0]))[count + 2 :]
    output.args = (tuple(gradients),)
    backward.graph.eliminate_dead_code()
    # Inputs the LoRA gradients turn out not to need are dropped: fewer tensors for the client to keep.
    for name, node in kept.items():
        if not node.users:
            backward_inputs.remove(name)
            backward.graph.erase_node(node)
    backward.graph.lint()
    backward.recompile()
    return TracedHead(
        forward=forward,
        backward=backward,
        forward_inputs=forward_inputs,
        forward_outputs=forward_outputs,
        backward_inputs=backward_inputs,
        backward_outputs=[gradient_name(name) for name in lora_names],
    )


def example_tensors(names: list[str], graph: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Zero tensors matching the placeholders' recorded metadata, to drive torch.onnx.export."""
    tensors = []
    for node in _placeholders(graph.graph):
        value = node.meta.get("val")
        if value is None:
            raise RuntimeError(f"placeholder {node.target} has no recorded shape")
        tensors.append(torch.zeros(tuple(value.shape), dtype=value.dtype))
    return tuple(tensors)


def export_graph(
    graph: fx.GraphModule, input_names: list[str], output_names: list[str], path: Path, max_seq_len: int | None = None
) -> None:
    """Export one rewritten FX graph to ONNX with the given input and output names; with `max_seq_len`, a
    graph traced with a symbolic length, exported with its sequence axis named `seq` (up to max_seq_len)."""
    dynamic_shapes: Any = None
    if max_seq_len is None:
        examples = example_tensors(input_names, graph)
    else:
        from edgesplit.export.symbolic import export_arguments

        examples, dynamic_shapes = export_arguments(graph, max_seq_len)
    program = torch.onnx.export(
        graph,
        examples,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        dynamo=True,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    if program is None:  # dynamo=True always returns an ONNXProgram; this narrows the type
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    program.save(str(path))
