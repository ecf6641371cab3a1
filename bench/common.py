"""What the bench scripts share. They run as scripts (`python bench/NAME.py`), so this is imported as `common`;
they do not import the tests. Their command lines are edgesplit.server.orchestrate's records, as the demo's,
compare's and the tests' are."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

from edgesplit.server.orchestrate import EDGESPLIT, ExportCommand, ServeCommand, command_line

__all__ = ["EDGESPLIT", "export_command", "free_port", "serve_command"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def export_command(out: Path, cut_layer: int, quantize: str = "none", model: str = "smollm2-135m") -> list[str]:
    """`edgesplit export` of `model` into `out` (replacing it) with this interpreter."""
    return command_line(ExportCommand(out=out, model=model, cut_layer=cut_layer, quantize=quantize, force=True))


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
    command = ServeCommand(
        artifacts=artifacts,
        host="127.0.0.1",
        port=port,
        rounds=rounds,
        min_clients=min_clients,
        steps_per_round=steps,
        metrics_out=metrics_out,
        extra=tuple(extra),
    )
    return command_line(command)
