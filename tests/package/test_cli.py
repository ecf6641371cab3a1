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


# A subcommand stand-in: a bar as transformers' GGUF loader draws one (tqdm.auto, imported after the command
# starts, no interval of its own), for about a second.
BAR_AFTER_MAIN = """
import os, sys, time
from edgesplit.cli import quiet_progress_bars_off_terminal
quiet_progress_bars_off_terminal(os.environ, sys.stderr)
from tqdm.auto import tqdm
for _ in tqdm(range(40), desc="de-quantizing"):
    time.sleep(0.025)
"""


def redraws_into_a_file(script: str, tmp_path: Path) -> str:
    log = tmp_path / "export.log"
    env = {name: value for name, value in os.environ.items() if not name.startswith("TQDM_")}
    with log.open("w") as handle:
        subprocess.run([sys.executable, "-c", script], stderr=handle, cwd=REPO, env=env, check=True, timeout=60)
    return log.read_text()


def test_library_progress_bars_redraw_rarely_into_a_log_file(tmp_path: Path) -> None:
    throttled = redraws_into_a_file(BAR_AFTER_MAIN, tmp_path)
    assert throttled.count("de-quantizing") <= 2 and "40/40" in throttled  # the first and the last draw
    # The same bar without the call: a redraw every 0.1 s (what the call prevents).
    unthrottled = redraws_into_a_file(
        BAR_AFTER_MAIN.replace("quiet_progress_bars_off_terminal(os.environ, sys.stderr)", ""), tmp_path
    )
    assert unthrottled.count("de-quantizing") >= 5


def test_a_terminal_or_a_users_setting_is_left_alone() -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    environ: dict[str, str] = {}
    quiet_progress_bars_off_terminal(environ, Terminal())  # type: ignore[arg-type]
    assert environ == {}
    environ = {"TQDM_MININTERVAL": "1"}
    quiet_progress_bars_off_terminal(environ, io.StringIO())
    assert environ == {"TQDM_MININTERVAL": "1"}
    environ = {}
    quiet_progress_bars_off_terminal(environ, io.StringIO())
    assert environ == {"TQDM_MININTERVAL": "15"}
