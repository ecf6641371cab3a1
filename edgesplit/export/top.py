"""The device's top stage of a U-shaped split: the last K layers, the final norm, the LM head and the loss.

    top.onnx:  activations (B, T, H) at the upper cut, attention_mask (B, T), labels (B, T), lm_head.weight_t
               (V, H), the top's LoRA matrices
           ->  loss, activation_grads (d loss / d activations, B, T, H), grad.<adapter name> per matrix

The device runs it once a step, forward and backward back to back, so it is one graph: PyTorch's autograd
traced ahead of time (`make_fx` over the loss and `torch.autograd.grad`), decomposed to core ATen and
exported with `torch.onnx.export(dynamo=True)`, as the head's graphs are (trainable.py).

The loss is memory-bounded. `ChunkedLoss` computes the LM head, the cross-entropy and its gradient with
respect to the final hidden state `chunk` tokens at a time, in its forward, and keeps only that gradient
(B, T, H) for the backward: no (B, T, V) logits tensor ever exists, only one (chunk, V) block at a time
(SmolLM2 at 4 x 128 tokens: 100 MB of fp32 logits in all, 25 MB a block of 128 tokens).

The LM head's weight is a graph input, not a constant, transposed to (H, V): the device feeds it from one
memory-mapped copy (`lm_head.npy`), which ONNX Runtime does not pre-pack into a second one. Neither product
transposes it: the logits are a plain product, and the gradient p @ W is computed as (W^T @ p^T)^T, which
transposes the block instead. (The (V, H) layout measured the same peak on SmolLM2.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesplit.export.families import Family
from edgesplit.export.lora import LoraLinear, linear_features
from edgesplit.lora_names import adapter_name, gradient_name, matches_target, parse_adapter_name

LM_HEAD_INPUT = "lm_head.weight_t"  # the LM head's weight transposed, (H, V)
LOSS_CHUNK_TOKENS = 128


class ChunkedLoss(torch.autograd.Function):
    """loss = mean next-token cross-entropy of (hidden @ weight_t) over labels != -100, computed `chunk`
    tokens at a time; its gradient with respect to `hidden` is computed in the same pass and saved.

    Per block of tokens: logits (chunk, V), their log-softmax, the probabilities p, and the gradient
    p @ W - W[label] (the one-hot never built). Each block's first input is made to depend on the previous
    block's result (plus zero times one of its values), so that ONNX Runtime, which runs a graph in any
    topological order, has to finish one block before it starts the next: only one block's vocabulary-wide
    tensors are alive at a time."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight_t: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        batch, length, width = hidden.shape
        states = hidden[:, :-1, :].reshape(-1, width)  # position t predicts the label at t + 1
        targets = labels[:, 1:].reshape(-1)
        valid = targets != -100
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        total = hidden.new_zeros(())
        grads: list[torch.Tensor] = []
        for start in range(0, states.shape[0], chunk):
            end = start + chunk
            rows, wanted, keep = states[start:end], safe[start:end], valid[start:end].unsqueeze(1)
            if grads:  # the previous block first (a data dependency worth zero)
                rows = rows + grads[-1][:1, :1] * 0.0
            log_probs = torch.log_softmax(rows @ weight_t, dim=-1)  # (chunk, V): one block at a time
            picked = log_probs.gather(1, wanted.unsqueeze(1))
            total = total - torch.where(keep, picked, torch.zeros_like(picked)).sum()
            target_rows = weight_t.index_select(1, wanted).t()  # W[label]: d logits = p - one_hot
            # p @ W as (W^T @ p^T)^T: the product transposes the (chunk, V) block, never the weight.
            block = (weight_t @ log_probs.exp().t()).t() - target_rows
            grads.append(torch.where(keep, block, torch.zeros_like(block)))
        count = valid.sum().to(hidden.dtype)  # 0 target tokens: 0 / 0, a NaN loss, never a 0
        grad = (torch.cat(grads) / count).reshape(batch, length - 1, width)
        ctx.save_for_backward(torch.cat([grad, grad.new_zeros(batch, 1, width)], dim=1))
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None


class TopWithLora(nn.Module):
    """(activations at the upper cut, attention_mask, labels, LM-head weight, LoRA matrices) -> loss.

    `backbone` is a causal LM of layers [first_layer, L) built as the server's tail is (Family.build_tail),
    called with inputs_embeds=activations; its LoRA matrices are named by absolute layer."""

    def __init__(
        self,
        tail: nn.Module,
        family: Family,
        first_layer: int,
        rank: int,
        alpha: float,
        targets: tuple[str, ...],
        chunk: int = LOSS_CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        self.tail = tail
        self.family = family
        self.chunk = chunk
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._matrices: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(family.layers(tail)):
            for module_path, module in list(layer.named_modules()):
                if not module_path or not matches_target(module_path, targets):
                    continue
                a_name, b_name = (adapter_name(first_layer + index, module_path, m) for m in ("A", "B"))
                in_features, out_features = linear_features(module)
                self.shapes[a_name] = (rank, in_features)
                self.shapes[b_name] = (out_features, rank)
                parent_path, _, attribute = module_path.rpartition(".")
                parent = layer.get_submodule(parent_path) if parent_path else layer
                setattr(parent, attribute, LoraLinear(module, a_name, b_name, alpha / rank, self._matrices))
        for parameter in self.tail.parameters():
            parameter.requires_grad_(False)

    def forward(
        self,
        activations: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        lm_weight: torch.Tensor,
        lora: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        self._matrices.clear()
        self._matrices.update(lora)
        backbone = self.family.backbone(self.tail)
        hidden = backbone(inputs_embeds=activations, attention_mask=attention_mask, use_cache=False)
        loss: torch.Tensor = ChunkedLoss.apply(  # type: ignore[no-untyped-call]
            hidden.last_hidden_state, lm_weight, labels, self.chunk
        )
        return loss

    def initial_lora(self, seed: int) -> dict[str, torch.Tensor]:
        """A Kaiming-uniform as PEFT's, B zero (as HeadWithLora.initial_lora), from its own seed."""
        generator = torch.Generator().manual_seed(seed)
        matrices: dict[str, torch.Tensor] = {}
        for name, shape in self.shapes.items():
            if parse_adapter_name(name).matrix == "A":
                bound = 1.0 / float(shape[1]) ** 0.5
                matrices[name] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
            else:
                matrices[name] = torch.zeros(shape)
        return matrices


def lm_head_weight_t(tail: nn.Module) -> torch.Tensor:
    """The LM head's weight of a tail built by Family.build_tail, transposed: (H, V), contiguous."""
    head: nn.Linear = tail.get_output_embeddings()  # type: ignore[operator]
    return head.weight.detach().t().contiguous()


def export_top(
    top: TopWithLora, lora: dict[str, torch.Tensor], batch_size: int, seq_len: int, vocab_size: int, path: Path
) -> tuple[list[str], list[str]]:
    """Trace `top`'s loss and its gradients as one graph and export it to `path`; (input names, output names)."""
    from torch._decomp import core_aten_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    names = list(lora)
    config: Any = top.tail.config
    width = int(config.hidden_size)

    def joint(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        activations, attention_mask, labels, lm_weight, *values = args
        activations = activations.detach().requires_grad_(True)
        leaves = [value.detach().requires_grad_(True) for value in values]
        with torch.enable_grad():
            loss = top(activations, attention_mask, labels, lm_weight, dict(zip(names, leaves, strict=True)))
            grads = torch.autograd.grad(loss, [activations, *leaves])
        return (loss.detach(), *grads)

    generator = torch.Generator().manual_seed(0)
    examples = (
        torch.randn(batch_size, seq_len, width, generator=generator),
        torch.ones(batch_size, seq_len, dtype=torch.long),
        torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator),
        torch.zeros(width, vocab_size),
        *(lora[name].detach().clone() for name in names),
    )
    graph = make_fx(joint, decomposition_table=dict(core_aten_decompositions()))(*examples)
    input_names = ["activations", "attention_mask", "labels", LM_HEAD_INPUT, *names]
    output_names = ["loss", "activation_grads", *(gradient_name(name) for name in names)]
    program = torch.onnx.export(
        graph,
        examples,
        input_names=input_names,
        output_names=output_names,
        dynamo=True,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no ONNXProgram")
    program.save(str(path))
    return input_names, output_names
