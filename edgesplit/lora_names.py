"""One name for every LoRA matrix: the head's graph, the tail, checkpoints, aggregation and PEFT adapters.

    layers.<layer>.<module path inside the layer>.lora_<A|B>

    layers.3.self_attn.q_proj.lora_A    (rank, in_features)     Llama-like, layer 3 of the whole model
    layers.1.attn.c_proj.lora_B         (out_features, rank)    GPT-2: two modules share the last name
    layers.1.mlp.c_proj.lora_B                                  c_proj, so the whole path is kept

<layer> is the decoder layer's index in the whole model, never counted from a cut: the same matrix has the
same name on a device that holds it in its head and on a server that holds it in its tail, whatever the cut.
The module path is the one PEFT sees inside the layer, so a name maps to PEFT's keys by adding the model's
own path to its layers (`model.layers` for Llama-like models, `transformer.h` for GPT-2) and nothing else.
The gradient graph names the gradient of a matrix `grad.<name>`.

Pure string handling, no torch: the edge client reads these names too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

Value = TypeVar("Value")

LAYERS = "layers"
MATRICES = ("A", "B")
GRADIENT_PREFIX = "grad."

_SEGMENT = r"[A-Za-z0-9_]+"
_MODULE_PATH = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_NAME = re.compile(rf"{LAYERS}\.(\d+)\.({_MODULE_PATH.pattern})\.lora_([AB])")


@dataclass(frozen=True)
class AdapterName:
    """One LoRA matrix: the layer it sits in (absolute), the module's path inside that layer, A or B."""

    layer: int
    module_path: str  # e.g. "self_attn.q_proj", "mlp.c_proj"
    matrix: str  # "A" (rank, in_features) or "B" (out_features, rank), as PEFT's lora_A / lora_B

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"an adapter's layer must be an integer >= 0, got {self.layer!r}")
        if not isinstance(self.module_path, str) or _MODULE_PATH.fullmatch(self.module_path) is None:
            raise ValueError(f"module path {self.module_path!r} is not a dotted path of names")
        if self.matrix not in MATRICES:
            raise ValueError(f"a LoRA matrix is 'A' or 'B', got {self.matrix!r}")

    def __str__(self) -> str:
        return f"{LAYERS}.{self.layer}.{self.module_path}.lora_{self.matrix}"

    def peft_key(self, layers_path: str, adapter: str | None = None) -> str:
        """This matrix's key in PEFT: `base_model.model.<layers_path>.<layer>.<path>.lora_A.weight`.

        Without `adapter` it is the key of a saved adapter (adapter_model.safetensors); with it, the name of
        the live parameter in a PeftModel (`....lora_A.<adapter>.weight`).
        """
        matrix = f"lora_{self.matrix}" if adapter is None else f"lora_{self.matrix}.{adapter}"
        return f"base_model.model.{layers_path}.{self.layer}.{self.module_path}.{matrix}.weight"


def adapter_name(layer: int, module_path: str, matrix: str) -> str:
    return str(AdapterName(layer, module_path, matrix))


def parse_adapter_name(name: str) -> AdapterName:
    """The parts of a name; ValueError, saying what a name looks like, for anything else."""
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"{name!r:.120} is not an adapter name (layers.<layer>.<module path>.lora_A or .lora_B)")
    return AdapterName(int(match.group(1)), match.group(2), match.group(3))


def is_adapter_name(name: str) -> bool:
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def gradient_name(name: str) -> str:
    return GRADIENT_PREFIX + name


def from_peft_key(key: str, layers_path: str, first_layer: int = 0) -> AdapterName | None:
    """The adapter name of a PEFT LoRA key (saved or live, see `AdapterName.peft_key`); None for other keys.

    `first_layer` is the absolute index of the model's layer 0: a tail built of layers [cut, L) numbers
    them from 0, and its names must say cut + i.
    """
    pattern = rf"(?:base_model\.model\.)?{re.escape(layers_path)}\.(\d+)\.(.+)\.lora_([AB])(?:\.{_SEGMENT})?\.weight"
    match = re.fullmatch(pattern, key)
    if match is None:
        return None
    return AdapterName(first_layer + int(match.group(1)), match.group(2), match.group(3))


def to_peft_keys(adapters: Mapping[str, Value], layers_path: str) -> dict[str, Value]:
    """Adapters by adapter name -> the same values keyed as PEFT's adapter_model.safetensors keys them.

    `layers_path` is the family's path to its decoder layers ("model.layers", "transformer.h"). ValueError
    for a key that is not an adapter name.
    """
    return {parse_adapter_name(name).peft_key(layers_path): value for name, value in adapters.items()}


def matches_target(module_path: str, targets: tuple[str, ...]) -> bool:
    """PEFT's rule for `target_modules` given as names: the whole path, or its last dotted parts.

    "c_proj" matches both of GPT-2's c_proj modules, "mlp.c_proj" only the MLP's; the head and PEFT's tail
    must pick the same modules for one set of targets.
    """
    return any(module_path == target or module_path.endswith(f".{target}") for target in targets)
