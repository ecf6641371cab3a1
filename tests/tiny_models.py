"""Tiny random-initialised models of every supported family, saved as local model directories.

One table, FAMILY_CONFIGS, drives every model test: adding a family to the exporter means adding a row here.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = [f"w{i}" for i in range(96)]
SPECIAL = ["<pad>", "<unk>", "<eos>"]

FAMILY_CONFIGS: dict[str, dict[str, object]] = {
    "llama": dict(
        model_type="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "gpt2": dict(model_type="gpt2", vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64),
}


def build_tokenizer():  # type: ignore[no-untyped-def]
    """A word-level tokenizer over w0..w95 plus specials, splitting on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def save_tiny_model(family: str, directory: Path, seed: int = 0, **overrides: object) -> Path:
    """`overrides` replace entries of the family's config (num_hidden_layers=4 for a deeper model, say)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {**FAMILY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(str(settings.pop("model_type")), **settings)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory
