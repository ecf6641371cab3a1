"""Greedy generation through the split model, and the held-out score of any greedy generator.

`score` is what the demo and `edgesplit compare` report; they generate through the run's PEFT adapter on the
whole model (edgesplit/server/scoring.py, with a KV cache). `SplitGenerator` stays as the reference that path
is held to (tests/server/test_scoring.py, bench/generate.py): it runs the very graphs the devices and the
server train, the ONNX head and the PyTorch tail.

The head is the client's ONNX graph, traced for a fixed (B, T): there is no KV cache, so every new token
reruns the whole padded window.

    prompts ─ pad right to (B, T) ─> head (ORT, client adapters) ─> activations (B, T, H)
            ─> tail (PyTorch, its LoRA) ─> logits at each row's last real position (B, V)
            ─> argmax ─> appended at that row's next position ─> repeat

With a whole-model head (`export --full-model`, FedLLM and KD) there is no tail: the head's output is
already the logits (B, T, V). A row stops at EOS, at `max_new_tokens`, or when its window is full.

The score is what the demo shows a person: the share of held-out prompts whose greedy completion is exactly
the target, and the share of target tokens (the completion and its EOS) that the generation gets right
position by position.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgesplit.client.data import DEFAULT_PROMPT_FORMAT, Example, PromptFormat, pad_rows
from edgesplit.client.head import Arrays, Head


@dataclass(frozen=True)
class Generation:
    prompt: str
    target: str
    output: str
    exact: bool
    token_accuracy: float


@dataclass(frozen=True)
class Score:
    exact_match: float  # share of examples whose output equals the target (whitespace-trimmed)
    token_accuracy: float  # mean over examples of the share of target tokens generated right
    generations: list[Generation] = field(repr=False)
    seconds: float = 0.0

    def to_json(self, examples: int = 8) -> dict[str, Any]:
        return {
            "exact_match": self.exact_match,
            "token_accuracy": self.token_accuracy,
            "count": len(self.generations),
            "seconds": round(self.seconds, 3),
            "examples": [g.__dict__ for g in self.generations[:examples]],
        }


class TokenGenerator(Protocol):
    """What `score` needs: a `tokenizers.Tokenizer`, the EOS id, and greedy continuations of token ids with
    some adapters (client adapters for SplitGenerator, an adapter name for scoring.AdapterGenerator)."""

    tokenizer: Any
    eos_token_id: int | None

    def generate(self, prompts: Sequence[Sequence[int]], adapters: Any, max_new_tokens: int) -> list[list[int]]: ...


class SplitGenerator:
    """Greedy decoding with a Head (ORT) and a Tail (PyTorch) of one artifact directory, or with a
    whole-model head alone (`tail` None)."""

    def __init__(self, head: Head, tail: Any | None, tokenizer: Any) -> None:
        self.head = head
        self.tail = tail  # edgesplit.server.tail.Tail; typed loosely so this module imports without torch
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        manifest = head.manifest
        self.batch_size = manifest.batch_size
        self.max_seq_len = manifest.max_seq_len
        self.eos_token_id = manifest.eos_token_id
        self.pad_token_id = manifest.pad_token_id or 0

    def _last_logits(self, activations: np.ndarray, attention_mask: np.ndarray, last: np.ndarray) -> np.ndarray:
        """Logits (B, V) at position last[b] of each row b."""
        if self.tail is None:  # a whole-model head: its output (B, T, V) is the logits
            return activations[np.arange(len(last)), last]  # type: ignore[no-any-return]
        import torch

        positions = np.unique(last)
        # Attention is causal and the padding is on the right: positions past the longest row change nothing
        # before them, so the tail (which takes any length, unlike the traced head) skips them.
        width = int(positions[-1]) + 1
        with torch.no_grad():
            output = self.tail.model(
                inputs_embeds=torch.from_numpy(np.ascontiguousarray(activations[:, :width], dtype=np.float32)),
                attention_mask=torch.from_numpy(np.ascontiguousarray(attention_mask[:, :width])),
                use_cache=False,
                # Only the positions some row needs: the LM head over all T positions and the whole
                # vocabulary would cost as much as several tail layers.
                logits_to_keep=torch.from_numpy(positions),
            )
        logits = output.logits.float().numpy()  # (B, len(positions), V)
        column = np.searchsorted(positions, last)
        return logits[np.arange(len(last)), column]  # type: ignore[no-any-return]

    def generate(self, prompts: Sequence[Sequence[int]], adapters: Arrays, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations of token-id `prompts`, ending with EOS where the model stopped by itself."""
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_size):
            outputs.extend(self._generate_batch(prompts[start : start + self.batch_size], adapters, max_new_tokens))
        return outputs

    def _generate_batch(
        self, prompts: Sequence[Sequence[int]], adapters: Arrays, max_new_tokens: int
    ) -> list[list[int]]:
        rows = len(prompts)
        for row, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {row} of the batch is empty")
        # Cut from the start, keeping room for one new token; filler rows (one pad token) are never read.
        kept = [list(prompt)[-(self.max_seq_len - 1) :] for prompt in prompts]
        padded = pad_rows(kept, self.max_seq_len, self.pad_token_id, self.batch_size)
        input_ids, attention_mask, lengths = padded.input_ids, padded.attention_mask, padded.lengths  # (B, T) x2, (B,)
        generated: list[list[int]] = [[] for _ in range(rows)]
        active = np.zeros(self.batch_size, dtype=bool)
        active[:rows] = True
        for _ in range(max_new_tokens):
            if not active.any():
                break
            activations = self.head.forward(input_ids, attention_mask, adapters).activations  # (B, T, H)
            next_tokens = self._last_logits(activations, attention_mask, lengths - 1).argmax(axis=-1)  # (B,)
            for row in np.flatnonzero(active).tolist():
                token = int(next_tokens[row])
                generated[row].append(token)
                if token == self.eos_token_id:
                    active[row] = False
                    continue
                if lengths[row] >= self.max_seq_len:  # the window is full: the head cannot see further
                    active[row] = False
                    continue
                input_ids[row, lengths[row]] = token
                attention_mask[row, lengths[row]] = 1
                lengths[row] += 1
        return generated


def token_accuracy(output: Sequence[int], target: Sequence[int]) -> float:
    """Share of target positions where the output has the same token (a missing token counts as wrong)."""
    if not target:
        return 1.0 if not output else 0.0
    right = sum(1 for index, token in enumerate(target) if index < len(output) and output[index] == token)
    return right / len(target)


def score(
    generator: TokenGenerator,
    examples: Sequence[Example],
    adapters: Any,
    prompt_format: PromptFormat = DEFAULT_PROMPT_FORMAT,
    max_new_tokens: int | None = None,
) -> Score:
    """Exact match and token accuracy of greedy generations on prompt/completion `examples`.

    Prompts are tokenized exactly as training tokenized them (prompt + separator, no special tokens), so
    the model continues where training taught it to. The target includes EOS: stopping is part of the task.
    Each distinct prompt is generated once, however many lines give it a reference (E2E and WebNLG list
    several): the output is exact if it equals any of them, and its token accuracy is its best.
    """
    started = time.perf_counter()
    references: dict[str, list[str]] = {}  # context -> its targets, contexts in the order they first appear
    for example in examples:
        if example.prompt is not None:
            context, target = prompt_format.context_and_target(example)
            references.setdefault(context, []).append(target)
    if not references:
        raise ValueError("scoring needs prompt/completion examples; plain text has no target to compare")
    encode = generator.tokenizer.encode_batch
    prompts = [list(e.ids) for e in encode(list(references), add_special_tokens=False)]
    eos = [] if generator.eos_token_id is None else [generator.eos_token_id]
    targets = {
        context: [list(e.ids) + eos for e in encode(texts, add_special_tokens=False)]
        for context, texts in references.items()
    }
    if max_new_tokens is None:
        max_new_tokens = max(len(t) for ids in targets.values() for t in ids)
    outputs = generator.generate(prompts, adapters, max_new_tokens)
    generations = []
    for (context, texts), output in zip(references.items(), outputs, strict=True):
        stopped = bool(eos) and bool(output) and output[-1] == eos[0]
        text = generator.tokenizer.decode(output[:-1] if stopped else output, skip_special_tokens=True)
        matched = next((target for target in texts if text.strip() == target.strip()), None)
        generations.append(
            Generation(
                # Exact means the right text and then a stop: a model that runs on past the code is wrong.
                prompt=context.rstrip("\n"),
                target=texts[0] if matched is None else matched,
                output=text,
                exact=matched is not None and (stopped or not eos),
                token_accuracy=max(token_accuracy(output, ids) for ids in targets[context]),
            )
        )
    return Score(
        exact_match=sum(g.exact for g in generations) / len(generations),
        token_accuracy=float(np.mean([g.token_accuracy for g in generations])),
        generations=generations,
        seconds=time.perf_counter() - started,
    )


def eval_loss(head: Head, tail: Any, encoded: Any, adapters: Arrays, max_batches: int) -> float:
    """Mean token loss over up to `max_batches` batches: the server's per-round evaluation (0.0 where no
    batch holds a target token; eval_loss_and_tokens tells that case apart)."""
    return eval_loss_and_tokens(head, tail, encoded, adapters, max_batches)[0]


def eval_loss_and_tokens(head: Head, tail: Any, encoded: Any, adapters: Arrays, max_batches: int) -> tuple[float, int]:
    """Mean token loss over up to `max_batches` batches, and the target tokens it is the mean of.

    The demo uses it for the untrained model, so that its loss curve starts at round 0 on the server's scale,
    and shows no number where the count is 0.
    """
    batch = head.manifest.batch_size
    count = min(len(encoded.input_ids), batch * max_batches)
    total, tokens = 0.0, 0
    for start in range(0, count, batch):
        index = np.arange(start, start + batch) % len(encoded.input_ids)
        ids, mask, labels = encoded.input_ids[index], encoded.attention_mask[index], encoded.labels[index]
        if start + batch > count:  # wrapped rows fill the batch but must not count twice
            labels = labels.copy()
            labels[count - start :] = -100
        activations = head.forward(ids, mask, adapters).activations  # (B, T, H)
        loss, counted = tail.eval_loss(activations, mask, labels)
        total += loss * counted
        tokens += counted
    return total / max(tokens, 1), tokens
