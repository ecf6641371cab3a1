"""Device profiles: what a device is, what it draws, how it measures energy, and the links it typically has.

A profile is a small TOML file. The built-in ones sit beside this module (`list_profiles()` names them); a
user passes a path to their own. The layout, with every field required unless marked optional:

    name = "raspberry-pi-5"               # lower-case slug; a built-in's name is its file name
    description = "..."                   # optional, free text
    memory_mb = 8192                      # total RAM of the device, MiB
    cores = 4                             # CPU cores the client can use
    cpu = "Broadcom BCM2712, 4x Cortex-A76 @ 2.4 GHz"
    cpu_speed_factor = 0.4                # see DeviceProfile.cpu_speed_factor
    cpu_speed_source = "..."              # where that number comes from
    idle_w = 3.0                          # whole-device power at idle, watts
    idle_w_source = "..."
    active_w = 8.0                        # power with every core busy, watts
    active_w_source = "..."
    energy_reader = "pi-pmic"             # one of ENERGY_READERS: how this device measures energy

    [links.wifi]                          # at least one link; the built-ins have wifi and lte
    uplink_mbps = 20.0
    downlink_mbps = 100.0
    rtt_ms = 30.0
    source = "..."

Every power figure carries a `*_source` saying where it comes from, because an energy estimate is only as good
as the figures behind it, and the person reading a report should be able to tell a datasheet number from a
guess.

Nothing here imports torch: the edge client reads profiles on the device. TOML is read with `tomllib` (3.11+)
or `tomli` (3.10, JetPack 6), and written by hand: profiles only need scalars and one level of tables.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.errors import DataError

PROFILE_DIR = Path(__file__).resolve().parent

# How a device measures its energy; the names match the `kind` of the readers in edgesplit/client/energy.py.
ENERGY_READERS = ("rapl", "ina3221", "pi-pmic", "nvml", "estimate")

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class ProfileError(DataError):
    """A device profile is unknown, unreadable, or has a missing, mistyped or out-of-range field."""


@dataclass(frozen=True)
class LinkProfile:
    """A typical network link from the device to the cloud server."""

    uplink_mbps: float  # device -> server (activations travel this way)
    downlink_mbps: float  # server -> device (activation gradients travel this way)
    rtt_ms: float
    source: str = ""  # where the figures come from

    def __post_init__(self) -> None:
        for name in ("uplink_mbps", "downlink_mbps"):
            value = getattr(self, name)
            if not _is_number(value) or not value > 0 or math.isinf(value):
                raise ProfileError(f"link {name} must be a positive number, got {value!r}")
        if not _is_number(self.rtt_ms) or not 0 <= self.rtt_ms < math.inf:
            raise ProfileError(f"link rtt_ms must be a number >= 0, got {self.rtt_ms!r}")
        if not isinstance(self.source, str):
            raise ProfileError(f"link source must be a string, got {self.source!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """One device, validated on construction.

    `cpu_speed_factor` is how fast this device runs the client's CPU work relative to the reference machine
    (the project's 2-vCPU x86-64 AMD EPYC development and CI machine, AVX-512): a time measured there scales
    to this device as `measured_s / cpu_speed_factor` (see `scale_seconds`). It is rough: one number cannot
    capture SIMD width, memory bandwidth, thread count and thermal throttling, so it is good for choosing a
    cut layer, not for promising a step time. Measure on the device when it matters.
    """

    name: str
    memory_mb: int
    cores: int
    cpu: str
    cpu_speed_factor: float
    cpu_speed_source: str
    idle_w: float
    idle_w_source: str
    active_w: float
    active_w_source: str
    energy_reader: str
    links: dict[str, LinkProfile] = field(default_factory=dict, hash=False)
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ProfileError(
                f"profile name must be a lower-case slug (letters, digits, '.', '_', '-'), got {self.name!r}"
            )
        where = f"profile {self.name!r}"
        for int_field in ("memory_mb", "cores"):
            value = getattr(self, int_field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ProfileError(f"{where}: {int_field} must be a positive integer, got {value!r}")
        for float_field in ("cpu_speed_factor", "active_w"):
            value = getattr(self, float_field)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ProfileError(f"{where}: {float_field} must be a positive number, got {value!r}")
        if not _is_number(self.idle_w) or not 0 <= self.idle_w < math.inf:
            raise ProfileError(f"{where}: idle_w must be a number >= 0, got {self.idle_w!r}")
        if self.active_w < self.idle_w:
            raise ProfileError(
                f"{where}: active_w ({self.active_w} W) is below idle_w ({self.idle_w} W); "
                "active_w is the power with every core busy, so it cannot be lower than idle"
            )
        for text_field in ("cpu", "cpu_speed_source", "idle_w_source", "active_w_source"):
            value = getattr(self, text_field)
            if not isinstance(value, str) or not value.strip():
                raise ProfileError(f"{where}: {text_field} must be a non-empty string, got {value!r}")
        if not isinstance(self.description, str):
            raise ProfileError(f"{where}: description must be a string, got {self.description!r}")
        if self.energy_reader not in ENERGY_READERS:
            raise ProfileError(
                f"{where}: energy_reader must be one of {', '.join(ENERGY_READERS)}, got {self.energy_reader!r}"
            )
        if not isinstance(self.links, dict) or not self.links:
            raise ProfileError(f"{where}: needs at least one link table, such as [links.wifi]")
        for link_name, link in self.links.items():
            if not isinstance(link, LinkProfile):
                kind = type(link).__name__
                raise ProfileError(f"{where}: link {link_name!r} must be a LinkProfile, got {kind}")

    @property
    def dynamic_w_per_core(self) -> float:
        """Power one fully busy core adds over idle, in the simple linear model of `EstimatedEnergy`."""
        return (self.active_w - self.idle_w) / self.cores

    def scale_seconds(self, measured_s: float) -> float:
        """A CPU time measured on the reference machine, scaled to this device (rough: see the class docs)."""
        return measured_s / self.cpu_speed_factor

    def link(self, name: str) -> LinkProfile:
        try:
            return self.links[name]
        except KeyError:
            raise ProfileError(
                f"profile {self.name!r} has no link {name!r}; it has: {', '.join(sorted(self.links))}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The TOML layout of the module docs, as plain values."""
        out: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "memory_mb": self.memory_mb,
            "cores": self.cores,
            "cpu": self.cpu,
            "cpu_speed_factor": self.cpu_speed_factor,
            "cpu_speed_source": self.cpu_speed_source,
            "idle_w": self.idle_w,
            "idle_w_source": self.idle_w_source,
            "active_w": self.active_w,
            "active_w_source": self.active_w_source,
            "energy_reader": self.energy_reader,
            "links": {
                name: {
                    "uplink_mbps": link.uplink_mbps,
                    "downlink_mbps": link.downlink_mbps,
                    "rtt_ms": link.rtt_ms,
                    "source": link.source,
                }
                for name, link in self.links.items()
            },
        }
        return out

    @staticmethod
    def from_dict(raw: Mapping[str, Any], origin: str = "profile") -> DeviceProfile:
        """Build and validate a profile from parsed TOML; `origin` (a file name) goes into every error."""
        required = {
            "name": str,
            "memory_mb": int,
            "cores": int,
            "cpu": str,
            "cpu_speed_factor": float,
            "cpu_speed_source": str,
            "idle_w": float,
            "idle_w_source": str,
            "active_w": float,
            "active_w_source": str,
            "energy_reader": str,
        }
        optional = {"description": str}
        known = set(required) | set(optional) | {"links"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ProfileError(
                f"{origin}: unknown field(s) {', '.join(unknown)}; a profile has: {', '.join(sorted(known))}"
            )
        missing = sorted(set(required) - set(raw))
        if missing:
            raise ProfileError(f"{origin}: missing field(s) {', '.join(missing)}")
        values: dict[str, Any] = {}
        for key, kind in {**required, **optional}.items():
            if key in raw:
                values[key] = _typed(raw[key], kind, f"{origin}: {key}")
        links_raw = raw.get("links")
        if not isinstance(links_raw, Mapping) or not links_raw:
            raise ProfileError(f"{origin}: needs at least one link table, such as [links.wifi]")
        links: dict[str, LinkProfile] = {}
        for link_name, link_raw in links_raw.items():
            where = f"{origin}: [links.{link_name}]"
            if not isinstance(link_raw, Mapping):
                raise ProfileError(f"{where} must be a table, got {link_raw!r}")
            link_fields = {"uplink_mbps": float, "downlink_mbps": float, "rtt_ms": float, "source": str}
            unknown = sorted(set(link_raw) - set(link_fields))
            if unknown:
                raise ProfileError(
                    f"{where}: unknown field(s) {', '.join(unknown)}; a link has: {', '.join(link_fields)}"
                )
            missing = sorted({"uplink_mbps", "downlink_mbps", "rtt_ms"} - set(link_raw))
            if missing:
                raise ProfileError(f"{where}: missing field(s) {', '.join(missing)}")
            typed = {k: _typed(v, link_fields[k], f"{where} {k}") for k, v in link_raw.items()}
            try:
                links[str(link_name)] = LinkProfile(**typed)
            except ProfileError as exc:
                raise ProfileError(f"{where}: {exc}") from None
        try:
            return DeviceProfile(links=links, **values)
        except ProfileError as exc:
            raise ProfileError(f"{origin}: {exc}") from None


def list_profiles() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(path.stem for path in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A built-in profile by name (`"raspberry-pi-5"`), or a user profile from a TOML file path."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or "\\" in text
    if not looks_like_path:
        if text not in list_profiles():
            raise ProfileError(
                f"unknown device profile {text!r}; the built-in profiles are: {', '.join(list_profiles())} "
                "(or pass the path to a .toml file of your own)"
            )
        return _load_file(PROFILE_DIR / f"{text}.toml")
    return _load_file(Path(name_or_path))


def save_profile(profile: DeviceProfile, path: str | Path) -> None:
    """Write `profile` as TOML that `load_profile(path)` reads back equal."""
    Path(path).write_text(profile_to_toml(profile), encoding="utf-8")


def profile_to_toml(profile: DeviceProfile) -> str:
    return _dump_toml(profile.to_dict())


def _load_file(path: Path) -> DeviceProfile:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(
            f"no device profile at {path}; the built-in profiles are: {', '.join(list_profiles())}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read device profile {path}: {exc}") from None
    raw = _toml_loads(text, str(path))
    return DeviceProfile.from_dict(raw, origin=str(path))


def _toml_loads(text: str, origin: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib

        parse = tomllib.loads
    else:  # Python 3.10 (JetPack 6): the standard library has no TOML reader yet
        try:
            import tomli
        except ImportError:
            raise ProfileError(
                f"reading {origin} on Python 3.10 needs the 'tomli' package: pip install tomli"
            ) from None
        parse = tomli.loads
    try:
        parsed: dict[str, Any] = parse(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and tomli's are ValueErrors
        raise ProfileError(f"{origin} is not valid TOML: {exc}") from None
    return parsed


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _typed(value: Any, kind: type, where: str) -> Any:
    """`value` checked against `kind`; an int passes where a float is expected (TOML may write 8, not 8.0)."""
    if kind is float and _is_number(value):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    expected = {float: "a number", int: "an integer", str: "a string"}[kind]
    raise ProfileError(f"{where} must be {expected}, got {value!r}")


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    escaped = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}", escaped)
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ProfileError(f"cannot write {value!r} to a profile")
        return repr(value)  # repr round-trips exactly and is valid TOML ("8.0", "1e-05")
    if isinstance(value, str):
        return _toml_string(value)
    raise ProfileError(f"cannot write a {type(value).__name__} to a profile: {value!r}")


def _dump_toml(table: Mapping[str, Any], prefix: str = "") -> str:
    """Scalars first, then each sub-table under a dotted header: enough for the profile layout."""
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for key, value in table.items():
        if isinstance(value, Mapping):
            header = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
            if any(not isinstance(v, Mapping) for v in value.values()):
                text += f"\n[{header}]\n"
            text += _dump_toml(value, header)
    return text
