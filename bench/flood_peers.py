"""The flooding peer and the step-time reader that bench/flood.py and bench/flood_bar.py both use, apart from
both so that neither imports the other for them."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

PINGS = (b"\x89\xfd" + b"\0" * 4 + b"p" * 125) * 500  # masked with a zero key, as a client must mask


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
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(1024)
                if not chunk:
                    raise ConnectionResetError("closed during the opening handshake")
                answer += chunk
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
