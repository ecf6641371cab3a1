"""The adapter as a GGUF LoRA file, for a GGUF base model run by llama.cpp (`llama-cli -m base.gguf --lora ...`).

    adapters by name                                 adapter.gguf (general.type "adapter", adapter.type "lora")
      layers.3.self_attn.q_proj.lora_A (r, in)  ──>    blk.3.attn_q.weight.lora_a  (r, in)
      layers.3.self_attn.q_proj.lora_B (out, r) ──>    blk.3.attn_q.weight.lora_b  (out, r), rows permuted

GGUF names a weight by its llama.cpp tensor name, which the `gguf` package's name map gives for a module's
Hugging Face name. Its weights are laid out as llama.cpp computes with them, and two families differ from
Hugging Face's layout: a Llama-like model's q and k rows are interleaved per head for llama.cpp's rotary
embedding (the conversion to GGUF permutes them), so the B matrix of q and k, whose rows are the weight's
rows, is permuted alike; GPT-2's Conv1D weights are stored transposed, as nn.Linear's, which is already the
layout of PEFT's A and B. Nothing else changes: llama.cpp scales the update by alpha / rank as PEFT does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgesplit.errors import ArtifactError
from edgesplit.lora_names import parse_adapter_name

# family -> the gguf package's architecture name for it
GGUF_ARCHITECTURES = {"llama": "LLAMA", "gpt2": "GPT2"}


def permute_for_rotary(rows: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q or k rows (heads * head_dim, ...) in the order llama.cpp's rotary embedding reads them:
    per head, the first and second halves interleaved."""
    half = rows.shape[0] // heads // 2
    interleaved: np.ndarray = rows.reshape(heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
    return interleaved


def write_gguf_adapter(
    adapters: Mapping[str, np.ndarray],
    family: str,
    layers_path: str,
    num_layers: int,
    attention_heads: int,
    key_value_heads: int,
    alpha: float,
    path: Path,
) -> Path:
    """Write `adapters` (by adapter name, PEFT's layout) as a llama.cpp LoRA adapter at `path`."""
    import gguf

    if family not in GGUF_ARCHITECTURES:
        known = sorted(GGUF_ARCHITECTURES)
        raise ArtifactError(f"no GGUF adapter for the {family!r} family (GGUF adapters exist for {known})")
    architecture = getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[family])
    names = gguf.get_tensor_name_map(architecture, num_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[architecture])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name in sorted(adapters):
        parsed = parse_adapter_name(name)
        module = f"{layers_path}.{parsed.layer}.{parsed.module_path}"
        tensor_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if tensor_name is None:
            raise ArtifactError(f"llama.cpp has no tensor for {module}: this adapter cannot be written as GGUF")
        matrix = np.ascontiguousarray(adapters[name], dtype=np.float32)
        if family == "llama" and parsed.matrix == "B" and parsed.module_path.endswith(("q_proj", "k_proj")):
            heads = attention_heads if parsed.module_path.endswith("q_proj") else key_value_heads
            matrix = np.ascontiguousarray(permute_for_rotary(matrix, heads))
        writer.add_tensor(f"{tensor_name}.lora_{parsed.matrix.lower()}", matrix)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def attention_heads_of(artifacts: Path, base_gguf: Path) -> tuple[int, int]:
    """(attention heads, key-value heads): from the tail's config, or the base GGUF's header without a tail."""
    import json

    config_path = artifacts / "tail" / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        heads = int(config.get("num_attention_heads", config.get("n_head", 0)))
        return heads, int(config.get("num_key_value_heads") or heads)
    import gguf

    try:
        reader = gguf.GGUFReader(str(base_gguf))
        architecture = _field(reader, "general.architecture")
        heads = int(_field(reader, f"{architecture}.attention.head_count"))
        key_value = f"{architecture}.attention.head_count_kv"
        return heads, int(_field(reader, key_value)) if key_value in reader.fields else heads
    except (OSError, ValueError, KeyError) as error:
        raise ArtifactError(f"cannot read the attention heads from {base_gguf}: {error}") from error


def _field(reader: object, key: str) -> str | int:
    field = reader.fields[key]  # type: ignore[attr-defined]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else int(value[0])
