"""Checks on `--model` and the cut layer that run before any weights load, so that a mistake costs no time.

Loading a model takes 35-60 s (and a hub id that does not exist spends about 50 s on retries), so what can be
known without loading it is checked first:
    the name      a known alias, an existing path, or something shaped like a hub id (`owner/name`); a typo of
                  an alias is refused with the closest alias
    the depth     from a local directory's config.json, a GGUF file's header, or an alias's known depth; a hub
                  id's depth is only known once it is loaded, where the exporter checks the cut again
    the kind      from the same config or header: a mixture-of-experts, encoder-decoder, multimodal or other
                  non-causal model is refused with the reason (`check_architecture`)

Nothing here imports torch or transformers: it runs on a device install too.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

from edgesplit.errors import ExportError
from edgesplit.export.models import DEFAULT_MODEL

# Aliases --model accepts, with their number of transformer layers (SmolLM2-135M has 30).
KNOWN_MODEL_DEPTHS: dict[str, int] = {DEFAULT_MODEL: 30}

# The hub's repository ids: an owner and a name of letters, digits, '.', '_' and '-' (96 characters at most).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
HUB_ID_MAX_LENGTH = 96
BARE_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

# Where each model family's config.json names its number of layers.
DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

MODEL_FORMS = f"a Hugging Face hub id (owner/name), a local model directory, a .gguf file, or {DEFAULT_MODEL!r}"


def is_hub_id(name: str) -> bool:
    return len(name) <= HUB_ID_MAX_LENGTH and HUB_ID.fullmatch(name) is not None and ".." not in name


def _in_hub_cache(name: str) -> bool:
    """Whether the hub's local cache holds a bare model name (`gpt2`): the hub's oldest models have no owner."""
    hub_home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub"
    )
    return (Path(hub_home) / f"models--{name}").is_dir()


def _looks_like_a_path(name: str) -> bool:
    # "a/b" is a hub id unless it exists here; "a/b/c", "./a" and "a.gguf" can only be paths.
    if name.startswith((".", os.sep, "~")) or name.endswith(".gguf"):
        return True
    return os.sep in name and not is_hub_id(name)


def check_model_name(name: str) -> None:
    """Refuse at once a `--model` that cannot name a model: it would otherwise be tried on the hub, slowly."""
    if name in KNOWN_MODEL_DEPTHS:
        return
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
            return
        raise ExportError(f"--model {name!r}: {path} is neither a model directory nor a .gguf file")
    if _looks_like_a_path(name):
        raise ExportError(f"--model {name!r}: no such file or directory")
    if is_hub_id(name) or _in_hub_cache(name):
        return
    # A bare name may be one of the hub's oldest models, which have no owner (`gpt2`): let it go to the hub,
    # unless it is a near miss of a name we know (`smollm2-13m`), which is far more likely a typo.
    close = difflib.get_close_matches(name, KNOWN_MODEL_DEPTHS, n=1, cutoff=0.6)
    if not close and BARE_HUB_NAME.fullmatch(name):
        return
    suggestion = f"; did you mean {close[0]!r}?" if close else ""
    raise ExportError(
        f"unknown model {name!r}: not a known name, an existing path, or a hub id{suggestion}\n"
        f"--model takes {MODEL_FORMS}"
    )


def _depth_from_config(config_path: Path) -> int | None:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None  # the loader will say what is wrong with it
    if not isinstance(config, dict):
        return None
    for key in DEPTH_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _depth_from_gguf(path: Path) -> int | None:
    """`<architecture>.block_count` from the file's header; the tensors are mapped, not read."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
        block_count = reader.fields[f"{architecture}.block_count"].contents()
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        # Not a GGUF file this reader understands (or an older gguf without contents()): the loader will say.
        return None
    return int(block_count) if isinstance(block_count, int) and block_count > 0 else None


def known_depth(name: str) -> int | None:
    """The model's number of layers if it can be read without loading the weights, else None (a hub id)."""
    if name in KNOWN_MODEL_DEPTHS:
        return KNOWN_MODEL_DEPTHS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        return _depth_from_config(path / "config.json")
    if path.is_file() and path.suffix == ".gguf":
        return _depth_from_gguf(path)
    return None


def check_cut_layers(cut_layers: tuple[int, ...], num_layers: int, flag: str = "--cut-layer") -> None:
    """Every cut keeps at least one layer on each side: 1 <= cut <= num_layers - 1."""
    for cut_layer in cut_layers:
        if not 1 <= cut_layer <= num_layers - 1:
            raise ExportError(
                f"{flag} {cut_layer} is out of range: this model has {num_layers} layers, so a cut must be "
                f"between 1 and {num_layers - 1} (at least one layer on each side)"
            )


def check_top_layers(top_layers: int, cut_layer: int, num_layers: int) -> None:
    """A U-shaped split keeps at least one layer in the server's middle: cut + top_layers <= num_layers - 1."""
    if top_layers < 0:
        raise ExportError(
            f"--top-layers {top_layers} is negative: it is how many of the last layers the device runs besides "
            "the first ones (0: only the final norm, the LM head and the loss)"
        )
    if cut_layer + top_layers > num_layers - 1:
        raise ExportError(
            f"--top-layers {top_layers} with --cut-layer {cut_layer} leaves no middle for the server: this model "
            f"has {num_layers} layers, so --top-layers can be at most {num_layers - 1 - cut_layer} at this cut"
        )


# Mixture-of-experts model types, by transformers' and GGUF's names. Their routers pick each token's experts at
# run time (`nonzero` / `where` over the routing mask), so each expert's batch has a data-dependent size: the
# device's ahead-of-time graphs, traced for one fixed shape, cannot hold that.
MOE_MODEL_TYPES = frozenset(
    {
        "mixtral",
        "qwen2_moe",
        "qwen2moe",
        "qwen3_moe",
        "qwen3moe",
        "granitemoe",
        "granitemoeshared",
        "granitemoehybrid",
        "olmoe",
        "phimoe",
        "dbrx",
        "jamba",
        "deepseek_v2",
        "deepseek_v3",
        "gpt_oss",
        "gpt-oss",
        "minimax_m2",
        "minimax-m2",
        "llama4_text",
    }
)
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def architecture_refusal(model_type: object, config: dict[str, object]) -> str | None:
    """Why a model of this config cannot be split into a device head and a server tail, or None."""
    experts = [config.get(key) for key in EXPERT_COUNT_KEYS]
    if model_type in MOE_MODEL_TYPES or any(isinstance(n, int) and n > 1 for n in experts):
        return (
            "it is a mixture-of-experts model, whose router gives each expert a batch of data-dependent size; "
            "the device's graphs are traced ahead of time for one fixed shape and cannot route"
        )
    if config.get("is_encoder_decoder") is True:
        return "it is an encoder-decoder model; edgesplit splits decoder-only causal LMs"
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures:
        if not any(isinstance(a, str) and a.endswith(CAUSAL_LM_SUFFIXES) for a in architectures):
            return (
                f"its architecture {architectures[0]} is not a causal LM (for a multimodal model such as Gemma 3, "
                "export its text model, saved as a ...ForCausalLM)"
            )
    return None


def _config_of(name: str) -> tuple[object, dict[str, object]] | None:
    """(model_type, config) from a local directory's config.json or a GGUF file's header, else None."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None  # the loader will say what is wrong with it
        return (config.get("model_type"), config) if isinstance(config, dict) else None
    if path.is_file() and path.suffix == ".gguf":
        try:
            from gguf import GGUFReader

            architecture = GGUFReader(path).fields["general.architecture"].contents()
        except (ImportError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return None
        return architecture, {}
    return None


def check_architecture(name: str) -> None:
    """Refuse, from its config alone, a model that edgesplit cannot split: before its weights load."""
    found = _config_of(name)
    if found is None:
        return  # a hub id or an alias: checked once loaded (the default is a llama)
    model_type, config = found
    reason = architecture_refusal(model_type, config)
    if reason is not None:
        raise ExportError(f"--model {name!r} ({model_type}) cannot be exported: {reason}")
