"""The CPU feature parser on recorded /proc/cpuinfo texts, and the int8 route each feature set gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesplit.client.cpu import CpuFeatures, Route, choose_route, detect, parse_cpuinfo

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cpuinfo"


@pytest.mark.parametrize(
    ("name", "arch", "present", "route"),
    [
        ("x86_avx2_only.txt", "x86_64", ["avx2", "fma"], Route.FP32_DEQUANTISED),
        ("x86_avx512_vnni.txt", "x86_64", ["avx2", "fma", "avx512", "vnni"], Route.INT8_DOT),
        ("x86_epyc_avx512_vnni.txt", "x86_64", ["avx2", "fma", "avx512", "vnni"], Route.INT8_DOT),
        ("pi5_cortex_a76.txt", "aarch64", ["neon_dot"], Route.INT8_DOT),
        ("arm64_i8mm_neoverse_v1.txt", "aarch64", ["neon_dot", "i8mm"], Route.INT8_DOT),
        ("arm64_cortex_a72_pi4.txt", "aarch64", [], Route.FP32_DEQUANTISED),
    ],
)
def test_recorded_cpuinfo(name: str, arch: str, present: list[str], route: Route) -> None:
    features = parse_cpuinfo((FIXTURES / name).read_text(), arch)
    assert features.names() == present
    assert choose_route(features) is route


def test_x86_flags_mean_nothing_on_arm_and_back() -> None:
    """The same word is read only in its own architecture's vocabulary."""
    assert parse_cpuinfo("Features : asimddp i8mm\n", "x86_64").names() == []
    assert parse_cpuinfo("flags : avx2 avx512_vnni\n", "aarch64").names() == []


def test_avx_vnni_without_avx512_counts() -> None:
    assert choose_route(parse_cpuinfo("flags : avx2 fma avx_vnni\n", "x86_64")) is Route.INT8_DOT


def test_unreadable_cpuinfo_takes_the_safe_route(tmp_path: Path) -> None:
    features = detect(tmp_path / "missing")
    assert features.names() == [] and choose_route(features) is Route.FP32_DEQUANTISED
    assert choose_route(CpuFeatures(arch="riscv64", model="")) is Route.FP32_DEQUANTISED


def test_head_route_per_export_and_cpu() -> None:
    from edgesplit.client.head import head_route

    avx2 = parse_cpuinfo((FIXTURES / "x86_avx2_only.txt").read_text(), "x86_64")
    vnni = parse_cpuinfo((FIXTURES / "x86_avx512_vnni.txt").read_text(), "x86_64")
    assert head_route("none", avx2) == ("fp32", "")
    # Today's int8 export: the route follows the CPU, and neither needs a note.
    assert head_route("int8", vnni, "dequantize-linear") == ("int8-dot", "")
    assert head_route("int8", avx2, "dequantize-linear") == ("fp32-dequantised", "")
    # A dynamic-length head's int8 weights are fed to its graphs: held as int8, float32 products, on every CPU.
    assert head_route("int8", vnni, "fed") == head_route("int8", avx2, "fed") == ("int8-held", "")
    # An older int8 export (MatMulNBits in the graph) can only run int8 dot products: said where they are slow.
    assert head_route("int8", vnni) == ("int8-dot", "")
    route, note = head_route("int8", avx2)
    assert route == "int8-dot" and "export it again" in note


def test_an_avx2_only_host_runs_an_int8_head_on_dequantised_weights(tiny_artifacts) -> None:
    """A recorded AVX2-only cpuinfo: the head takes the float route, and computes the int8 weights' function."""
    import numpy as np

    from edgesplit.client.head import Head

    artifacts = tiny_artifacts("llama", 2, quantize="int8")
    avx2 = parse_cpuinfo((FIXTURES / "x86_avx2_only.txt").read_text(), "x86_64")
    vnni = parse_cpuinfo((FIXTURES / "x86_avx512_vnni.txt").read_text(), "x86_64")
    heads = {"avx2": Head(artifacts, cpu=avx2), "vnni": Head(artifacts, cpu=vnni)}
    assert heads["avx2"].route == "fp32-dequantised" and heads["vnni"].route == "int8-dot"
    rng = np.random.default_rng(0)
    shape = (heads["avx2"].manifest.batch_size, heads["avx2"].manifest.max_seq_len)
    input_ids, mask = rng.integers(0, 100, shape), np.ones(shape, dtype=np.int64)
    adapters = heads["avx2"].initial_adapters()
    outputs = {name: head.forward(input_ids, mask, adapters).activations for name, head in heads.items()}
    # Two kernels: the same int8 weights, the activations rounded to int8 on the VNNI route only.
    difference = np.linalg.norm(outputs["avx2"] - outputs["vnni"]) / np.linalg.norm(outputs["avx2"])
    assert 0 < difference < 0.05
