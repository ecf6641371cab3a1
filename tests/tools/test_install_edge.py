"""tools/install_edge.py's plan: which packages of pip's report the slim device install drops.

The fixtures are real `pip install --dry-run --ignore-installed --report` outputs for the edgesplit wheel, into
fresh x86-64 venvs of CPython 3.11.7 (pip 23.2.1) and 3.10.13 (pip 23.0.1), trimmed to the fields the
installer reads (each item's metadata down to name, version and requires_dist). No network, no pip run here:
the real install is proven by bench/client_footprint.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "pip_report"


def load_installer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_edge", REPO / "tools" / "install_edge.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["install_edge"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


install_edge = load_installer()

# What the client's wheel needs, directly or not, without huggingface-hub: the same on both Pythons but for
# tomli (3.10) and onnxruntime 1.23.2's own dependencies (the newest onnxruntime with cp310 wheels).
CLIENT = {"edgesplit", "numpy", "onnxruntime", "websockets", "psutil", "tokenizers", "safetensors"}
ONNXRUNTIME_132 = {"flatbuffers", "packaging", "protobuf"}
HUB_STACK_311 = {
    "huggingface-hub", "anyio", "click", "filelock", "fsspec", "h11", "hf-xet", "httpcore2", "httpx2", "idna",
    "pyyaml", "tqdm", "truststore", "typing-extensions",
}  # fmt: skip


def recorded(python: str) -> tuple[dict[str, Any], dict[str, str]]:
    report = json.loads((FIXTURES / f"edgesplit-{python}-x86_64.json").read_text())
    packages, environment = install_edge.read_report(report)
    return packages, environment


def names(packages: tuple[Any, ...]) -> set[str]:
    return {p.name for p in packages}


def item(name: str, requires: list[str] | None = None, requested: bool = False, **download: Any) -> dict[str, Any]:
    """One `install` entry of a pip report, as pip writes it for an index package unless `download` says."""
    metadata: dict[str, Any] = {"metadata_version": "2.1", "name": name, "version": "1.0"}
    if requires:
        metadata["requires_dist"] = requires
    info = download or {"url": f"https://files.example/{name}-1.0-py3-none-any.whl", "archive_info": {}}
    return {"download_info": info, "is_direct": bool(download), "requested": requested, "metadata": metadata}


ENVIRONMENT_310 = {"python_version": "3.10", "python_full_version": "3.10.13", "sys_platform": "linux",
                   "platform_machine": "aarch64", "implementation_name": "cpython", "os_name": "posix"}  # fmt: skip


def test_cp311_drops_the_hub_and_the_thirteen_packages_only_it_needs() -> None:
    packages, environment = recorded("cp311")
    plan = install_edge.plan(packages, environment)
    assert names(plan.drop) == HUB_STACK_311
    assert names(plan.keep) == CLIENT | ONNXRUNTIME_132
    assert names(plan.keep) | names(plan.drop) == set(packages)


def test_a_package_something_else_needs_too_stays() -> None:
    # packaging: huggingface-hub and onnxruntime. tomli on 3.10: huggingface-hub and edgesplit itself.
    packages, environment = recorded("cp310")
    assert any(line.startswith("packaging") for line in packages["huggingface-hub"].requires)
    plan = install_edge.plan(packages, environment)
    assert {"packaging", "tomli"} <= names(plan.keep)
    # onnxruntime 1.23.2's tool-only dependencies go; anyio needs exceptiongroup before 3.11, and only the
    # hub's HTTP stack needs anyio.
    assert names(plan.drop) == HUB_STACK_311 | {"exceptiongroup", "coloredlogs", "humanfriendly", "sympy", "mpmath"}
    assert names(plan.keep) == CLIENT | ONNXRUNTIME_132 | {"tomli"}


def test_markers_are_evaluated_for_the_reported_interpreter_and_extras_are_followed() -> None:
    report = {
        "environment": ENVIRONMENT_310,
        "install": [
            item("app", ["tok", "net", "old; python_version < '3.11'", "win; sys_platform == 'win32'"], True),
            item("tok", ["huggingface_hub>=0.16"]),
            item("huggingface-hub", ["net[fast]", "Old", "win", "yaml-thing; platform_machine == 'aarch64'"]),
            item("net", ["speed; extra == 'fast'", "slow; extra == 'slow'"]),
            item("speed"),
            item("slow"),  # no one asks for net[slow]: not reachable at all, so kept
            item("old"),
            item("win"),
            item("YAML_Thing"),
        ],
    }
    packages, environment = install_edge.read_report(report)
    plan = install_edge.plan(packages, environment)
    # speed: net[fast] is asked for only by the hub; net itself by app too. old: app needs it on 3.10.
    # win: app's marker is false on Linux, so only the hub needs it. yaml-thing: by its canonical name.
    assert names(plan.drop) == {"huggingface-hub", "speed", "win", "yaml-thing"}
    assert names(plan.keep) == {"app", "tok", "net", "slow", "old"}

    on_311 = install_edge.plan(packages, {**environment, "python_version": "3.11"})
    assert "old" in names(on_311.drop)  # app's marker is false there: only the hub's unmarked "Old" needs it


def test_nothing_is_dropped_when_the_hub_is_asked_for_or_absent() -> None:
    asked = {"environment": ENVIRONMENT_310, "install": [item("huggingface-hub", ["tqdm"], True), item("tqdm")]}
    assert install_edge.plan(*install_edge.read_report(asked)).drop == ()
    absent = {"environment": ENVIRONMENT_310, "install": [item("app", ["numpy"], True), item("numpy")]}
    assert install_edge.plan(*install_edge.read_report(absent)).drop == ()


def test_each_package_is_pinned_to_what_pip_resolved() -> None:
    packages, _ = recorded("cp311")
    assert packages["edgesplit"].pin == "edgesplit @ file:///tmp/slim/dist/edgesplit-0.1.0-py3-none-any.whl"
    assert packages["numpy"].pin == "numpy==2.4.6"
    assert packages["pyyaml"].pin == "PyYAML==6.0.4"
    git = item(
        "edgesplit",
        url="https://github.com/example/edgesplit.git",
        vcs_info={"vcs": "git", "commit_id": "0093fa3", "requested_revision": "main"},
        subdirectory="python",
    )
    assert (
        install_edge.pin(git) == "edgesplit @ git+https://github.com/example/edgesplit.git@0093fa3#subdirectory=python"
    )
    checkout = item("edgesplit", url="file:///home/pi/edgesplit", dir_info={})
    assert install_edge.pin(checkout) == "edgesplit @ file:///home/pi/edgesplit"


def test_what_cannot_be_read_is_refused_with_a_reason() -> None:
    with pytest.raises(install_edge.InstallError, match="--report"):
        install_edge.read_report({"version": "1"})
    broken = {"environment": ENVIRONMENT_310, "install": [item("app", ["not a requirement!"], True)]}
    with pytest.raises(install_edge.InstallError, match="plain pip"):
        install_edge.needed(*install_edge.read_report(broken))


def test_an_existing_directory_is_never_overwritten_unasked(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(install_edge.InstallError, match="not a venv"):
        install_edge.create_venv(tmp_path, replace=True)
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\n")
    with pytest.raises(install_edge.InstallError, match="--replace"):
        install_edge.create_venv(tmp_path, replace=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_installers_own_check_passes_on_this_checkout() -> None:
    # The check the installer runs in the new venv, run here on the checkout with torch and huggingface_hub
    # made unimportable: it must keep up with the client's code (edgesplit.client.data's API) that it calls.
    blocker = (
        "import importlib.abc, sys\n"
        "class Blocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'huggingface_hub'):\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, Blocker())\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", blocker + install_edge.SMOKE_CHECK], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert process.returncode == 0, process.stdout + process.stderr
    assert set(json.loads(process.stdout.strip().splitlines()[-1])) == {"onnxruntime", "numpy", "tokenizers"}
