"""What the bench scripts share. They run as scripts (`python bench/NAME.py`), so this is imported as `common`;
they do not import the tests. Their command lines are edgesplit.server.orchestrate's records, as the demo's,
compare's and the tests' are."""

from __future__ import annotations

import os
import platform
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgesplit.server.orchestrate import EDGESPLIT, ExportCommand, ServeCommand, command_line

__all__ = ["EDGESPLIT", "export_command", "free_port", "machine", "serve_command"]


# The /proc/cpuinfo flags that decide which kernels run (x86: AVX2/AVX-512/VNNI/bf16/AMX; arm64: dot product, i8mm).
CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimddp", "i8mm",
)  # fmt: skip


def machine() -> dict[str, Any]:
    """The host, printed beside every figure: CPU model and kernel-deciding flags, the route an int8 head takes
    on it (edgesplit/client/cpu.py), cores, platform and the load average when this is called."""
    from edgesplit.client.cpu import choose_route, detect

    features = detect()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() in ("flags", "features"):
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": features.model or platform.processor(),
        "cpu_features": [flag for flag in CPU_FLAGS if flag in flags],
        "int8_route": choose_route(features).value,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


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
