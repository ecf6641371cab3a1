"""The built wheel installs one top-level package, `edgesplit`, and nothing else into site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_holds_only_the_edgesplit_package(tmp_path: Path) -> None:
    source = tmp_path / "source"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(REPO / "edgesplit", source / "edgesplit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = tmp_path / "dist"
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "-w",
        str(out),
        str(source),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("edgesplit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"edgesplit"}
    # The parts and the device profiles' data travel with it.
    for part in (
        "client/protocol.py",
        "server/server.py",
        "export/exporter.py",
        "devices/raspberry-pi-5.toml",
        "cli.py",
        "__main__.py",
    ):
        assert f"edgesplit/{part}" in names, part
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgesplit = edgesplit.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_python_dash_m_edgesplit_is_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgesplit", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0
    assert "usage: edgesplit <command>" in result.stdout
    for command in ("export", "serve", "client", "demo", "compare", "profile"):
        assert f"  {command} " in result.stdout
