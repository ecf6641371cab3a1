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
    assert head_route("int8", vnni) == ("int8-dot", "")
    route, note = head_route("int8", avx2)
    assert route == "int8-dot" and "without --quantize" in note
