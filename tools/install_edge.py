"""Install the edge client on a device, slim: a venv with the client's dependencies, minus the hub stack.

    tools/install_edge.sh DIR SPEC [--keep-pip] [--replace] [-- PIP_OPTIONS...]
    python3 tools/install_edge.py DIR SPEC [...the same]

DIR is the venv to create. SPEC is what `pip install` would take: the wheel (./edgesplit-0.1.0-py3-none-any.whl),
a checkout (./edgesplit), a git URL (git+https://...) or `edgesplit`. Anything after `--` goes to every pip
command, for example `-- --no-index --find-links wheels/cp311` on a device without internet.

Why not plain `pip install`: tokenizers declares a dependency on huggingface-hub, which brings a dozen packages
of its own (an HTTP stack, fsspec, hf-xet, PyYAML, tqdm, click: about 32 MB installed on x86). `import
tokenizers` does not import huggingface_hub; it is needed only to download tokenizers from the hub, and the
client never does that: it reads the artifacts' tokenizer.json with `Tokenizer.from_file`. onnxruntime up to
1.23 (the newest for Python 3.10) requires sympy (59 MB with mpmath) and coloredlogs for its tools, never for
running a session. pip and setuptools (about 24 MB) are not needed to run either.

What it does:
1. `python -m venv DIR` with the interpreter running this script; the rest runs in the venv's own Python.
2. pip in the venv is upgraded when older than 22.2, the first with `--report` (JetPack 6's, from Ubuntu
   22.04, is 22.0.2).
3. `pip install --dry-run --ignore-installed --report` resolves SPEC's full dependency set for this
   interpreter and platform, as a plain install would.
4. From the report's requires graph (markers evaluated for this interpreter, extras followed), every package
   reachable from SPEC only through huggingface-hub, sympy or coloredlogs is dropped, with those three. A
   package that something else needs too (packaging: onnxruntime) stays.
5. `pip install --no-deps` installs the rest at exactly the resolved versions (a direct URL at the resolved
   file or commit).
6. pip and setuptools are removed, unless `--keep-pip` (`DIR/bin/python -m ensurepip` brings pip back).
7. A fresh process checks the venv: `edgesplit.client.client` imports, `tokenizers` loads and encodes a tokenizer
   through the client's own code, and neither torch nor huggingface_hub can be imported.

What was installed and dropped is written to DIR/edgesplit-install.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Requirements the client never uses, dropped with whatever only they need:
# - huggingface-hub: tokenizers requires it for downloading from the hub (see above).
# - sympy, coloredlogs: onnxruntime up to 1.23 (the newest for Python 3.10, JetPack 6) requires them for its
#   tools (symbolic shape inference, the transformers optimiser's logging); `import onnxruntime` and its
#   sessions do not import them. Checked: the client's int8 head trains with both made unimportable on
#   onnxruntime 1.22.0, 1.23.2 and 1.32.0 (tests/client/test_without_hub.py blocks them too).
DROPPED_ROOTS = ("huggingface-hub", "sympy", "coloredlogs")
# Installed into every venv (setuptools up to Python 3.11) but needed by nothing the client runs.
BOOTSTRAP = ("setuptools", "wheel", "pip")
MIN_PIP = (22, 2)  # pip install --report
RECORD = "edgesplit-install.json"

# Run by the venv's Python in a fresh, isolated process (-I: no PYTHONPATH, no current directory on sys.path).
SMOKE_CHECK = r"""
import importlib.util, json, sys, tempfile
from pathlib import Path
def importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a finder that refuses it, as the tests' blocker does
        return False
found = [name for name in ("torch", "huggingface_hub") if importable(name)]
assert not found, f"importable in the venv, and must not be: {found}"
import edgesplit.client.client
from edgesplit.client.data import Example, encode_examples
from tokenizers import Tokenizer, models, pre_tokenizers
vocab = {"[UNK]": 0, "<pad>": 1, "</s>": 2, "hello": 3, "world": 4}
built = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
built.pre_tokenizer = pre_tokenizers.Whitespace()
built.enable_padding(pad_id=1, pad_token="<pad>")  # the client must work on a copy without padding
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "tokenizer.json"
    built.save(str(path))
    tokenizer = Tokenizer.from_file(str(path))
encoded = encode_examples(tokenizer, [Example("hello", "world")], 4, 2, 1)
assert encoded.input_ids.tolist() == [[3, 4, 2, 1]], encoded.input_ids.tolist()
assert encoded.labels.tolist() == [[-100, 4, 2, -100]], encoded.labels.tolist()
assert "huggingface_hub" not in sys.modules and "torch" not in sys.modules
import numpy, onnxruntime, tokenizers
print(json.dumps({"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                  "tokenizers": tokenizers.__version__}))
"""


class InstallError(Exception):
    """What went wrong and what to do about it; printed without a traceback."""


# --------------------------------------------------------------------------------- the plan (pure functions)


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): "PyYAML" and "pyyaml", "hf_xet" and "hf-xet"."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Resolved:
    """One package of pip's report: what pip would install, and what it says it requires."""

    name: str  # canonical
    version: str
    requires: tuple[str, ...]  # Requires-Dist lines, markers included
    requested: bool  # SPEC itself, rather than a dependency
    extras: tuple[str, ...]  # the extras SPEC asked for
    pin: str  # the requirement `pip install --no-deps` gets: exactly this version, or this file or commit


@dataclass(frozen=True)
class Plan:
    keep: tuple[Resolved, ...]
    drop: tuple[Resolved, ...]  # DROPPED_ROOTS and what only they need


def pin(item: dict[str, Any]) -> str:
    """The requirement that installs exactly what pip resolved for this report item."""
    metadata = item["metadata"]
    name, version = metadata["name"], metadata["version"]
    if not item.get("is_direct"):
        return f"{name}=={version}"
    info = item["download_info"]  # PEP 610 direct_url.json: the file, directory or VCS checkout resolved
    url = info["url"]
    if "vcs_info" in info:
        url = f"{info['vcs_info']['vcs']}+{url}@{info['vcs_info']['commit_id']}"
    if info.get("subdirectory"):
        url += f"#subdirectory={info['subdirectory']}"
    return f"{name} @ {url}"


def read_report(report: dict[str, Any]) -> tuple[dict[str, Resolved], dict[str, str]]:
    """The packages of a `pip install --dry-run --report` (pip >= 22.2), by name, and the marker environment
    pip resolved them for."""
    if "install" not in report or "environment" not in report:
        raise InstallError("pip's report has no 'install' or 'environment': is this a pip install --report file?")
    packages = {}
    for item in report["install"]:
        metadata = item["metadata"]
        package = Resolved(
            name=canonical(metadata["name"]),
            version=metadata["version"],
            requires=tuple(metadata.get("requires_dist") or ()),
            requested=bool(item.get("requested")),
            extras=tuple(item.get("requested_extras") or ()),
            pin=pin(item),
        )
        packages[package.name] = package
    return packages, {key: str(value) for key, value in report["environment"].items()}


def _requirement_class() -> Any:
    """packaging's Requirement: from the package where installed, else the copy that every pip vendors (the
    venv's Python has pip but not always packaging)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    return Requirement


def needed(packages: dict[str, Resolved], environment: dict[str, str], skip: frozenset[str] = frozenset()) -> set[str]:
    """The packages the requested ones need, transitively, as pip's resolver saw it, never walking into
    `skip`: a requirement counts when its marker holds for `environment` with the extras it is asked with."""
    requirement_class = _requirement_class()
    active: dict[str, set[str]] = {}  # package -> the extras asked of it so far
    queue = [(p.name, set(p.extras)) for p in packages.values() if p.requested]
    while queue:
        name, extras = queue.pop()
        if name in skip or name not in packages:  # not in the report: pip found it not needed here
            continue
        if name in active and extras <= active[name]:
            continue
        active.setdefault(name, set()).update(extras)
        for line in packages[name].requires:
            try:
                requirement = requirement_class(line)
            except Exception as error:  # InvalidRequirement, from whichever packaging
                raise InstallError(
                    f"cannot read {name}'s requirement {line!r} ({error}); the slim install cannot tell what "
                    f"needs what. Install with plain pip instead: DIR/bin/pip install SPEC"
                ) from None
            marker = requirement.marker
            if marker is None or any(
                marker.evaluate({**environment, "extra": extra}) for extra in ("", *sorted(active[name]))
            ):
                queue.append((canonical(requirement.name), set(requirement.extras)))
    return set(active)


def plan(packages: dict[str, Resolved], environment: dict[str, str], roots: tuple[str, ...] = DROPPED_ROOTS) -> Plan:
    """Keep everything except `roots` and the packages reachable from the requested ones only through them.

    A root that SPEC itself asks for is kept.

    A package the graph does not reach at all (it should not happen: pip resolved it for a reason) is kept:
    the plan drops only what it can show is needed through `roots` alone."""
    skip = frozenset(root for root in roots if root in packages and not packages[root].requested)
    if not skip:
        return Plan(keep=tuple(packages.values()), drop=())
    only_through_root = needed(packages, environment) - needed(packages, environment, skip)
    keep = tuple(p for name, p in sorted(packages.items()) if name not in only_through_root)
    drop = tuple(packages[name] for name in sorted(only_through_root))
    return Plan(keep=keep, drop=drop)


# ------------------------------------------------------------------------------------------ the install


def say(text: str) -> None:
    print(f"install_edge: {text}", file=sys.stderr, flush=True)


def pip(arguments: list[str], pip_options: list[str], what: str, hint: str) -> None:
    """Run this Python's pip; on failure raise, saying what was being done (`what`) and what to do (`hint`)."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *arguments, *pip_options]
    if subprocess.run(command).returncode != 0:
        raise InstallError(f"{what} failed (pip's output is above). {hint}\n  command: {' '.join(command)}")


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def ensure_pip(pip_options: list[str]) -> str:
    """The venv's pip version, after upgrading it where it is too old for --report."""
    version = importlib.metadata.version("pip")
    if version_tuple(version) < MIN_PIP:
        say(f"pip {version} cannot write --report (needs 22.2): upgrading pip in the venv first")
        pip(
            ["install", "--upgrade", "pip>=22.2"],
            pip_options,
            f"upgrading pip {version}",
            "pip >= 22.2 is needed to resolve without installing. Without internet, put a pip wheel into the "
            "--find-links folder (pip download pip -d FOLDER on a machine with internet).",
        )
        version = subprocess.run(  # asked afresh: this process's metadata caches may predate the upgrade
            [sys.executable, "-c", "import importlib.metadata as m; print(m.version('pip'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    return version


def resolve(spec: str, pip_options: list[str]) -> dict[str, Any]:
    """pip's report for installing `spec` with all its dependencies into this venv, installing nothing."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        pip(
            ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), spec],
            pip_options,
            f"resolving {spec}",
            "Check that SPEC is a wheel, a checkout, a git URL or a name pip can find from here, and that "
            "the index (or --find-links folder) has wheels for this Python and platform.",
        )
        loaded: dict[str, Any] = json.loads(report.read_text())
        return loaded


def site_packages_mb(venv: Path) -> float:
    """Disk usage of the venv's site-packages, in MB (1e6 bytes), counted like `du`."""
    total = 0
    for folder in {f.resolve() for f in venv.glob("lib*/python*/site-packages")}:  # lib64 is a link to lib
        for path in [folder, *folder.rglob("*")]:
            if not path.is_symlink():
                total += path.lstat().st_blocks * 512
    return round(total / 1e6, 1)


def install_inside(venv: Path, spec: str, keep_pip: bool, pip_options: list[str]) -> dict[str, Any]:
    """Steps 2 to 7, run by the venv's Python."""
    pip_version = ensure_pip(pip_options)
    say(f"resolving {spec} with pip {pip_version} (dry run, nothing installed yet)")
    packages, environment = read_report(resolve(spec, pip_options))
    the_plan = plan(packages, environment)
    if not any(p.requested for p in the_plan.keep):
        raise InstallError(f"pip's report holds no requested package for {spec!r}")
    dropped = ", ".join(f"{p.name} {p.version}" for p in the_plan.drop) or "nothing"
    say(f"{len(packages)} packages resolved; dropping {len(the_plan.drop)}: {dropped}")
    pip(
        ["install", "--no-deps", *[p.pin for p in the_plan.keep]],
        pip_options,
        "installing the resolved packages",
        "The same index served the dry run a moment ago: a dropped connection or a full disk is likeliest.",
    )
    kept = {p.name for p in the_plan.keep}
    installed = {canonical(d.metadata["Name"]) for d in importlib.metadata.distributions()}
    removed = [name for name in BOOTSTRAP if name in installed and name not in kept]
    if removed and not keep_pip:
        say(f"removing {', '.join(removed)} (--keep-pip keeps them; `{venv}/bin/python -m ensurepip` restores pip)")
        pip(["uninstall", "--yes", *removed], [], f"removing {removed}", "Rerun with --keep-pip to keep them.")
    else:
        removed = []
    record: dict[str, Any] = {
        "spec": spec,
        "python": sys.version.split()[0],
        "platform_machine": environment.get("platform_machine", ""),
        "pip_used": pip_version,
        "pip_options": pip_options,
        "installed": {p.name: p.version for p in the_plan.keep},
        "dropped": {p.name: p.version for p in the_plan.drop},
        "removed": removed,
    }
    (venv / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    say("checking the venv in a fresh process")
    check = subprocess.run([sys.executable, "-I", "-c", SMOKE_CHECK], capture_output=True, text=True, cwd=venv)
    if check.returncode != 0:
        raise InstallError(
            f"the venv {venv} is installed but fails its check:\n{check.stdout}{check.stderr}\n"
            f"What was installed and dropped is in {venv / RECORD}. To install with plain pip instead: "
            f"rm -r {venv} && python3 -m venv {venv} && {venv}/bin/pip install {spec}"
        )
    record["check"] = json.loads(check.stdout.strip().splitlines()[-1])
    record["site_packages_mb"] = site_packages_mb(venv)
    (venv / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def create_venv(venv: Path, replace: bool) -> Path:
    """Step 1: a new venv at `venv` made by this interpreter; its Python."""
    if venv.exists() and any(venv.iterdir()):
        if not (venv / "pyvenv.cfg").exists():
            raise InstallError(f"{venv} exists and is not a venv: choose a new directory for the client's venv")
        if not replace:
            raise InstallError(f"{venv} is already a venv: pass --replace to delete it and build it again")
        say(f"removing the venv {venv} (--replace)")
        shutil.rmtree(venv)
    say(f"creating the venv {venv} with Python {sys.version.split()[0]} ({sys.executable})")
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        hint = ""
        if "ensurepip" in made.stdout + made.stderr:
            minor = f"{sys.version_info.major}.{sys.version_info.minor}"
            hint = f" Debian and Ubuntu leave venv support out: sudo apt install python3-venv (or python{minor}-venv)."
        raise InstallError(f"python -m venv {venv} failed:\n{made.stdout}{made.stderr}{hint}")
    return venv / "bin" / "python"


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    pip_options: list[str] = []
    if "--" in arguments:
        at = arguments.index("--")
        arguments, pip_options = arguments[:at], arguments[at + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Options after -- go to every pip command (for example -- --no-index --find-links wheels/cp311).",
    )
    parser.add_argument("venv", type=Path, help="the venv to create (for example ~/edgesplit)")
    parser.add_argument("spec", help="what to install: a wheel, a checkout, a git URL or `edgesplit`")
    parser.add_argument("--keep-pip", action="store_true", help="keep pip and setuptools in the venv")
    parser.add_argument("--replace", action="store_true", help="delete the venv at VENV first if there is one")
    args = parser.parse_args(arguments)
    venv = args.venv.expanduser().absolute()
    inside = False
    try:
        if sys.version_info < (3, 10):  # noqa: UP036 - run by whichever python3 the device has
            raise InstallError(
                f"edgesplit needs Python 3.10 or newer; this is {sys.version.split()[0]} ({sys.executable}). "
                "Run the script with a newer python3 (tools/install_edge.sh reads $PYTHON)."
            )
        inside = Path(sys.prefix).resolve() == venv.resolve()
        if not inside:
            # Not yet in the venv: make it, then run this script again with its Python, which has pip.
            python = create_venv(venv, args.replace)
            spec = args.spec
            if ("/" in spec or spec.startswith(".")) and Path(spec).exists():  # a path, as pip tells them apart
                spec = str(Path(spec).absolute())
            command = [str(python), str(Path(__file__).resolve()), str(venv), spec]
            command += ["--keep-pip"] if args.keep_pip else []
            return subprocess.run(command + (["--", *pip_options] if pip_options else [])).returncode
        record = install_inside(venv, args.spec, args.keep_pip, pip_options)
    except InstallError as error:
        say(f"error: {error}")
        if inside:
            say(f"the venv {venv} is incomplete: once the cause is fixed, run the same command with --replace")
        return 1
    say(
        f"done: {venv}, site-packages {record['site_packages_mb']} MB, {len(record['installed'])} packages "
        f"(onnxruntime {record['check']['onnxruntime']}, numpy {record['check']['numpy']}); run "
        f"{venv}/bin/edgesplit client --help"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
