"""Tiny random-initialised models of every supported family, saved as local model directories.

FAMILY_CONFIGS drives every model test across the suite (training, serving, adapters): one model per
layout, llama's and GPT-2's. PARITY_CONFIGS adds a row per model type the exporter's adapters handle, for
the split's parity tests (tests/export/test_families.py): adding a family means adding a row there.
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

_TOKENS: dict[str, object] = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # as build_tokenizer's
# Shared by the rows below: 3 layers of width 32, 4 query and 2 key/value heads of 8.
_DECODER: dict[str, object] = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    **_TOKENS,
)

PARITY_CONFIGS: dict[str, dict[str, object]] = {
    **FAMILY_CONFIGS,
    "mistral": dict(model_type="mistral", **_DECODER, sliding_window=4),
    "qwen2": dict(model_type="qwen2", **_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", **_DECODER, head_dim=8, tie_word_embeddings=True),
    # Layers 0 and 2 without rotary: a cut at 1 shifts the pattern, which must follow the layers.
    "smollm3": dict(model_type="smollm3", **_DECODER, no_rope_layers=[0, 1, 0]),
    "gemma": dict(model_type="gemma", **_DECODER, head_dim=8),
    "gemma2": dict(
        model_type="gemma2",
        **_DECODER,
        head_dim=8,
        sliding_window=4,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        **_DECODER,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "phi3": dict(model_type="phi3", **_DECODER),
    "granite": dict(
        model_type="granite",
        **_DECODER,
        embedding_multiplier=3.0,
        residual_multiplier=0.5,
        logits_scaling=2.0,
        attention_multiplier=0.2,
    ),
    "phi": dict(model_type="phi", **_DECODER, partial_rotary_factor=0.5),
    "gpt_neox": dict(
        model_type="gpt_neox",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        rotary_pct=0.5,
        use_parallel_residual=True,
        **_TOKENS,
    ),
    "falcon": dict(
        model_type="falcon",
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        parallel_attn=True,
        alibi=False,
        **_TOKENS,
    ),
    "opt": dict(
        model_type="opt",
        vocab_size=128,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        **_TOKENS,
    ),
}


def tiny_model(family: str, seed: int = 0, **overrides: object):  # type: ignore[no-untyped-def]
    """A random-initialised tiny causal LM of `family` (a PARITY_CONFIGS key), in memory, float32, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {**PARITY_CONFIGS[family], **overrides}
    config = AutoConfig.for_model(str(settings.pop("model_type")), **settings)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def build_tokenizer():  # type: ignore[no-untyped-def]
    """A word-level tokenizer over w0..w95 plus specials, splitting on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def save_tiny_model(family: str, directory: Path, seed: int = 0, **overrides: object) -> Path:
    """A tiny model of `family` (a PARITY_CONFIGS key) and the tokenizer, saved as a local model directory;
    `overrides` replace entries of the family's config (num_hidden_layers=4 for a deeper model, say)."""
    model = tiny_model(family, seed, **overrides)
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def save_tiny_gemma3_gguf(path: Path, seed: int = 0) -> Path:
    """The tiny Gemma 3 text model as a GGUF file, written by the `gguf` package as llama.cpp lays it out
    (its tensor names, norm weights stored plus one, a sentencepiece vocabulary), with no LM head: tied."""
    import gguf
    import numpy as np

    model = tiny_model("gemma3_text", seed)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_embedding_length(config.hidden_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(config.sliding_window)
    tokens = [*SPECIAL, "<bos>", *(f"\u2581{word}" for word in VOCAB)]
    tokens += [f"<unused{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([3, 2, 3, 3] + [1] * (len(tokens) - 4))  # control, unknown, normal
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_bos_token_id(3)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_hidden_layers)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise KeyError(f"no GGUF name for {key}")
        value = tensor.detach().numpy().astype(np.float32)
        writer.add_tensor(name, value + 1.0 if key.endswith("norm.weight") else value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
