"""Device profiles: built-ins load and validate, user files round-trip, and bad files say what is wrong."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgesplit.devices.profiles import (
    ENERGY_READERS,
    DeviceProfile,
    LinkProfile,
    ProfileError,
    list_profiles,
    load_profile,
    profile_to_toml,
    save_profile,
)
from edgesplit.errors import DataError, EdgesplitError

BUILT_INS = ["jetson-agx-orin", "jetson-orin-nano", "raspberry-pi-4", "raspberry-pi-5", "x86-laptop"]
REPO = Path(__file__).resolve().parents[2]


def test_list_profiles_names_the_built_ins() -> None:
    assert list_profiles() == BUILT_INS


@pytest.mark.parametrize("name", BUILT_INS)
def test_every_built_in_loads_validates_and_says_where_its_figures_come_from(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.memory_mb >= 1024 and profile.cores >= 2
    assert 0 < profile.idle_w < profile.active_w
    assert 0 < profile.cpu_speed_factor
    assert profile.energy_reader in ENERGY_READERS
    for source in (profile.idle_w_source, profile.active_w_source, profile.cpu_speed_source):
        assert len(source) > 20
    assert set(profile.links) == {"wifi", "lte"}
    for link in profile.links.values():
        assert link.uplink_mbps > 0 and link.downlink_mbps > 0 and link.rtt_ms > 0 and link.source
    assert profile.link("lte").rtt_ms > profile.link("wifi").rtt_ms
    assert profile.scale_seconds(1.0) == pytest.approx(1.0 / profile.cpu_speed_factor)
    assert profile.dynamic_w_per_core == pytest.approx((profile.active_w - profile.idle_w) / profile.cores)


def test_built_ins_use_the_reader_their_hardware_has() -> None:
    readers = {name: load_profile(name).energy_reader for name in BUILT_INS}
    assert readers == {
        "jetson-agx-orin": "ina3221",
        "jetson-orin-nano": "ina3221",
        "raspberry-pi-4": "estimate",
        "raspberry-pi-5": "pi-pmic",
        "x86-laptop": "rapl",
    }


def test_unknown_name_lists_the_built_ins() -> None:
    with pytest.raises(ProfileError) as caught:
        load_profile("raspberry-pi-3")
    message = str(caught.value)
    assert "raspberry-pi-3" in message
    for name in BUILT_INS:
        assert name in message
    assert isinstance(caught.value, DataError) and isinstance(caught.value, EdgesplitError)


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="no device profile at .*mine.toml"):
        load_profile(tmp_path / "mine.toml")


def test_save_load_round_trip(tmp_path: Path) -> None:
    original = load_profile("raspberry-pi-5")
    custom = dataclasses.replace(
        original,
        name="my-pi",
        memory_mb=16384,
        description='a "16 GB" board\\with odd characters\tand a tab',
        links={**original.links, "5g": LinkProfile(50.0, 300.0, 25.0, "measured with iperf3 at home")},
    )
    path = tmp_path / "my-pi.toml"
    save_profile(custom, path)
    assert load_profile(path) == custom
    assert load_profile(str(path)) == custom
    for name in BUILT_INS:
        profile = load_profile(name)
        save_profile(profile, tmp_path / f"{name}.toml")
        assert load_profile(tmp_path / f"{name}.toml") == profile


def test_integers_are_accepted_for_float_fields(tmp_path: Path) -> None:
    text = profile_to_toml(load_profile("raspberry-pi-5")).replace("idle_w = 3.0", "idle_w = 3")
    path = tmp_path / "ints.toml"
    path.write_text(text)
    assert load_profile(path).idle_w == 3.0


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text.replace("cores = 4", "cores = [4"), "not valid TOML"),
        (lambda text: text.replace("cores = 4\n", ""), "missing field.*cores"),
        (lambda text: text.replace("cores = 4", 'cores = "four"'), "cores must be an integer"),
        (lambda text: text.replace("cores = 4", "cores = 0"), "cores must be a positive integer"),
        (lambda text: text.replace("idle_w = 3.0", "idle_w = 30.0"), "active_w .* is below idle_w"),
        (lambda text: text.replace("idle_w = 3.0", "idle_w = nan"), "idle_w must be a number"),
        (lambda text: text.replace("cores = 4", "cores = 4\ncore = 4"), "unknown field.*core"),
        (
            lambda text: text.replace('"pi-pmic"', '"multimeter"'),
            "energy_reader must be one of rapl, ina3221",
        ),
        (lambda text: text.replace('idle_w_source = "', 'idle_w_source = " "\nx = "'), "unknown field"),
        (lambda text: text.replace("rtt_ms = 60.0", "rtt_ms = -1.0"), r"\[links.lte\].*rtt_ms"),
        (lambda text: text.replace("uplink_mbps = 10.0\n", ""), r"\[links.lte\]: missing field.*uplink_mbps"),
        (lambda text: text.split("\n[links.wifi]")[0], "at least one link"),
        (lambda text: text.replace('name = "raspberry-pi-5"', 'name = "Raspberry Pi 5"'), "lower-case slug"),
    ],
)
def test_a_bad_file_gives_a_clear_error_naming_the_file(
    edit: Callable[[str], str], expected: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(edit(profile_to_toml(load_profile("raspberry-pi-5"))))
    with pytest.raises(ProfileError, match=expected) as caught:
        load_profile(path)
    assert str(path) in str(caught.value)


def test_construction_validates() -> None:
    good = load_profile("x86-laptop")
    with pytest.raises(ProfileError, match="cpu_speed_factor"):
        dataclasses.replace(good, cpu_speed_factor=0.0)
    with pytest.raises(ProfileError, match="active_w_source"):
        dataclasses.replace(good, active_w_source=" ")
    with pytest.raises(ProfileError, match="no link 'satellite'.*lte, wifi"):
        good.link("satellite")
    assert isinstance(good, DeviceProfile)


def test_the_measurement_layer_does_not_import_torch() -> None:
    code = (
        "import sys; import edgesplit.profiles, edgesplit.devices.profiles, edgesplit.client.energy,"
        " edgesplit.client.resources; "
        "bad = sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
