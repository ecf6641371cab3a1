"""The flooding peer and the step-time reader that bench/flood.py and bench/flood_bar.py both use, apart from
both so that neither imports the other for them."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The tests' hand-made handshake and pings, as bench/flood_bar.py takes the tests' frames.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "server"))
from loopback import PINGS, websocket_handshake  # noqa: E402


def flood(port: int, until: float, aborted_after: list[float], going: Callable[[], bool] = lambda: True) -> None:
    """Open a websocket, flood pings, never read; when the server aborts it, record when and open another
    (until `until`, or until going() says the server is gone)."""
    while time.monotonic() < until and going():
        opened = time.monotonic()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(5.0)
        try:
            sock.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            sock.close()
            return  # nothing listens on the port any more: the run is over
        try:
            websocket_handshake(sock, port)
            sock.settimeout(1.0)
            opened = time.monotonic()
            while time.monotonic() < until and going():
                try:
                    sock.sendall(PINGS)
                except TimeoutError:
                    continue
            return  # the flood is over and this connection was never aborted
        except OSError:
            aborted_after.append(round(time.monotonic() - opened, 2))
        finally:
            sock.close()


def step_seconds(metrics: Path) -> list[tuple[float, float]]:
    """(wall time, seconds) of each of the client's steps."""
    steps = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "step":
            steps.append((record["time"], sum(record["seconds"].values())))
    return steps
