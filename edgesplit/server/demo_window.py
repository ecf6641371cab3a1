"""The demo's window (sequence length) and what it does to the data.

    --data, --eval-data ─ the model's tokenizer (an earlier export's, or the model's own) ─> token counts
        ─> the shortest multiple of 16 that holds 95% of the examples whole (or a refusal naming it)
    after the export ─ its tokenizer and window ─> per side: examples cut, examples left with no target token

Also which model an export came from (`same_model`): an earlier export's tokenizer serves only that model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from edgesplit.errors import EdgesplitError
from edgesplit.export.models import DEFAULT_MODEL  # the module imports torch only when it loads a model
from edgesplit.server.demo_config import GENERATED_TASK_WINDOW, DemoConfig, DemoError, say


def default_model_source() -> Path:
    """Where edgesplit.export.models caches the default model: the exporter records this path as the model source."""
    from edgesplit.export.models import DEFAULT_GGUF_MEMBER, cache_dir

    return cache_dir() / "models" / DEFAULT_MODEL / Path(DEFAULT_GGUF_MEMBER).name


def same_model(config: DemoConfig, manifest: Any) -> bool:
    """Whether the export of `manifest` came from the model `config` asks for."""
    requested = default_model_source() if config.model == DEFAULT_MODEL else Path(config.model).expanduser()
    if requested.exists():
        return requested.resolve() == Path(manifest.model_source).expanduser().resolve()
    return bool(manifest.model_source == config.model)  # a hub id


# ---------------------------------------------------------------------------------------------- the window


def measuring_tokenizer(config: DemoConfig) -> tuple[Any, int | None]:
    """The model's tokenizer (a `tokenizers.Tokenizer`) and EOS id before any export of this run: an earlier
    export's of the same model, or else the model's own (which downloads the default model on first use)."""
    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.data import load_tokenizer

    artifacts = config.out / "artifacts"
    try:
        manifest = load_manifest(artifacts, verify=False)
        if same_model(config, manifest):
            return load_tokenizer(artifacts), manifest.eos_token_id
    except EdgesplitError:
        pass  # no usable earlier export: read the model's own
    from edgesplit.export.models import fetch_default_model, load_gguf_tokenizer

    say(f"reading the tokenizer of {config.model} to size the window for your data")
    try:
        from transformers import AutoTokenizer

        if config.model == DEFAULT_MODEL:
            tokenizer = load_gguf_tokenizer(fetch_default_model())
        else:
            tokenizer = AutoTokenizer.from_pretrained(config.model)
    except (OSError, ValueError) as error:
        raise DemoError(f"cannot read the tokenizer of {config.model!r} to size the window: {error}") from None
    if not tokenizer.is_fast:
        raise DemoError(f"model {config.model!r} has no fast tokenizer (tokenizer.json); the edge client needs one")
    return tokenizer.backend_tokenizer, tokenizer.eos_token_id


def size_window(config: DemoConfig) -> DemoConfig:
    """`config` with its window settled: the user's --max-seq-len, the generated task's 16, or with --data the
    length that holds 95% of the examples (training and scored) whole. One past the cap is refused, naming it."""
    if config.max_seq_len is not None:
        return config
    if config.data is None or config.eval_data is None:
        return replace(config, max_seq_len=GENERATED_TASK_WINDOW)
    from edgesplit.client.data import read_jsonl, sequence_lengths

    tokenizer, eos_token_id = measuring_tokenizer(config)
    examples = read_jsonl(config.data) + read_jsonl(config.eval_data)[: config.eval_examples]
    lengths = sequence_lengths(tokenizer, examples, eos_token_id)
    window = lengths.window_fitting(0.95, 16)
    if window > config.max_seq_len_cap:
        raise DemoError(
            f"95% of the examples of --data and --eval-data fit in {window} tokens, more than --max-seq-len-cap "
            f"{config.max_seq_len_cap} (the longest is {max(lengths.total)}): pass --max-seq-len {window} to train "
            "on them whole (a step costs more with every token), or a shorter --max-seq-len to cut them"
        )
    # Counts, not a rounded share: "100%" beside "the longest has 132" would read as a contradiction.
    whole = len(lengths.total) - lengths.truncated(window)
    say(
        f"window: {window} tokens, which holds {whole} of your {len(lengths.total)} examples whole (the longest "
        f"has {max(lengths.total)}); --max-seq-len sets another"
    )
    return replace(config, max_seq_len=window)


def data_fit(artifacts: Path, train: Path, eval_examples: list[Any]) -> dict[str, dict[str, int]]:
    """What the export's window does to each side's examples (the training file, the scored examples): how
    many it cuts, how many it leaves with no target token (those teach and score nothing), by the tokenizer
    that training uses."""
    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.data import load_tokenizer, read_jsonl, sequence_lengths

    manifest = load_manifest(artifacts, verify=False)
    tokenizer = load_tokenizer(artifacts)
    fit = {}
    for side, examples in (("train", read_jsonl(train)), ("eval", eval_examples)):
        lengths = sequence_lengths(tokenizer, examples, manifest.eos_token_id)
        fit[side] = {
            "examples": len(examples),
            "truncated": lengths.truncated(manifest.max_seq_len),
            "without_targets": lengths.without_targets(manifest.max_seq_len),
            "longest": max(lengths.total, default=0),
        }
        counts = fit[side]
        text = (
            f"{side} data in the {manifest.max_seq_len}-token window: {counts['truncated']} of "
            f"{counts['examples']} examples cut, {counts['without_targets']} left with no target token"
        )
        if counts["without_targets"] or counts["truncated"] > 0.05 * counts["examples"]:
            text += f"; WARNING: a longer --max-seq-len would fit more (the longest example has {counts['longest']})"
        say(text)
    return fit
