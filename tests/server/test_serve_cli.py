"""`edgesplit serve` refuses a port another process listens on at once, with a message and no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_port_in_use_is_refused_before_anything_loads(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "edgesplit", "serve", "--artifacts", str(tmp_path / "none"), "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "choose another --port" in result.stderr
    assert "Traceback" not in result.stderr
    # Refused before the artifacts were read (they do not exist) and before any tail loaded.
    assert "artifact" not in result.stderr.lower()
    assert time.monotonic() - started < 60


def test_every_serve_option_has_help() -> None:
    from edgesplit.server.cli import build_parser

    missing = [action.dest for action in build_parser()._actions if not action.help]
    assert not missing, f"options without help text: {missing}"
