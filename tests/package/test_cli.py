"""The `edgesplit` command: a mistyped command is answered with a suggestion, and a device install (no torch,
no onnx) asked for a server-side command says which extra to install instead of printing a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Makes the heavy frameworks unimportable, as on a device that installed only the client.
BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "onnx", "onnxscript", "gguf", "matplotlib"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from edgesplit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def edgesplit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HEAVY, *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_a_mistyped_command_suggests_the_right_one() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edgesplit", "serv"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 2
    assert "unknown command 'serv' (did you mean 'serve'?)" in result.stderr


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        (["export", "--model", "smollm2-135m", "--cut-layer", "2", "--out", "unused"], "export"),
        (["serve", "--artifacts", "unused"], "server"),
    ],
)
def test_a_device_install_names_the_extra_a_command_needs(command: list[str], extra: str) -> None:
    result = edgesplit(*command)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"pip install 'edgesplit[{extra}]'" in result.stderr
    assert f"`edgesplit {command[0]}` needs" in result.stderr
