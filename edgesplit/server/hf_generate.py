"""Greedy generation with the exported model through transformers: batched, left-padded, with a KV cache.

    prompts ─ tokenize, pad left to (B, T) ─> base model (+ PEFT adapter) ─ generate, KV cache ─> (B, T + N)
            ─> the N new tokens of each row, cut after its first EOS ─> text

Left padding keeps every row's last prompt token in the last column, so one decoding step serves the whole
batch; transformers derives the position ids from the attention mask, so a padded row computes what it
would alone. Each step runs only the new token against the cached keys and values, unlike the split model's
own generation (edgesplit/server/generate.py), which reruns the whole window for every token.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgesplit.errors import ArtifactError, DataError


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 40
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class Completion:
    prompt: str
    output: str
    tokens: tuple[int, ...]  # the new tokens, with the EOS that ended them if the model stopped by itself


def base_of_adapter(adapter_dir: Path) -> str:
    """The base model an adapter was written for (its config's base_model_name_or_path)."""
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise ArtifactError(
            f"{adapter_dir} is no PEFT adapter (no adapter_config.json); write one with `edgesplit adapter`"
        )
    try:
        base = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise ArtifactError(f"cannot read {config}: {error}") from error
    if not base:
        raise ArtifactError(f"{config} names no base model: pass --base")
    return str(base)


def load_for_generation(base: str | None, adapter_dir: Path | None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer): `base` (or the adapter's own base) with the adapter applied."""
    from edgesplit.errors import ExportError
    from edgesplit.export.models import load_model

    if base is None:
        if adapter_dir is None:
            raise ArtifactError("give --base MODEL, --adapter DIR, or both")
        base = base_of_adapter(adapter_dir)
    try:
        loaded = load_model(base)
    except ExportError as error:
        raise ArtifactError(str(error)) from error
    model = loaded.model
    if adapter_dir is not None:
        from peft import PeftModel

        base_of_adapter(adapter_dir)  # a clear error for a directory that is no adapter
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, loaded.tokenizer


def generate_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    pad_token_id: int,
    eos_token_id: int | None,
    batch_size: int,
) -> list[list[int]]:
    """Greedy continuations of token-id `prompts`, row i at most `max_new_tokens[i]` tokens long and ending
    with EOS where the model stopped by itself.

    Prompts go through in batches of similar length (longest first), so that left padding wastes little; the
    outputs come back in the prompts' order.
    """
    import torch

    if len(max_new_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    for row, prompt in enumerate(prompts):
        if not prompt:
            raise DataError(f"prompt {row} is empty")
    order = sorted(range(len(prompts)), key=lambda row: -len(prompts[row]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[row]) for row in rows)
        budget = max(max_new_tokens[row] for row in rows)
        if budget < 1:
            continue
        input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)  # (B, T), padded on the left
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            prompt = prompts[row]
            input_ids[index, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[index, width - len(prompt) :] = 1
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=budget,
                do_sample=False,
                num_beams=1,
                use_cache=True,
                pad_token_id=pad_token_id,
                eos_token_id=eos_token_id,
            )  # (B, T + N)
        for row, new in zip(rows, output[:, width:].tolist(), strict=True):
            if eos_token_id is not None and eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]  # after EOS come only pad tokens
            outputs[row] = new[: max_new_tokens[row]]  # a row with a smaller budget stops where it would alone
    return outputs


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings) -> list[Completion]:
    """Greedy completions of `prompts`, `settings.batch_size` at a time.

    Prompts are tokenized as training tokenized them: without special tokens (no BOS the model never saw).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ArtifactError("the tokenizer has neither a pad nor an EOS token to pad the batch with")
    for row, prompt in enumerate(prompts):
        if not prompt.strip():
            raise DataError(f"prompt {row} is empty")
    token_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    outputs = generate_ids(model, token_ids, [settings.max_new_tokens] * len(prompts), pad, eos, settings.batch_size)
    return [
        Completion(prompt=prompt, output=tokenizer.decode(tokens, skip_special_tokens=True), tokens=tuple(tokens))
        for prompt, tokens in zip(prompts, outputs, strict=True)
    ]


def read_prompts(path: Path) -> tuple[list[str], list[str | None]]:
    """Prompts of a JSON Lines file as training formats them (prompt + separator), and their targets."""
    from edgesplit.client.data import DEFAULT_PROMPT_FORMAT, read_jsonl

    prompts, targets = [], []
    for example in read_jsonl(path):
        context, target = DEFAULT_PROMPT_FORMAT.context_and_target(example)
        prompts.append(context)
        targets.append(target if example.prompt is not None else None)
    if not prompts:
        raise DataError(f"{path}: no examples")
    return prompts, targets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit generate",
        description="Greedy generation with a base model and a PEFT adapter (batched, with a KV cache).",
    )
    parser.add_argument("--base", default=None, help="hub id, model directory or .gguf file (default: the adapter's)")
    parser.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter directory (`edgesplit adapter`)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompt",
        action="append",
        help="a prompt (repeat for several); a newline follows it, as training puts one after each prompt",
    )
    source.add_argument("--data", type=Path, help="a JSON Lines file of {prompt, completion} examples")
    parser.add_argument("--raw", action="store_true", help="send each --prompt as given, with no newline after it")
    parser.add_argument(
        "--max-new-tokens", type=int, default=40, help="tokens generated per prompt at most (default %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write JSON Lines here instead of printing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = GenerationSettings(args.max_new_tokens, args.batch_size)
    except ValueError as error:
        raise DataError(str(error)) from None
    if args.data is not None:
        prompts, targets = read_prompts(args.data)
    else:
        from edgesplit.client.data import DEFAULT_PROMPT_FORMAT

        separator = "" if args.raw else DEFAULT_PROMPT_FORMAT.separator
        prompts, targets = [prompt + separator for prompt in args.prompt], [None] * len(args.prompt)
    model, tokenizer = load_for_generation(args.base, args.adapter)
    completions = generate(model, tokenizer, prompts, settings)
    lines = []
    for completion, target in zip(completions, targets, strict=True):
        record: dict[str, Any] = {"prompt": completion.prompt, "output": completion.output}
        if target is not None:
            record["target"] = target
        lines.append(json.dumps(record, ensure_ascii=False))
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
        print(f"{len(lines)} completions written to {args.out}")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
