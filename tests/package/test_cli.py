"""The `edgesplit` command: a mistyped command is answered with a suggestion, and a device install (no torch,
no onnx) asked for a server-side command says which extra to install instead of printing a traceback."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesplit.cli import quiet_progress_bars_off_terminal

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


# A subcommand stand-in: what transformers' GGUF loader does (tqdm.auto, imported after the command starts).
BAR_AFTER_MAIN = """
import os, sys
from edgesplit.cli import quiet_progress_bars_off_terminal
quiet_progress_bars_off_terminal(os.environ, sys.stderr)
from tqdm.auto import tqdm
for _ in tqdm(range(200), desc="de-quantizing", mininterval=0):
    pass
"""


def test_library_progress_bars_stay_out_of_a_log_file(tmp_path: Path) -> None:
    log = tmp_path / "export.log"
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    with log.open("w") as handle:
        subprocess.run([sys.executable, "-c", BAR_AFTER_MAIN], stderr=handle, cwd=REPO, env=env, check=True, timeout=60)
    assert "de-quantizing" not in log.read_text()
    # The same bar, without the call: it does write to the file (what the call prevents).
    without = BAR_AFTER_MAIN.replace("quiet_progress_bars_off_terminal(os.environ, sys.stderr)", "")
    with log.open("w") as handle:
        subprocess.run([sys.executable, "-c", without], stderr=handle, cwd=REPO, env=env, check=True, timeout=60)
    assert "de-quantizing" in log.read_text()


def test_a_terminal_or_a_users_setting_is_left_alone() -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    environ: dict[str, str] = {}
    quiet_progress_bars_off_terminal(environ, Terminal())  # type: ignore[arg-type]
    assert environ == {}
    environ = {"TQDM_DISABLE": "0"}
    quiet_progress_bars_off_terminal(environ, io.StringIO())
    assert environ == {"TQDM_DISABLE": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
