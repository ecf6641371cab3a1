"""Energy readers: the joules a device spent over an interval, and how they were measured.

    reader            device                      how                                               method
    RaplReader        x86 Linux (Intel, AMD)      powercap energy counters of the CPU packages       measured
    Ina3221Reader     Jetson (JetPack 5/6)        INA3221 rail monitors, sampled and integrated      measured
    PiPmicReader      Raspberry Pi 5              `vcgencmd pmic_read_adc`, sampled and integrated   measured
    NvmlReader        NVIDIA GPU (cloud server)   NVML's GPU energy counter                          measured
    EstimatedEnergy   anything else               CPU time x a device profile's power model          estimated

What "the device" covers differs, and a report must say which (`source` does):
- RAPL counts the CPU package(s) only: cores, caches, memory controller; not the screen, disk or board.
- INA3221 `VDD_IN` is the Jetson module's input (CPU, GPU, memory, SoC), not the carrier board; where there is
  no `VDD_IN` (AGX Orin) the module rails are summed.
- The Pi 5 PMIC rails cover the SoC, memory and board supplies, but not USB peripherals or the losses of the
  5 V input, so they read below a meter at the wall.
- NVML counts the GPU board only.
- The estimate charges the whole device's idle power for the wall time plus this process's CPU time at the
  profile's per-core dynamic power (see `EstimatedEnergy`).

Every reader has the same life: `start()`, then `read_joules()` (joules since start, any number of times),
then `stop()`. Constructing a real reader probes its sensor and raises `SensorUnavailable` (with the reason)
when the sensor is absent or unreadable; `detect_energy_reader` catches that, notes why in `skipped`, and
moves on to the next, ending at the estimate, which never fails. A sensor that fails *while* sampling does not
stop the sampler: the sample is dropped, counted in `failed_samples`, and the trapezoid bridges the gap.

No torch, no network: this runs on the device, next to the ONNX head.

The interface lives in `energy_base`, the sensor readers in `energy_readers`; this module holds the estimate
and the chooser, and is where callers import any of them from.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from edgesplit.client.energy_base import (
    ESTIMATED,
    MEASURED,
    Clock,
    CommandRunner,
    EnergyReader,
    SensorUnavailable,
)
from edgesplit.client.energy_readers import (
    Ina3221Reader,
    NvmlReader,
    PiPmicReader,
    RaplReader,
    pmic_rail_power_w,
    rapl_delta_uj,
    run_command,
)
from edgesplit.devices.profiles import DeviceProfile, load_profile

__all__ = [
    "ESTIMATED",
    "MEASURED",
    "Clock",
    "CommandRunner",
    "EnergyReader",
    "EstimatedEnergy",
    "Ina3221Reader",
    "NvmlReader",
    "PiPmicReader",
    "RaplReader",
    "SensorUnavailable",
    "detect_energy_reader",
    "guess_profile_name",
    "pmic_rail_power_w",
    "rapl_delta_uj",
    "run_command",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- estimate


class EstimatedEnergy(EnergyReader):
    """Where no sensor exists: energy from this process's CPU time and a device profile's power figures.

    The model is linear in busy cores, between the profile's `idle_w` (device idle) and `active_w` (every core
    busy):

        joules = idle_share * idle_w * wall_s  +  cpu_s * (active_w - idle_w) / cores

    `cpu_s` is this process's user + system CPU time (children included) over the interval, so a step that
    keeps two of four cores busy for 1 s adds half the dynamic range for that second. `idle_share=1.0`
    (default) charges the device's whole idle power to the run, which is what a measured reader sees and what
    the owner pays; `idle_share=0.0` gives the marginal cost of training alone. Other processes' CPU is not
    counted, and neither are frequency scaling, memory traffic or the radio: the label says "estimated" for a
    reason.
    """

    kind = "estimate"

    def __init__(
        self,
        profile: DeviceProfile,
        *,
        idle_share: float = 1.0,
        clock: Clock = time.monotonic,
        cpu_seconds: Callable[[], float] | None = None,
        guessed: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= idle_share <= 1.0:
            raise ValueError(f"idle_share must be within [0, 1], got {idle_share}")
        self.profile = profile
        self.idle_share = idle_share
        self.guessed = guessed  # True when no profile was given and the machine was not recognised
        self._clock = clock
        self._cpu_seconds = cpu_seconds or _process_cpu_seconds
        self._start: tuple[float, float] | None = None  # (wall, cpu) at start
        self._final: float | None = None

    @property
    def method(self) -> str:
        return ESTIMATED

    @property
    def source(self) -> str:
        return f"estimate:{self.profile.name} profile" + (" (guessed)" if self.guessed else "")

    def start(self) -> None:
        self._start = (self._clock(), self._cpu_seconds())
        self._final = None

    def read_joules(self) -> float:
        if self._final is not None:
            return self._final
        if self._start is None:
            return 0.0
        wall_s = self._clock() - self._start[0]
        cpu_s = self._cpu_seconds() - self._start[1]
        return self.joules_for(wall_s, cpu_s)

    def stop(self) -> None:
        if self._start is not None and self._final is None:
            self._final = self.read_joules()

    def joules_for(self, wall_s: float, cpu_s: float) -> float:
        """The model above, for a given wall time and CPU time in seconds."""
        profile = self.profile
        return self.idle_share * profile.idle_w * wall_s + cpu_s * profile.dynamic_w_per_core


def _process_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return float(times.user + times.system + times.children_user + times.children_system)


# ------------------------------------------------------------------------------------------------ detection


# (substring of /proc/device-tree/model, built-in profile): recognises the device when no profile is given.
_DEVICE_TREE_MODELS = (
    ("Raspberry Pi 5", "raspberry-pi-5"),
    ("Raspberry Pi 4", "raspberry-pi-4"),
    ("Orin Nano", "jetson-orin-nano"),
    ("AGX Orin", "jetson-agx-orin"),
)
_FALLBACK_PROFILE = "x86-laptop"


def guess_profile_name(root: str | Path = "/") -> str | None:
    """The built-in profile matching this board's device-tree model, or None (x86 PCs have none)."""
    try:
        model = (Path(root) / "proc" / "device-tree" / "model").read_bytes().decode("utf-8", "replace")
    except OSError:
        return None
    for needle, name in _DEVICE_TREE_MODELS:
        if needle in model:
            return name
    return None


def detect_energy_reader(
    profile: DeviceProfile | str | None = None,
    root: str | Path = "/",
    *,
    runner: CommandRunner | None = None,
) -> EnergyReader:
    """The best energy reader this device has, else the estimate; never raises for a missing sensor.

    Tries RAPL, INA3221, the Pi 5 PMIC and NVML, in that order, except that the reader the profile names is
    tried first. The returned reader's `skipped` says why each reader before it was unavailable. The estimate
    uses `profile`, else the built-in profile matching the board's device-tree model, else "x86-laptop" marked
    as guessed. `root` prefixes every sysfs path and `runner` runs vcgencmd: both are for tests.
    """
    if isinstance(profile, str):
        profile = load_profile(profile)
    probes: list[tuple[str, Callable[[], EnergyReader]]] = [
        (RaplReader.kind, lambda: RaplReader(root)),
        (Ina3221Reader.kind, lambda: Ina3221Reader(root)),
        (PiPmicReader.kind, lambda: PiPmicReader(runner=runner)),
        (NvmlReader.kind, lambda: NvmlReader()),
    ]
    if profile is not None:
        preferred = profile.energy_reader
        probes.sort(key=lambda probe: probe[0] != preferred)  # stable: the rest keep their order
    skipped: list[str] = []
    for kind, probe in probes:
        try:
            reader = probe()
        except (SensorUnavailable, OSError) as exc:  # OSError: a sysfs surprise no probe foresaw
            skipped.append(f"{kind}: {exc}")
            continue
        reader.skipped = tuple(skipped)
        log.info("energy: %s (%s)", reader.source, reader.method)
        return reader
    guessed = False
    if profile is None:
        name = guess_profile_name(root)
        guessed = name is None
        profile = load_profile(name or _FALLBACK_PROFILE)
    estimate = EstimatedEnergy(profile, guessed=guessed)
    estimate.skipped = tuple(skipped)
    log.info("energy: %s, no sensor: %s", estimate.source, "; ".join(skipped))
    return estimate
