"""What the bench scripts share. They run as scripts (`python bench/NAME.py`), so this is imported as `common`;
they do not import the tests, whose loopback helpers (tests/server/loopback.py) do the same for them."""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

EDGESPLIT = [sys.executable, "-m", "edgesplit.cli"]  # this interpreter's edgesplit, torch and all


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def export_command(out: Path, cut_layer: int, quantize: str = "none", model: str = "smollm2-135m") -> list[str]:
    """`edgesplit export` of `model` into `out` (replacing it) with this interpreter."""
    command = [*EDGESPLIT, "export", "--model", model, "--cut-layer", str(cut_layer), "--quantize", quantize]
    return [*command, "--out", str(out), "--force"]


def serve_command(
    artifacts: Path,
    port: int,
    metrics_out: Path,
    *,
    rounds: int = 1,
    min_clients: int = 1,
    steps: int,
    extra: Sequence[str] = (),
) -> list[str]:
    """`edgesplit serve` on loopback with this interpreter; `extra` adds flags."""
    return [
        *EDGESPLIT,
        "serve",
        "--artifacts",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--rounds",
        str(rounds),
        "--min-clients",
        str(min_clients),
        "--steps-per-round",
        str(steps),
        "--metrics-out",
        str(metrics_out),
        *extra,
    ]
