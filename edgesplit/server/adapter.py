"""The model out of a federation: one PEFT LoRA adapter for the whole base model, or merged full weights.

    checkpoint round-0003/                                   adapter DIR/
      global_adapters.safetensors  layers [0, cut)    ─┐       adapter_config.json       peft's LoraConfig
      tail_lora.safetensors        layers [cut, L)    ─┴──>    adapter_model.safetensors base_model.model.<layers
                                                                                          path>.<layer>.<module>.lora_A|B.weight

A U-shaped run's global adapters also hold the device's top layers [L-K, L), and its tail LoRA the server's
middle [cut, L-K): the union is the whole model's all the same.

Both halves already use one naming, by absolute layer (edgesplit/lora_names.py), so the adapter is the union
of the two, keyed as PEFT keys it; nothing is transposed or rescaled: the head's and the tail's LoRA already
hold PEFT's layout (A: (rank, in), B: (out, rank)) and scale updates by alpha / rank as PEFT does.
`target_modules` lists every adapted module by its full name, so PEFT adapts exactly those modules and no
same-named module elsewhere in the base model.

When the base is a .gguf file, the same matrices also go into adapter.gguf for llama.cpp (adapter_gguf.py).
`--merge` loads the base model, applies the adapter with peft, merges it into the weights and saves a plain
transformers model directory (safetensors, config and tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.client.artifacts import TAIL, Manifest, load_manifest
from edgesplit.errors import ArtifactError
from edgesplit.lora_names import adapter_name, parse_adapter_name, to_peft_keys

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GGUF_FILE = "adapter.gguf"  # written too when the base is a .gguf file, for llama.cpp


def round_directory(checkpoint_dir: Path, round_number: int | None) -> Path:
    """The round directory to export: `round_number`'s, or the newest complete one."""
    if not checkpoint_dir.is_dir():
        raise ArtifactError(f"no checkpoint directory at {checkpoint_dir}: pass the server's --checkpoint-dir")
    rounds = sorted(path.name for path in checkpoint_dir.glob("round-[0-9]*") if path.is_dir())
    if round_number is None:
        pointer = checkpoint_dir / "latest"
        if not pointer.is_file():
            raise ArtifactError(f"{checkpoint_dir} holds no finished round (no 'latest' file): train first")
        folder = checkpoint_dir / pointer.read_text().strip()
        aside = folder.with_name(f".{folder.name}.replaced")
        if not folder.is_dir() and aside.is_dir():  # killed while replacing this round: the old copy is whole
            folder = aside
    else:
        if round_number < 1:
            raise ArtifactError(f"rounds are counted from 1, got --round {round_number}")
        folder = checkpoint_dir / f"round-{round_number:04d}"
    if not folder.is_dir():
        have = ", ".join(name.removeprefix("round-").lstrip("0") or "0" for name in rounds) or "none"
        wanted = folder.name if round_number is None else f"round {round_number}"
        raise ArtifactError(f"{checkpoint_dir} has no {wanted} (rounds there: {have})")
    return folder


def load_round_adapters(folder: Path) -> tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(round, the head's global adapters, the tail's LoRA) of one round directory."""
    from safetensors.numpy import load_file

    try:
        state = json.loads((folder / "state.json").read_text())
        head = load_file(str(folder / "global_adapters.safetensors"))
        tail = load_file(str(folder / "tail_lora.safetensors"))
        return int(state["round"]), head, tail
    except (OSError, ValueError, KeyError) as error:
        raise ArtifactError(f"cannot read the checkpoint in {folder}: {error}") from error


def check_adapters_fit(manifest: Manifest, head: Mapping[str, np.ndarray], tail: Mapping[str, np.ndarray]) -> None:
    """The head's adapters are the manifest's, and the tail's cover its layers with the same modules and shapes.

    A checkpoint of another model, cut or LoRA setting is refused here, saying what differs, before anything
    is written.
    """
    expected_head = {**manifest.lora.matrices, **manifest.top_matrices}  # a U-shaped device's top is the device's
    _compare_names("head (global adapters)", set(head), set(expected_head))
    for name, shape in expected_head.items():
        if tuple(head[name].shape) != tuple(shape):
            raise ArtifactError(f"adapter {name} has shape {tuple(head[name].shape)}, the artifacts say {tuple(shape)}")
    if not manifest.has_stage(TAIL):  # a whole-model head: the device holds every layer
        if tail:
            raise ArtifactError("the checkpoint has tail adapters, but these artifacts have no tail (--full-model)")
        return
    stage = manifest.stage(TAIL)
    trained = range(stage.first_layer, manifest.top_first_layer)  # a U-shaped export's server trains the middle
    # Every layer carries LoRA on the same modules: the head's tell which, when the head has any.
    module_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    for name, value in head.items():
        parsed = parse_adapter_name(name)  # a name the manifest lists: valid
        module_shapes[(parsed.module_path, parsed.matrix)] = tuple(value.shape)
    if module_shapes:
        expected_tail = {
            adapter_name(layer, module_path, matrix) for layer in trained for module_path, matrix in module_shapes
        }
        _compare_names("tail (tail LoRA)", set(tail), expected_tail)
    for name, value in tail.items():
        try:
            parsed = parse_adapter_name(name)
        except ValueError as error:
            raise ArtifactError(f"the checkpoint's tail LoRA holds {error}") from None
        if parsed.layer not in trained:
            raise ArtifactError(f"tail adapter {name} is outside the tail's layers [{trained.start}, {trained.stop})")
        head_shape = module_shapes.get((parsed.module_path, parsed.matrix))
        if head_shape is not None and tuple(value.shape) != head_shape:
            raise ArtifactError(f"tail adapter {name} has shape {tuple(value.shape)}, the head's {head_shape}")


def _compare_names(side: str, names: set[str], expected: set[str]) -> None:
    if names != expected:
        raise ArtifactError(
            f"the checkpoint's {side} do not match these artifacts (another model, cut or LoRA setting?): "
            f"missing {sorted(expected - names)[:4]}, unexpected {sorted(names - expected)[:4]}"
        )


def peft_config(manifest: Manifest, adapter_names: list[str]) -> Any:
    """peft's LoraConfig for the whole base model, adapting exactly the modules `adapter_names` name."""
    from peft import LoraConfig

    from edgesplit.export.families import family_by_name

    family = family_by_name(manifest.family)
    modules = sorted(
        {
            f"{family.layers_path}.{parsed.layer}.{parsed.module_path}"
            for parsed in map(parse_adapter_name, adapter_names)
        }
    )
    # PEFT types lora_alpha as an int but only ever divides it by r: a fractional alpha stays a float, exact.
    alpha: Any = int(manifest.lora.alpha) if float(manifest.lora.alpha).is_integer() else manifest.lora.alpha
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=manifest.lora.rank,
        lora_alpha=alpha,
        target_modules=modules,
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=family.weight_is_in_out,
        base_model_name_or_path=manifest.model_source,
    )


def write_adapter(manifest: Manifest, adapters: Mapping[str, np.ndarray], out_dir: Path) -> Path:
    """adapter_config.json and adapter_model.safetensors for `adapters` (by adapter name) in `out_dir`."""
    from safetensors.numpy import save_file

    from edgesplit.export.families import family_by_name

    if not adapters:
        raise ArtifactError("the checkpoint holds no LoRA matrices: there is no adapter to write")
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--out {out_dir} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    layers_path = family_by_name(manifest.family).layers_path
    weights = {
        key: np.ascontiguousarray(value, dtype=np.float32) for key, value in to_peft_keys(adapters, layers_path).items()
    }
    save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    peft_config(manifest, sorted(adapters)).save_pretrained(str(out_dir))
    return out_dir


def write_merged(adapter_dir: Path, base: str, out_dir: Path) -> Path:
    """The base model with the adapter merged into its weights, saved as a transformers model directory."""
    from peft import PeftModel

    from edgesplit.export.models import load_model

    loaded = load_model(base)  # a hub id, a local directory or a .gguf file, as the export took it
    merged = PeftModel.from_pretrained(loaded.model, str(adapter_dir)).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(out_dir))
    return out_dir


# transformers classes whose GGUF layout the adapter writer knows (edgesplit/server/adapter_gguf.py)
GGUF_ADAPTER_ARCHITECTURES = frozenset({"LlamaForCausalLM", "GPT2LMHeadModel"})


def write_gguf_for_base(manifest: Manifest, artifacts: Path, adapters: Mapping[str, np.ndarray], path: Path) -> Path:
    """The adapter as llama.cpp's GGUF LoRA file, for the base model the export read."""
    from edgesplit.export.families import family_by_name
    from edgesplit.server.adapter_gguf import attention_heads_of, write_gguf_adapter

    # The family says where the layers are, not how llama.cpp lays out the weights: Qwen and Gemma share the
    # llama family, but their GGUF conversions do not interleave the q and k rows as Llama's does.
    if manifest.architecture not in GGUF_ADAPTER_ARCHITECTURES:
        raise ArtifactError(
            f"no GGUF adapter for a {manifest.architecture} base (GGUF adapters are written for "
            f"{', '.join(sorted(GGUF_ADAPTER_ARCHITECTURES))}): use the PEFT adapter, or merge it into the model"
        )
    heads, key_value_heads = attention_heads_of(artifacts, Path(manifest.model_source))
    layers_path = family_by_name(manifest.family).layers_path
    alpha, layers = manifest.lora.alpha, manifest.num_layers
    return write_gguf_adapter(adapters, manifest.family, layers_path, layers, heads, key_value_heads, alpha, path)


def export_adapter(
    checkpoint_dir: Path, artifacts: Path, out_dir: Path, round_number: int | None = None, merge: bool = False
) -> tuple[int, Path]:
    """Write the adapter (or, with `merge`, the merged model) of a checkpoint's round; (round, out_dir)."""
    manifest = load_manifest(artifacts, verify=False)
    folder = round_directory(checkpoint_dir, round_number)
    finished, head, tail = load_round_adapters(folder)
    if manifest.cuts:  # a mixed-cut run: layers from the smallest cut on are the tail's, which holds their average
        head = {name: value for name, value in head.items() if name in manifest.lora.matrices}
    check_adapters_fit(manifest, head, tail)
    adapters = {**head, **tail}
    if not merge:
        write_adapter(manifest, adapters, out_dir)
        # llama.cpp runs a GGUF base: give it the adapter too, where we know its GGUF layout.
        if manifest.model_source.endswith(".gguf") and manifest.architecture in GGUF_ADAPTER_ARCHITECTURES:
            write_gguf_for_base(manifest, artifacts, adapters, out_dir / GGUF_FILE)
        return finished, out_dir
    with tempfile.TemporaryDirectory(prefix="edgesplit-adapter-") as scratch:
        write_adapter(manifest, adapters, Path(scratch))
        return finished, write_merged(Path(scratch), manifest.model_source, out_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit adapter",
        description="Write a federation's result as a PEFT LoRA adapter for the whole base model (or merged weights).",
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="the server's checkpoint directory")
    parser.add_argument("--round", type=int, default=None, help="the round to export (default: the newest)")
    parser.add_argument("--artifacts", type=Path, required=True, help="the artifact directory the run trained")
    parser.add_argument("--out", type=Path, required=True, help="directory to write the adapter (or model) into")
    parser.add_argument("--merge", action="store_true", help="write merged full weights instead of an adapter")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    finished, out_dir = export_adapter(args.checkpoint, args.artifacts, args.out, args.round, args.merge)
    if args.merge:
        print(f"merged model of round {finished} written to {out_dir}")
        print(f"  try it: edgesplit generate --base {out_dir} --prompt 'your prompt'")
    else:
        print(f"PEFT adapter of round {finished} written to {out_dir}")
        print(f"  try it: edgesplit generate --adapter {out_dir} --prompt 'your prompt'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
