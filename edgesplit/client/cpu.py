"""What the CPU offers for the head's int8 products, read at load, and the route an int8 head takes on it. numpy-free.

The int8 head's frozen weights are blocks of 32 int8 values with a scale each (edgesplit/export/quantize.py).
ONNX Runtime can multiply them two ways: quantise each block of activations to int8 on the fly and use integer
dot products (fast where the CPU has them: VNNI on x86, the dot-product or i8mm instructions on arm64), or
compute in float32 from weights dequantised once at load (the fp32 head's speed, the int8 head's file size).
On a CPU with only AVX2 the integer route is slower than fp32: SmolLM2 cut 4, batch 4 x 128, on a 2-core AMD
EPYC with AVX2 and FMA measured 528 ms a step in int8 against 378 ms in fp32 (docs/benchmarks.md).

Features come from /proc/cpuinfo: the "flags" line on x86, the "Features" line on arm64 (Linux names). On any
other system nothing is known and the route is the safe one: dequantised float32.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


class Route(str, Enum):
    """How an int8 head's frozen-weight products run on this CPU."""

    INT8_DOT = "int8-dot"  # int8 blocks, activations quantised per block, integer dot products
    FP32_DEQUANTISED = "fp32-dequantised"  # int8 weights dequantised to float32 once, at load
    # A dynamic-length head's (client/fed.py): int8 weights held once for both graphs, each dequantised to
    # float32 just before its product; every CPU, as no integer kernel takes a weight fed as an input
    INT8_HELD = "int8-held"


@dataclass(frozen=True)
class CpuFeatures:
    """The instruction-set features that decide the route, as read from /proc/cpuinfo."""

    arch: str  # "x86_64", "aarch64" or what the platform says
    model: str  # the model name, or "" when /proc/cpuinfo has none
    avx2: bool = False
    fma: bool = False
    avx512: bool = False  # AVX-512 foundation
    vnni: bool = False  # AVX-512 VNNI or AVX-VNNI (x86 int8 dot products)
    amx_int8: bool = False
    neon_dot: bool = False  # arm64 "asimddp": SDOT/UDOT
    i8mm: bool = False  # arm64 int8 matrix multiply (SMMLA)

    @property
    def int8_dot_products(self) -> bool:
        """Whether the CPU has integer dot products that make int8 blocks faster than float32."""
        return self.vnni or self.amx_int8 or self.neon_dot or self.i8mm

    def names(self) -> list[str]:
        """The features present, by their short names (for summaries and benchmark JSON)."""
        fields = ("avx2", "fma", "avx512", "vnni", "amx_int8", "neon_dot", "i8mm")
        return [name for name in fields if getattr(self, name)]


def parse_cpuinfo(text: str, arch: str) -> CpuFeatures:
    """The features in a /proc/cpuinfo text. `arch` is platform.machine() of the host it came from."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:  # every core repeats it; the first is enough
            flags = set(value.split())
        elif key in ("model name", "hardware") and not model:
            model = value.strip()
    x86 = arch.lower() in ("x86_64", "amd64", "i686", "i386")
    if x86:
        return CpuFeatures(
            arch=arch,
            model=model,
            avx2="avx2" in flags,
            fma="fma" in flags,
            avx512="avx512f" in flags,
            vnni="avx512_vnni" in flags or "avx_vnni" in flags,
            amx_int8="amx_int8" in flags,
        )
    return CpuFeatures(arch=arch, model=model, neon_dot="asimddp" in flags, i8mm="i8mm" in flags)


def detect(cpuinfo: Path = CPUINFO) -> CpuFeatures:
    """This host's features; none known (so the safe route) where /proc/cpuinfo cannot be read."""
    arch = platform.machine() or "unknown"
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return CpuFeatures(arch=arch, model=platform.processor())
    return parse_cpuinfo(text, arch)


def choose_route(features: CpuFeatures) -> Route:
    """int8 dot products where the CPU has them, else float32 from weights dequantised at load."""
    return Route.INT8_DOT if features.int8_dot_products else Route.FP32_DEQUANTISED
