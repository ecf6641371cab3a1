"""Energy readers against sensor files and command output in the real formats (tests/fixtures/energy/)."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgesplit.client.energy import (
    ESTIMATED,
    MEASURED,
    EnergyReader,
    EstimatedEnergy,
    Ina3221Reader,
    NvmlReader,
    PiPmicReader,
    RaplReader,
    SensorUnavailable,
    detect_energy_reader,
    guess_profile_name,
    pmic_rail_power_w,
    rapl_delta_uj,
)
from edgesplit.devices.profiles import ENERGY_READERS, load_profile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "energy"
PMIC_OUTPUT = (FIXTURES / "pi5-pmic_read_adc.txt").read_text()
RAPL_MAX = 262143328850

# (volts, amps) of the 12 rails in pi5-pmic_read_adc.txt that have both lines.
PMIC_RAILS = {
    "3V7_WL_SW": (3.70866400, 0.07813200),
    "3V3_SYS": (3.31494400, 0.07520040),
    "1V8_SYS": (1.80220000, 0.17592950),
    "DDR_VDD2": (1.11006200, 0.09761850),
    "DDR_VDDQ": (0.60427440, 0.00976200),
    "1V1_SYS": (1.10585600, 0.19235600),
    "0V8_SW": (0.80219760, 0.34793160),
    "VDD_CORE": (0.88000000, 2.10000000),
    "3V3_DAC": (3.30476000, 0.00006105),
    "3V3_ADC": (3.30402600, 0.00054945),
    "0V8_AON": (0.80100360, 0.00512820),
    "HDMI": (5.13300000, 0.01733820),
}
PMIC_TOTAL_W = sum(volts * amps for volts, amps in PMIC_RAILS.values())


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def no_vcgencmd(argv: Sequence[str]) -> str:
    raise SensorUnavailable(f"{argv[0]} not found")


@pytest.fixture(autouse=True)
def no_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep detection hermetic where pynvml and a GPU exist: None in sys.modules fails the import."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


def copy_fixture(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    return root


def write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")


# ----------------------------------------------------------------------------------------------------- RAPL


def test_rapl_sums_the_package_and_not_its_sub_zones_nor_psys_nor_mmio(tmp_path: Path) -> None:
    root = copy_fixture("rapl-laptop", tmp_path)
    powercap = root / "sys/class/powercap"
    reader = RaplReader(root, poll_interval_s=None)
    assert reader.source == f"rapl:{powercap / 'intel-rapl:0'}"
    assert reader.zone_names == ("package-0",)
    assert reader.method == MEASURED

    reader.start()
    # 12 J in the package; the core and uncore sub-zones and psys move too but are parts of (or contain) it.
    write(powercap / "intel-rapl:0/energy_uj", 71942538861 + 12_000_000)
    write(powercap / "intel-rapl:0:0/energy_uj", 30571234567 + 9_000_000)
    write(powercap / "intel-rapl:0:1/energy_uj", 1234567890 + 1_000_000)
    write(powercap / "intel-rapl:1/energy_uj", 142318974211 + 20_000_000)
    write(powercap / "intel-rapl-mmio:0/energy_uj", 71942101233 + 12_000_000)
    assert reader.read_joules() == pytest.approx(12.0)
    reader.stop()
    write(powercap / "intel-rapl:0/energy_uj", 71942538861 + 50_000_000)
    assert reader.read_joules() == pytest.approx(12.0), "after stop() the total stays what it was at stop"


def test_rapl_sums_both_sockets_of_a_server(tmp_path: Path) -> None:
    root = copy_fixture("rapl-server", tmp_path)
    powercap = root / "sys/class/powercap"
    with RaplReader(root, poll_interval_s=None) as reader:
        assert reader.source.count("intel-rapl:") == 2 and ":0:0" not in reader.source
        write(powercap / "intel-rapl:0/energy_uj", 183745621903 + 100_000_000)
        write(powercap / "intel-rapl:1/energy_uj", 179234861277 + 80_000_000)
        write(powercap / "intel-rapl:0:0/energy_uj", 45892357120 + 30_000_000)
        assert reader.read_joules() == pytest.approx(180.0)


def test_rapl_recovers_a_counter_wrap(tmp_path: Path) -> None:
    root = copy_fixture("rapl-laptop", tmp_path)
    energy = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    write(energy, RAPL_MAX - 1_000_000)  # 1 J before the wrap
    reader = RaplReader(root, poll_interval_s=None)
    reader.start()
    write(energy, 2_000_000)  # wrapped, then 2 J more
    assert reader.read_joules() == pytest.approx(3.0)
    write(energy, 5_000_000)
    assert reader.read_joules() == pytest.approx(6.0)
    assert rapl_delta_uj(10, 30, 100) == 20
    assert rapl_delta_uj(90, 5, 100) == 15


def test_rapl_background_poll_catches_wraps_between_reads(tmp_path: Path) -> None:
    root = copy_fixture("rapl-laptop", tmp_path)
    energy = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    write(energy, 100_000_000)
    reader = RaplReader(root, poll_interval_s=0.01)
    reader.start()
    # Two full laps of the counter with no read_joules in between: only the poll thread sees the first one.
    write(energy, RAPL_MAX - 100_000_000)
    time.sleep(0.2)
    write(energy, 100_000_000)
    time.sleep(0.2)
    reader.stop()
    assert reader.read_joules() == pytest.approx(RAPL_MAX / 1e6, rel=1e-9)


def test_rapl_unreadable_counter_is_unavailable_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_fixture("rapl-laptop", tmp_path)
    energy = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    real_read_text = Path.read_text

    def denied(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == energy:  # root may read anything, so permission denied is simulated
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(SensorUnavailable, match="permission denied.*root only since Linux 5.10"):
        RaplReader(root)


def test_rapl_garbage_counter_is_unavailable(tmp_path: Path) -> None:
    root = copy_fixture("rapl-laptop", tmp_path)
    write(root / "sys/class/powercap/intel-rapl:0/energy_uj", "not a number")
    with pytest.raises(SensorUnavailable, match="not an integer"):
        RaplReader(root)


# -------------------------------------------------------------------------------------------------- INA3221


def test_ina3221_prefers_vdd_in_and_integrates_by_trapezoid(tmp_path: Path) -> None:
    root = copy_fixture("jetson-orin-nano-jp6", tmp_path)
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    clock = FakeClock()
    reader = Ina3221Reader(root, clock=clock, background=False)
    assert reader.source == "ina3221:VDD_IN"
    assert reader.read_power_w() == pytest.approx(5.048 * 1.336)

    reader.start()  # t=0: 6.744128 W
    clock.now = 1.0
    write(hwmon / "curr1_input", 2000)
    reader.sample()  # t=1: 10.096 W
    clock.now = 3.0
    joules = reader.read_joules()  # t=3: still 10.096 W
    assert joules == pytest.approx((6.744128 + 10.096) / 2 * 1.0 + 10.096 * 2.0)
    assert reader.samples_taken == 3

    # A failed read is dropped and the trapezoid bridges the gap from the last good sample.
    write(hwmon / "curr1_input", "garbage")
    clock.now = 4.0
    reader.sample()
    assert reader.failed_samples == 1 and "not an integer" in (reader.last_error or "")
    write(hwmon / "curr1_input", 2000)
    clock.now = 5.0
    reader.stop()
    assert reader.read_joules() == pytest.approx(joules + 10.096 * 2.0)


def test_ina3221_sums_the_rails_without_vdd_in_and_skips_unconnected_channels(tmp_path: Path) -> None:
    root = copy_fixture("jetson-agx-orin-jp6", tmp_path)
    clock = FakeClock()
    reader = Ina3221Reader(root, clock=clock, background=False)
    assert reader.rails == ("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO")
    assert reader.source == "ina3221:VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO"
    watts = (4984 * 1230 + 4984 * 752 + 4976 * 920 + 4968 * 220) / 1e6
    reader.start()
    clock.now = 10.0
    assert reader.read_joules() == pytest.approx(watts * 10.0)


def test_ina3221_background_sampler_runs(tmp_path: Path) -> None:
    root = copy_fixture("jetson-orin-nano-jp6", tmp_path)
    reader = Ina3221Reader(root, interval_s=0.01)
    started = time.monotonic()
    reader.start()
    time.sleep(0.2)
    reader.stop()
    elapsed = time.monotonic() - started
    assert reader.samples_taken >= 5
    assert 0 < reader.read_joules() <= 5.048 * 1.336 * elapsed * 1.01


def test_ina3221_garbage_rail_is_unavailable(tmp_path: Path) -> None:
    root = copy_fixture("jetson-orin-nano-jp6", tmp_path)
    write(root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in1_input", "\x00\x01")
    with pytest.raises(SensorUnavailable, match="in1_input.*not an integer"):
        Ina3221Reader(root)


# ------------------------------------------------------------------------------------------------ Pi 5 PMIC


def test_pmic_output_parses_to_watts_per_rail() -> None:
    rails = pmic_rail_power_w(PMIC_OUTPUT)
    assert set(rails) == set(PMIC_RAILS), "EXT5V and BATT have a voltage only"
    assert rails["VDD_CORE"] == pytest.approx(2.1 * 0.88)
    assert sum(rails.values()) == pytest.approx(PMIC_TOTAL_W)
    assert pmic_rail_power_w("   VDD_CORE_A current(7)=2.10000000A\n   VDD_CORE_V volt(15)=0.88000000V\n") == {
        "VDD_CORE": pytest.approx(1.848)
    }
    assert pmic_rail_power_w('error=1 error_msg="Command not registered"\n') == {}


def test_pmic_reader_integrates_sampled_power() -> None:
    outputs = [PMIC_OUTPUT]
    calls: list[tuple[str, ...]] = []

    def runner(argv: Sequence[str]) -> str:
        calls.append(tuple(argv))
        return outputs[-1]

    clock = FakeClock()
    reader = PiPmicReader(runner=runner, clock=clock, background=False)
    assert reader.source == "vcgencmd pmic_read_adc" and reader.method == MEASURED
    assert calls[0] == ("vcgencmd", "pmic_read_adc")
    reader.start()
    clock.now = 2.0
    outputs.append(PMIC_OUTPUT.replace("VDD_CORE_A current(7)=2.10000000A", "VDD_CORE_A current(7)=4.10000000A"))
    reader.sample()
    clock.now = 4.0
    extra_w = 2.0 * 0.88
    expected = (PMIC_TOTAL_W + PMIC_TOTAL_W + extra_w) / 2 * 2.0 + (PMIC_TOTAL_W + extra_w) * 2.0
    assert reader.read_joules() == pytest.approx(expected)


def test_pmic_reader_on_a_pi_4_is_unavailable() -> None:
    with pytest.raises(SensorUnavailable, match="Command not registered"):
        PiPmicReader(runner=lambda argv: 'error=1 error_msg="Command not registered"\n')


# ----------------------------------------------------------------------------------------------------- NVML


class FakeNvmlError(Exception):
    pass


def fake_nvml(counters_mj: dict[int, int], supported: bool = True) -> SimpleNamespace:
    def energy(handle: int) -> int:
        if not supported:
            raise FakeNvmlError("Not Supported")
        return counters_mj[handle]

    return SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(counters_mj),
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetTotalEnergyConsumption=energy,
        NVMLError=FakeNvmlError,
    )


def test_nvml_sums_the_gpus_counters() -> None:
    counters = {0: 5_000_000, 1: 7_000_000}
    reader = NvmlReader(nvml=fake_nvml(counters))
    assert reader.source == "nvml:gpu0+gpu1"
    reader.start()
    counters[0] += 1500
    counters[1] += 2500
    assert reader.read_joules() == pytest.approx(4.0)


def test_nvml_missing_or_unsupported_is_unavailable() -> None:
    with pytest.raises(SensorUnavailable, match="pynvml is not installed"):
        NvmlReader()  # the autouse fixture hides any installed pynvml
    with pytest.raises(SensorUnavailable, match="Not Supported"):
        NvmlReader(nvml=fake_nvml({0: 1}, supported=False))


# ----------------------------------------------------------------------------------------- estimate, detect


def test_estimate_follows_the_documented_model_and_says_estimated() -> None:
    profile = load_profile("raspberry-pi-5")  # idle 3 W, active 8 W, 4 cores
    clock = FakeClock()
    cpu = [100.0]
    estimate = EstimatedEnergy(profile, clock=clock, cpu_seconds=lambda: cpu[0])
    assert estimate.method == ESTIMATED == "estimated"
    assert estimate.source == "estimate:raspberry-pi-5 profile"
    estimate.start()
    clock.now, cpu[0] = 10.0, 105.0  # 10 s of wall time, 5 s of CPU
    assert estimate.read_joules() == pytest.approx(3.0 * 10 + 5 * (8.0 - 3.0) / 4)
    marginal = EstimatedEnergy(profile, idle_share=0.0, clock=clock, cpu_seconds=lambda: cpu[0])
    assert marginal.joules_for(wall_s=10, cpu_s=5) == pytest.approx(6.25)
    estimate.stop()
    clock.now = 20.0
    assert estimate.read_joules() == pytest.approx(36.25), "frozen at stop()"


def test_estimate_of_real_cpu_work_is_positive() -> None:
    with EstimatedEnergy(load_profile("x86-laptop")) as estimate:
        sum(i * i for i in range(200_000))
    assert estimate.read_joules() > 0


def test_detect_without_sensors_falls_back_to_the_estimate_and_says_why(tmp_path: Path) -> None:
    reader = detect_energy_reader("raspberry-pi-5", root=tmp_path, runner=no_vcgencmd)
    assert isinstance(reader, EstimatedEnergy)
    assert reader.method == "estimated"
    assert reader.source == "estimate:raspberry-pi-5 profile"
    kinds = [reason.split(":", 1)[0] for reason in reader.skipped]
    assert kinds == ["pi-pmic", "rapl", "ina3221", "nvml"], "the profile's own reader is tried first"
    assert "vcgencmd not found" in reader.skipped[0]
    assert "pynvml is not installed" in reader.skipped[3]


def test_detect_skips_an_unreadable_sensor_and_moves_on(tmp_path: Path) -> None:
    root = copy_fixture("rapl-laptop", tmp_path)
    write(root / "sys/class/powercap/intel-rapl:0/max_energy_range_uj", "")
    reader = detect_energy_reader(root=root, runner=no_vcgencmd)
    assert reader.method == "estimated"
    assert reader.source == "estimate:x86-laptop profile (guessed)"
    assert reader.skipped[0].startswith("rapl: ") and "max_energy_range_uj" in reader.skipped[0]


def test_detect_picks_the_sensor_present_and_prefers_the_profiles(tmp_path: Path) -> None:
    root = tmp_path / "both"
    shutil.copytree(FIXTURES / "rapl-laptop", root)
    shutil.copytree(FIXTURES / "jetson-orin-nano-jp6", root, dirs_exist_ok=True)
    assert isinstance(detect_energy_reader(root=root, runner=no_vcgencmd), RaplReader)
    jetson = detect_energy_reader("jetson-orin-nano", root=root, runner=no_vcgencmd)
    assert isinstance(jetson, Ina3221Reader) and jetson.skipped == ()
    pi = detect_energy_reader(root=tmp_path / "nothing", runner=lambda argv: PMIC_OUTPUT)
    assert isinstance(pi, PiPmicReader)
    assert [reason.split(":", 1)[0] for reason in pi.skipped] == ["rapl", "ina3221"]


def test_detect_recognises_the_board_from_its_device_tree(tmp_path: Path) -> None:
    model = tmp_path / "proc/device-tree/model"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"Raspberry Pi 4 Model B Rev 1.4\x00")
    assert guess_profile_name(tmp_path) == "raspberry-pi-4"
    reader = detect_energy_reader(root=tmp_path, runner=no_vcgencmd)
    assert reader.source == "estimate:raspberry-pi-4 profile"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    assert guess_profile_name(tmp_path) == "jetson-orin-nano"
    assert guess_profile_name(tmp_path / "absent") is None


def test_every_reader_kind_is_a_profile_energy_reader() -> None:
    kinds = {cls.kind for cls in (RaplReader, Ina3221Reader, PiPmicReader, NvmlReader, EstimatedEnergy)}
    assert kinds == set(ENERGY_READERS)
    assert all(issubclass(cls, EnergyReader) for cls in (RaplReader, Ina3221Reader, EstimatedEnergy))
