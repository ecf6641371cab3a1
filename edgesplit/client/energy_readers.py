"""The sensor readers: energy measured by the device's own counters and power monitors.

    reader            device                      how                                               method
    RaplReader        x86 Linux (Intel, AMD)      powercap energy counters of the CPU packages       measured
    Ina3221Reader     Jetson (JetPack 5/6)        INA3221 rail monitors, sampled and integrated      measured
    PiPmicReader      Raspberry Pi 5              `vcgencmd pmic_read_adc`, sampled and integrated   measured
    NvmlReader        NVIDIA GPU (cloud server)   NVML's GPU energy counter                          measured

A sensor that fails *while* sampling does not stop the sampler: the sample is dropped, counted in
`failed_samples`, and the trapezoid bridges the gap. Which of these a device gets is chosen in `energy`
(`detect_energy_reader`), which falls back to an estimate where none is readable.
"""

from __future__ import annotations

import importlib
import logging
import re
import subprocess
import threading
import time
from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgesplit.client.energy_base import MEASURED, Clock, CommandRunner, EnergyReader, SensorUnavailable
from edgesplit.client.resources import Ticker

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- sysfs helpers


def _read_sysfs(path: Path) -> str:
    """The stripped text of a sysfs file, or SensorUnavailable saying why it cannot be read."""
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except PermissionError:
        raise SensorUnavailable(f"permission denied reading {path}") from None
    except FileNotFoundError:
        raise SensorUnavailable(f"{path} does not exist") from None
    except OSError as exc:  # EIO, ENODATA from a disabled channel, a directory where a file should be, ...
        raise SensorUnavailable(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_sysfs_int(path: Path) -> int:
    text = _read_sysfs(path)
    try:
        return int(text)
    except ValueError:
        raise SensorUnavailable(f"{path} holds {text[:40]!r}, not an integer") from None


# ----------------------------------------------------------------------------------------------------- RAPL


_RAPL_TOP_ZONE = re.compile(r"^intel-rapl:(\d+)$")


class RaplReader(EnergyReader):
    """CPU package energy from Linux powercap (`/sys/class/powercap/intel-rapl:N/energy_uj`), Intel and AMD.

    Only the top-level zones `intel-rapl:N` are summed: their sub-zones (`intel-rapl:N:M`: core, uncore, dram)
    are parts of the package and would count twice. Among the top-level zones the `package-*` ones are summed;
    a laptop's `psys` zone (the whole platform, packages included) is used only where there is no package
    zone. `intel-rapl-mmio:N` zones mirror the package through MMIO and are ignored.

    The counters wrap at `max_energy_range_uj`. A delta across one wrap is recovered; to never miss a second
    wrap in between, a background thread polls every `poll_interval_s` (a sysfs read every few seconds costs
    nothing; some AMD parts wrap within a minute at full load). `poll_interval_s=None` polls only on
    `read_joules`.
    """

    kind = "rapl"

    def __init__(self, root: str | Path = "/", *, poll_interval_s: float | None = 5.0) -> None:
        super().__init__()
        self._base = Path(root) / "sys" / "class" / "powercap"
        self._poll_interval_s = poll_interval_s
        if not self._base.is_dir():
            raise SensorUnavailable(f"{self._base} does not exist (not x86 Linux, or no RAPL driver)")
        zones = sorted(
            (path for path in self._base.iterdir() if _RAPL_TOP_ZONE.match(path.name)),
            key=lambda path: int(path.name.rsplit(":", 1)[1]),
        )
        if not zones:
            raise SensorUnavailable(f"no intel-rapl:N zone under {self._base}")
        names = {zone: _read_sysfs(zone / "name") for zone in zones}
        packages = [zone for zone in zones if names[zone].startswith("package")]
        self._zones = packages or zones
        self.zone_names = tuple(names[zone] for zone in self._zones)  # e.g. ("package-0", "package-1")
        try:
            self._max_range_uj = [_read_sysfs_int(zone / "max_energy_range_uj") for zone in self._zones]
            self._last_uj = [_read_sysfs_int(zone / "energy_uj") for zone in self._zones]
        except SensorUnavailable as exc:
            if "permission denied" in str(exc):
                # Since the fix for CVE-2020-8694 ("Platypus", Linux 5.10 and the stable kernels of
                # November 2020) energy_uj is readable by root only.
                raise SensorUnavailable(
                    f"{exc}: energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694); "
                    f"run as root or 'sudo chmod o+r {self._base}/intel-rapl:*/energy_uj'"
                ) from None
            raise
        for zone, max_range in zip(self._zones, self._max_range_uj, strict=True):
            if max_range <= 0:
                raise SensorUnavailable(f"{zone}/max_energy_range_uj is {max_range}, not a positive range")
        self._lock = threading.Lock()
        self._total_uj = 0
        self._running = False
        self._ticker = None if poll_interval_s is None else Ticker(self._poll, poll_interval_s, "edgesplit-rapl-poll")

    @property
    def method(self) -> str:
        return MEASURED

    @property
    def source(self) -> str:
        return "rapl:" + "+".join(str(zone) for zone in self._zones)

    def start(self) -> None:
        self.stop()
        with self._lock:
            self._last_uj = [_read_sysfs_int(zone / "energy_uj") for zone in self._zones]
            self._total_uj = 0
            self._running = True
        if self._ticker is not None:
            self._ticker.start()

    def read_joules(self) -> float:
        if self._running:
            self._update()
        with self._lock:
            return self._total_uj / 1e6

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._running:
            self._update()
            self._running = False

    def _poll(self) -> None:
        try:
            self._update()
        except SensorUnavailable as exc:  # keep polling: a transient read error must not end the run
            log.warning("RAPL poll failed: %s", exc)

    def _update(self) -> None:
        with self._lock:
            now_uj = [_read_sysfs_int(zone / "energy_uj") for zone in self._zones]
            for last, now, max_range in zip(self._last_uj, now_uj, self._max_range_uj, strict=True):
                self._total_uj += rapl_delta_uj(last, now, max_range)
            self._last_uj = now_uj


def rapl_delta_uj(last_uj: int, now_uj: int, max_range_uj: int) -> int:
    """Microjoules between two readings of a counter that wraps to 0 past `max_range_uj` (once at most)."""
    if now_uj >= last_uj:
        return now_uj - last_uj
    return max_range_uj - last_uj + now_uj


# ------------------------------------------------------------------------------------ sampled power sensors


class _SampledPowerReader(EnergyReader):
    """A sensor that gives power, not energy: sampled every `interval_s`, integrated by the trapezoid rule.

    `sample()` takes one sample now; the background thread calls it, and so do `start`, `read_joules` and
    `stop`, so the interval's ends are sampled exactly. Tests pass `background=False` and a fake `clock`.
    """

    def __init__(self, *, interval_s: float, clock: Clock, background: bool) -> None:
        super().__init__()
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._joules = 0.0
        self._last: tuple[float, float] | None = None  # (time s, power W) of the latest good sample
        self._running = False
        self._ticker = Ticker(self.sample, interval_s, f"edgesplit-{self.kind}-sampler") if background else None
        self.samples_taken = 0
        self.failed_samples = 0
        self.last_error: str | None = None

    @property
    def method(self) -> str:
        return MEASURED

    @abstractmethod
    def read_power_w(self) -> float:
        """Instantaneous power in watts; SensorUnavailable (or OSError, ValueError) when the read fails."""

    @property
    def last_power_w(self) -> float | None:
        with self._lock:
            return None if self._last is None else self._last[1]

    def sample(self) -> None:
        with self._lock:  # one sample at a time, so samples integrate in time order
            before = self._clock()
            try:
                watts = self.read_power_w()
            except (SensorUnavailable, OSError, ValueError, subprocess.SubprocessError) as exc:
                self.failed_samples += 1
                self.last_error = str(exc)
                return
            now = (before + self._clock()) / 2  # a slow read (vcgencmd forks) is stamped at its middle
            if self._last is not None:
                last_time, last_watts = self._last
                self._joules += (last_watts + watts) / 2 * max(0.0, now - last_time)
            self._last = (now, watts)
            self.samples_taken += 1

    def start(self) -> None:
        self.stop()
        with self._lock:
            self._joules = 0.0
            self._last = None
            self.samples_taken = 0
            self.failed_samples = 0
            self.last_error = None
            self._running = True
        self.sample()
        if self._ticker is not None:
            self._ticker.start()

    def read_joules(self) -> float:
        if self._running:
            self.sample()
        with self._lock:
            return self._joules

    def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._running:
            self.sample()
            self._running = False


# -------------------------------------------------------------------------------------------------- INA3221


# Labels of a rail that is the total input of the module: where one is present, it alone is read.
_TOTAL_INPUT_LABELS = frozenset({"VDD_IN", "POM_5V_IN", "VIN"})
# Labels of channels wired to nothing.
_UNCONNECTED_LABELS = frozenset({"NC", ""})


class Ina3221Reader(_SampledPowerReader):
    """Jetson power from the INA3221 monitors under hwmon sysfs (JetPack 5 and 6, upstream `ina3221` driver).

        /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/
            in1_label     VDD_IN          the rail's name (from the device tree)
            in1_input     5072            bus voltage, mV
            curr1_input   1232            current, mA
            in1_enable    1               0 for a channel switched off
            in4..in7, curr4               shunt voltages and their sums: no label, not read

    Power is `in<i>_input * curr<i>_input / 1e6` W. Where a rail labelled VDD_IN (the module's total input, as
    on Orin Nano and NX) exists, only it is read; otherwise (AGX Orin) every labelled, enabled rail is summed.
    The default 0.1 s interval is a sysfs read per rail: cheap next to a training step.
    """

    kind = "ina3221"

    def __init__(
        self,
        root: str | Path = "/",
        *,
        interval_s: float = 0.1,
        clock: Clock = time.monotonic,
        background: bool = True,
    ) -> None:
        super().__init__(interval_s=interval_s, clock=clock, background=background)
        driver = Path(root) / "sys" / "bus" / "i2c" / "drivers" / "ina3221"
        hwmons = sorted(driver.glob("*/hwmon/hwmon*"))
        if not hwmons:
            raise SensorUnavailable(f"no INA3221 hwmon device under {driver} (not a Jetson on JetPack 5/6)")
        rails: list[tuple[str, Path, Path]] = []  # (label, in<i>_input, curr<i>_input)
        for hwmon in hwmons:
            for label_path in sorted(hwmon.glob("in*_label")):
                channel = label_path.name[len("in") : -len("_label")]
                current_path = hwmon / f"curr{channel}_input"
                if not channel.isdigit() or not current_path.exists():
                    continue  # a label without a current (the sum channel) is no rail
                label = _read_sysfs(label_path)
                enable_path = hwmon / f"in{channel}_enable"
                if label.upper() in _UNCONNECTED_LABELS or (enable_path.exists() and _read_sysfs(enable_path) == "0"):
                    continue
                rails.append((label, hwmon / f"in{channel}_input", current_path))
        if not rails:
            raise SensorUnavailable(f"INA3221 devices under {driver} have no labelled, enabled rail")
        total = [rail for rail in rails if rail[0].upper() in _TOTAL_INPUT_LABELS]
        self._rails = total[:1] or rails
        self.read_power_w()  # probe now: an unreadable or garbage rail makes the reader unavailable

    @property
    def source(self) -> str:
        return "ina3221:" + "+".join(label for label, _, _ in self._rails)

    @property
    def rails(self) -> tuple[str, ...]:
        return tuple(label for label, _, _ in self._rails)

    def read_power_w(self) -> float:
        watts = 0.0
        for _, volts_path, amps_path in self._rails:
            millivolts = _read_sysfs_int(volts_path)
            milliamps = _read_sysfs_int(amps_path)
            if millivolts < 0 or milliamps < -1000:  # a little negative current is shunt noise at idle
                raise SensorUnavailable(f"{volts_path}: {millivolts} mV, {milliamps} mA is not a reading")
            watts += millivolts * milliamps / 1e6
        return watts


# ------------------------------------------------------------------------------------------------ Pi 5 PMIC


_PMIC_LINE = re.compile(
    r"^\s*(?P<rail>\S+)_(?P<unit>[AV])\s+(?:current|volt)\(\d+\)=(?P<value>[0-9.eE+-]+)(?P=unit)\s*$"
)


def pmic_rail_power_w(output: str) -> dict[str, float]:
    """Watts per rail from `vcgencmd pmic_read_adc` output, for the rails with both a current and a volt line.

        "  VDD_CORE_A current(7)=2.10000000A" and "  VDD_CORE_V volt(15)=0.88000000V"  ->  {"VDD_CORE": 1.848}

    Lines that do not parse are ignored; rails with only a voltage (EXT5V, BATT) carry no power figure.
    """
    amps: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in output.splitlines():
        match = _PMIC_LINE.match(line)
        if match is None:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        (amps if match["unit"] == "A" else volts)[match["rail"]] = value
    return {rail: volts[rail] * amps[rail] for rail in amps if rail in volts}


def run_command(argv: Sequence[str], timeout_s: float = 5.0) -> str:
    """Run a short command and return its stdout; SensorUnavailable when it is missing or fails."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise SensorUnavailable(f"{argv[0]} not found") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise SensorUnavailable(f"{' '.join(argv)} failed: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise SensorUnavailable(f"{' '.join(argv)} exited {done.returncode}" + (f": {said[0][:120]}" if said else ""))
    return done.stdout


class PiPmicReader(_SampledPowerReader):
    """Raspberry Pi 5 power from its PMIC's ADCs: the sum over rails of volts x amps, sampled and integrated.

    Each sample runs `vcgencmd pmic_read_adc` (a fork and a firmware mailbox call, some milliseconds of CPU),
    so the default interval is 0.5 s: the measurement should not cost what it measures. `runner` runs a
    command and returns its stdout; tests pass one that returns recorded output.
    """

    kind = "pi-pmic"
    COMMAND = ("vcgencmd", "pmic_read_adc")

    def __init__(
        self,
        *,
        runner: CommandRunner | None = None,
        interval_s: float = 0.5,
        clock: Clock = time.monotonic,
        background: bool = True,
    ) -> None:
        super().__init__(interval_s=interval_s, clock=clock, background=background)
        self._runner: CommandRunner = runner or run_command
        try:
            output = self._runner(self.COMMAND)
        except SensorUnavailable as exc:
            raise SensorUnavailable(f"{exc} (not a Raspberry Pi 5, or raspi-utils is missing)") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise SensorUnavailable(f"{' '.join(self.COMMAND)} failed: {exc}") from None
        rails = pmic_rail_power_w(output)
        if not rails:
            first_line = output.strip().splitlines()[0][:120] if output.strip() else "nothing"
            raise SensorUnavailable(
                f"{' '.join(self.COMMAND)} printed no rail readings (said: {first_line}); "
                "only the Raspberry Pi 5's PMIC has these ADCs"
            )
        self.rails = tuple(sorted(rails))

    @property
    def source(self) -> str:
        return " ".join(self.COMMAND)

    def read_power_w(self) -> float:
        rails = pmic_rail_power_w(self._runner(self.COMMAND))
        if not rails:
            raise SensorUnavailable(f"{' '.join(self.COMMAND)} printed no rail readings")
        return sum(rails.values())


# ----------------------------------------------------------------------------------------------------- NVML


class NvmlReader(EnergyReader):
    """NVIDIA GPU energy from NVML's counter (`nvmlDeviceGetTotalEnergyConsumption`, mJ since driver load).

    For the cloud server, whose tail runs on a GPU; Volta and newer. `device_indices=None` sums every GPU.
    `nvml` is the `pynvml` module (from the `nvidia-ml-py` package); tests pass a stand-in.
    """

    kind = "nvml"

    def __init__(self, device_indices: Sequence[int] | None = None, *, nvml: Any = None) -> None:
        super().__init__()
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError:
                raise SensorUnavailable("pynvml is not installed (pip install nvidia-ml-py)") from None
        self._nvml: Any = nvml
        try:
            nvml.nvmlInit()
            if device_indices is None:
                indices = list(range(nvml.nvmlDeviceGetCount()))
            else:
                indices = list(device_indices)
            if not indices:
                raise SensorUnavailable("NVML sees no GPU")
            self._indices = indices
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in indices]
            self._last_mj = self._read_mj()
        except SensorUnavailable:
            raise
        except Exception as exc:  # pynvml.NVMLError and its many subclasses (NotSupported, NoPermission, ...)
            raise SensorUnavailable(f"NVML energy counter unavailable: {exc}") from None
        self._total_mj = 0
        self._running = False

    @property
    def method(self) -> str:
        return MEASURED

    @property
    def source(self) -> str:
        return "nvml:" + "+".join(f"gpu{index}" for index in self._indices)

    def _read_mj(self) -> list[int]:
        return [int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)) for handle in self._handles]

    def start(self) -> None:
        self._last_mj = self._read_mj()
        self._total_mj = 0
        self._running = True

    def read_joules(self) -> float:
        if self._running:
            now_mj = self._read_mj()
            # 64-bit counters since the driver loaded: no wrap in practice; a reset (driver reload) counts 0.
            self._total_mj += sum(max(0, now - last) for last, now in zip(self._last_mj, now_mj, strict=True))
            self._last_mj = now_mj
        return self._total_mj / 1e3

    def stop(self) -> None:
        if self._running:
            self.read_joules()
            self._running = False
