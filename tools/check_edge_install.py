"""Can the edge client install on the devices? Resolve its dependencies to aarch64 wheels; say what they cost.

    python tools/check_edge_install.py [--python 3.10 --python 3.11] [--dest DIR] [--floors] [--isolated]

For each target Python (3.10 = JetPack 6 on a Jetson, 3.11 = Raspberry Pi OS bookworm), the edge client's
dependencies, read from pyproject's [project.dependencies], are resolved with

    pip download --only-binary=:all: --platform manylinux_2_17_aarch64 ... --python-version X.Y -d DIR

and the script prints one JSON object: each wheel (name, version, bytes, who needs it), the download size per
Python, and whether the set is clean: binary only, aarch64 or pure Python, and no torch, transformers or peft.
It exits 1 when a target fails, and then says which requirement cannot be met there and which versions exist
(for example an onnxruntime minimum above the newest release with a cp310 aarch64 wheel).

Why the closure is recomputed here: pip evaluates environment markers (`python_version < '3.11'`,
`platform_machine == 'aarch64'`) against the interpreter running pip, not against --python-version and
--platform. Run from 3.11 on x86, `tomli; python_version < '3.11'` would be dropped for the 3.10 target.
So the markers of pyproject and of every downloaded wheel's METADATA are evaluated here for the target,
anything the target needs but pip skipped is downloaded in another pass, and wheels only the host's markers
wanted are listed as `not_needed_on_target` and left out of the size.

Each target also reports its `slim` set: the wheels tools/install_edge.py installs, which leaves out
huggingface-hub and every wheel that only it needs (same markers, same graph), with that set's download size.
The `--dest` folder keeps the full set: an offline slim install (`-- --no-index --find-links DIR/cpXY`) still
resolves huggingface-hub's requirements in its dry run before dropping them, so it needs their wheels there.

`--floors` also checks that each direct dependency's lower bound has a wheel for the target: a device that
already has an old release installed keeps it only if the range admits it and a wheel exists.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path
from typing import Any

from install_edge import DROPPED_ROOTS  # this folder's device installer (run as a script, tools/ is on sys.path)

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the server usually runs 3.11+
    try:
        import tomli as tomllib
    except ImportError:  # pip has carried a copy since 21.2
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]
# Wheels built for glibc 2.17 (manylinux2014) up to 2.28 install on both devices: JetPack 6 is Ubuntu 22.04
# (glibc 2.35) and bookworm has glibc 2.36. pip widens each manylinux tag to the older ones itself.
PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64")
FORBIDDEN = ("torch", "transformers", "peft", "triton")
# tools/install_edge.py, the device install, leaves these out with what only they need (its docstring says
# why): the "slim" set below is what that installs.
SLIM_DROPS = DROPPED_ROOTS
# Target interpreters: the Python the device's OS ships, as markers see it.
TARGETS: dict[str, dict[str, str]] = {
    "3.10": {"device": "Jetson, JetPack 6 (Ubuntu 22.04)", "python_full_version": "3.10.12"},
    "3.11": {"device": "Raspberry Pi OS bookworm (Debian 12)", "python_full_version": "3.11.2"},
}
MAX_PASSES = 5


def marker_environment(python: str) -> dict[str, str]:
    """What `packaging` markers see on a Linux aarch64 CPython of this version."""
    return {
        "implementation_name": "cpython",
        "implementation_version": TARGETS.get(python, {}).get("python_full_version", python + ".0"),
        "os_name": "posix",
        "platform_machine": "aarch64",
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": TARGETS.get(python, {}).get("python_full_version", python + ".0"),
        "python_version": python,
        "sys_platform": "linux",
    }


def marker_holds(marker: Marker | None, environment: dict[str, str], extras: set[str]) -> bool:
    if marker is None:
        return True
    return any(marker.evaluate({**environment, "extra": extra}) for extra in ({""} | extras))


def edge_requirements(pyproject: Path) -> list[Requirement]:
    with pyproject.open("rb") as handle:
        project = tomllib.load(handle)["project"]
    return [Requirement(line) for line in project.get("dependencies", [])]


@dataclass
class Wheel:
    path: Path
    name: str  # canonical
    version: Version
    requires: list[Requirement]

    @classmethod
    def read(cls, path: Path) -> Wheel:
        name, version, _, _ = parse_wheel_filename(path.name)
        with zipfile.ZipFile(path) as archive:
            metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = Parser().parsestr(archive.read(metadata_name).decode("utf-8", "replace"))
        requires = [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]
        return cls(path, str(canonicalize_name(name)), version, requires)

    def platform_problem(self, python: str) -> str | None:
        """Why this wheel cannot install on a Linux aarch64 CPython `python`, or None."""
        _, _, _, tags = parse_wheel_filename(self.path.name)
        cp = "cp" + python.replace(".", "")
        for tag in tags:
            platform_ok = tag.platform == "any" or (tag.platform.endswith("_aarch64") and "linux" in tag.platform)
            python_ok = tag.interpreter in (cp, "py3", "py2", f"py{python.replace('.', '')}") or (
                tag.abi == "abi3"
                and tag.interpreter.startswith("cp3")
                and int(tag.interpreter[3:]) <= int(python.split(".")[1])
            )
            if platform_ok and python_ok:
                return None
        return f"{self.path.name} is not an aarch64 (or pure Python) wheel for CPython {python}"


@dataclass
class TargetResult:
    python: str
    ok: bool = True
    wheels: list[dict[str, Any]] = field(default_factory=list)
    not_needed_on_target: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    floors: list[dict[str, Any]] = field(default_factory=list)
    slim_dropped: list[str] = field(default_factory=list)  # names: SLIM_DROPS and what only they need

    def fail(self, message: str) -> None:
        self.ok = False
        self.errors.append(message)

    def to_json(self) -> dict[str, Any]:
        total = sum(w["bytes"] for w in self.wheels)
        report: dict[str, Any] = {
            "device": TARGETS.get(self.python, {}).get("device", ""),
            "python": self.python,
            "ok": self.ok,
            "wheel_count": len(self.wheels),
            "total_bytes": total,
            "total_mb": round(total / 1e6, 1),
            "wheels": self.wheels,
        }
        slim = [w for w in self.wheels if w["name"] not in self.slim_dropped]
        slim_total = sum(w["bytes"] for w in slim)
        report["slim"] = {
            "what": f"the set tools/install_edge.py installs: without {', '.join(SLIM_DROPS)} and what only they need",
            "wheel_count": len(slim),
            "total_bytes": slim_total,
            "total_mb": round(slim_total / 1e6, 1),
            "dropped": sorted(self.slim_dropped),
            "dropped_mb": round((total - slim_total) / 1e6, 1),
        }
        if self.not_needed_on_target:
            report["not_needed_on_target"] = self.not_needed_on_target
        if self.floors:
            report["floors"] = self.floors
        if self.errors:
            report["errors"] = self.errors
        return report


def pip_download(
    requirements: list[str], python: str, dest: Path, *, isolated: bool, no_deps: bool = False
) -> subprocess.CompletedProcess[str]:
    command = (
        [sys.executable, "-m", "pip"]
        + (["--isolated"] if isolated else [])
        + [
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            python,
            "-d",
            str(dest),
        ]
    )
    for platform in PLATFORMS:
        command += ["--platform", platform]
    if no_deps:
        command.append("--no-deps")
    return subprocess.run(command + requirements, capture_output=True, text=True)


def parse_versions(listed: str) -> list[Version]:
    """pip's "(from versions: 1.16.0, 1.16.1, ...)" as sorted versions ("none" and legacy strings dropped)."""
    versions = []
    for text in listed.split(","):
        try:
            versions.append(Version(text.strip()))
        except InvalidVersion:
            continue
    return sorted(versions)


def explain_pip_failure(output: str) -> str:
    """pip's reason in one line: the requirement that cannot be met and the versions that do exist."""
    found = re.search(
        r"Could not find a version that satisfies the requirement (\S+) \(from versions: ([^)]*)\)", output
    )
    if found:
        requirement, versions = found.group(1), parse_versions(found.group(2))
        if not versions:
            return f"{requirement}: no binary wheel at all for this platform and Python"
        return (
            f"{requirement}: not satisfiable here; the newest release with a wheel for this platform and "
            f"Python is {versions[-1]} (oldest {versions[0]}); change the range in pyproject.toml"
        )
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR")]
    conflict = [line.strip() for line in output.splitlines() if "conflict" in line.lower() or "depends on" in line]
    return " | ".join(errors + conflict) or output.strip()[-2000:]


def resolve(requirements: list[Requirement], python: str, dest: Path, *, isolated: bool) -> TargetResult:
    result = TargetResult(python)
    environment = marker_environment(python)
    roots = [r for r in requirements if marker_holds(r.marker, environment, set())]
    asked = [_without_marker(r) for r in roots]
    wheels: dict[str, Wheel] = {}
    for _ in range(MAX_PASSES):
        process = pip_download(asked, python, dest, isolated=isolated)
        if process.returncode != 0:
            result.fail(explain_pip_failure(process.stdout + process.stderr))
            return result
        wheels = {}
        for path in sorted(dest.glob("*.whl")):
            wheel = Wheel.read(path)
            wheels[wheel.name] = wheel
        not_wheels = [p.name for p in dest.iterdir() if p.is_file() and not p.name.endswith(".whl")]
        if not_wheels:
            result.fail(f"not binary wheels: {not_wheels}")
        needed, missing, required_by = closure(roots, wheels, environment, result)
        if not missing:
            break
        asked += [m for m in missing if m not in asked]
    else:
        result.fail(f"the target's closure did not settle after {MAX_PASSES} passes: still missing {missing}")
        return result
    for name in sorted(needed):
        wheel = wheels[name]
        problem = wheel.platform_problem(python)
        if problem:
            result.fail(problem)
        result.wheels.append(
            {
                "file": wheel.path.name,
                "name": name,
                "version": str(wheel.version),
                "bytes": wheel.path.stat().st_size,
                "required_by": sorted(required_by[name]),
            }
        )
    result.not_needed_on_target = sorted(wheels[n].path.name for n in set(wheels) - needed)
    slim, _, _ = closure(roots, wheels, environment, TargetResult(python), skip=frozenset(SLIM_DROPS))
    result.slim_dropped = sorted(needed - slim)
    forbidden = sorted(n for n in needed if n in FORBIDDEN)
    if forbidden:
        result.fail(f"the edge client's dependencies pull in {forbidden}: it must install without them")
    return result


def _without_marker(requirement: Requirement) -> str:
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    return f"{requirement.name}{extras}{requirement.specifier}"


def closure(
    roots: list[Requirement],
    wheels: dict[str, Wheel],
    environment: dict[str, str],
    result: TargetResult,
    skip: frozenset[str] = frozenset(),
) -> tuple[set[str], list[str], dict[str, set[str]]]:
    """The wheels the target needs, the requirements pip did not download for it, and who needs what; never
    walking into `skip`."""
    needed: set[str] = set()
    missing: list[str] = []
    required_by: dict[str, set[str]] = {}
    queue: list[tuple[Requirement, str]] = [(r, "edgesplit") for r in roots]
    extras_seen: dict[str, set[str]] = {}
    while queue:
        requirement, parent = queue.pop()
        name = str(canonicalize_name(requirement.name))
        if name in skip:
            continue
        required_by.setdefault(name, set()).add(parent)
        wheel = wheels.get(name)
        if wheel is None:
            missing.append(_without_marker(requirement))
            continue
        if not requirement.specifier.contains(wheel.version, prereleases=True):
            result.fail(f"{parent} needs {requirement}, but {wheel.name} {wheel.version} was resolved")
        new_extras = set(requirement.extras) - extras_seen.get(name, set())
        if name in needed and not new_extras:
            continue
        extras_seen.setdefault(name, set()).update(requirement.extras)
        needed.add(name)
        for child in wheel.requires:
            if marker_holds(child.marker, environment, extras_seen[name]):
                queue.append((child, name))
    return needed, missing, required_by


def available_versions(name: str, python: str, dest: Path, *, isolated: bool) -> list[Version]:
    """Every release of `name` with a wheel for the target: pip lists them when asked for none of them."""
    process = pip_download([f"{name}<0"], python, dest, isolated=isolated, no_deps=True)
    found = re.search(r"\(from versions: ([^)]*)\)", process.stdout + process.stderr)
    return parse_versions(found.group(1)) if found else []


def check_floors(requirements: list[Requirement], python: str, dest: Path, *, isolated: bool) -> list[dict[str, Any]]:
    """For each direct dependency: its lower bound, and the oldest release in range with a wheel here."""
    environment = marker_environment(python)
    floors = []
    for requirement in requirements:
        if not marker_holds(requirement.marker, environment, set()):
            continue
        bounds = [s.version for s in requirement.specifier if s.operator in (">=", "==", "~=")]
        versions = available_versions(requirement.name, python, dest, isolated=isolated)
        in_range = [v for v in versions if requirement.specifier.contains(v, prereleases=False)]
        entry: dict[str, Any] = {
            "requirement": str(requirement),
            "floor": bounds[0] if bounds else None,
            "oldest_with_wheel": str(in_range[0]) if in_range else None,
            "newest_with_wheel": str(in_range[-1]) if in_range else None,
        }
        if bounds:
            floor_series = SpecifierSet(f"=={bounds[0]}.*")
            entry["floor_has_wheel"] = any(floor_series.contains(v) for v in in_range)
            if not entry["floor_has_wheel"]:
                entry["note"] = (
                    f"no {requirement.name} {bounds[0]}.x wheel for this target: pip installs a newer "
                    "release; a device keeps an older one only where it came from elsewhere (apt, a build)"
                )
        floors.append(entry)
    return floors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="target Python, repeatable (default: 3.10 and 3.11)")
    parser.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    parser.add_argument("--dest", type=Path, help="keep the wheels here, in one folder per Python (cpXY/)")
    parser.add_argument("--floors", action="store_true", help="also check each direct dependency's lower bound")
    parser.add_argument(
        "--isolated",
        action="store_true",
        help="ignore pip's configuration (extra indexes, constraints): plain PyPI, as on a device",
    )
    parser.add_argument("--brief", action="store_true", help="one line per wheel instead of the full records")
    args = parser.parse_args(argv)
    pythons = args.python or sorted(TARGETS)
    requirements = edge_requirements(args.pyproject)
    work = Path(tempfile.mkdtemp(prefix="edgesplit-wheels-")) if args.dest is None else args.dest
    report: dict[str, Any] = {
        "pyproject": str(args.pyproject),
        "requirements": [str(r) for r in requirements],
        "platforms": list(PLATFORMS),
        "forbidden": list(FORBIDDEN),
        "targets": {},
    }
    try:
        for python in pythons:
            dest = work / ("cp" + python.replace(".", ""))
            shutil.rmtree(dest, ignore_errors=True)  # a stale wheel from another range would join the set
            dest.mkdir(parents=True)
            print(f"resolving for CPython {python} aarch64 into {dest} ...", file=sys.stderr, flush=True)
            result = resolve(requirements, python, dest, isolated=args.isolated)
            if args.floors:
                floor_dir = work / f"floors-cp{python.replace('.', '')}"
                shutil.rmtree(floor_dir, ignore_errors=True)
                floor_dir.mkdir(parents=True)
                result.floors = check_floors(requirements, python, floor_dir, isolated=args.isolated)
            entry = result.to_json()
            if args.brief:
                entry["wheels"] = [f"{w['file']} {w['bytes'] / 1e6:.2f} MB" for w in entry["wheels"]]
            report["targets"]["cp" + python.replace(".", "")] = entry
    finally:
        if args.dest is None:
            shutil.rmtree(work, ignore_errors=True)
    report["ok"] = all(t["ok"] for t in report["targets"].values())
    report["summary"] = {
        name: f"{t['wheel_count']} wheels, {t['total_mb']} MB; slim (tools/install_edge.py) "
        f"{t['slim']['wheel_count']} wheels, {t['slim']['total_mb']} MB" + ("" if t["ok"] else ", FAILED")
        for name, t in report["targets"].items()
    }
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
