"""A peer that sends pings and never reads must not grow the server's memory or hold its connection forever:
a real server, flooded by raw sockets on loopback, while an honest client process trains."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil
import pytest
from loopback import PINGS, Processes, client_command, free_port, serve_command, websocket_handshake, write_task

SEND_TIMEOUT_S = 3.0


@pytest.fixture
def artifacts(tiny_artifacts):  # type: ignore[no-untyped-def]
    return tiny_artifacts("llama", 1)


def open_flooder(port: int) -> socket.socket:
    """A websocket opened by hand, with a tiny receive buffer that this peer never reads from again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    answer = websocket_handshake(sock, port)
    assert b" 101 " in answer.split(b"\r\n")[0], answer
    sock.settimeout(1.0)
    return sock


def flood_until_aborted(sock: socket.socket, limit_s: float) -> float | None:
    """Send pings and never read; the seconds until the server dropped the connection, or None."""
    started = time.monotonic()
    while time.monotonic() - started < limit_s:
        try:
            sock.sendall(PINGS)
        except TimeoutError:
            continue  # the server stopped reading us for a moment (its own buffers are full)
        except OSError:  # reset or broken pipe: the server aborted the connection
            return time.monotonic() - started
    return None


def test_a_peer_that_floods_pings_and_never_reads_is_aborted(artifacts, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    data = tmp_path / "data.jsonl"
    write_task(data, seed=0, count=32)
    with Processes() as run:
        extra = ["--send-timeout", str(SEND_TIMEOUT_S)]
        server = run.start("server", serve_command(artifacts, port, tmp_path, rounds=2, min_clients=1, extra=extra))
        server.wait_for("listening on")
        memory = psutil.Process(server.process.pid)
        before = memory.memory_info().rss
        flooders = [open_flooder(port) for _ in range(2)]
        client = run.start("client", client_command(f"ws://127.0.0.1:{port}", artifacts, data, "honest", tmp_path))
        # The Hello timeout (30 s) is past this bound: only the write bounds can end the flood in time.
        aborted_after = [flood_until_aborted(sock, limit_s=20.0) for sock in flooders]
        grown_mb = (memory.memory_info().rss - before) / 2**20
        assert client.wait(120) == 0, client.output
        assert server.wait(60) == 0, server.output
        for sock in flooders:
            sock.close()

    assert all(seconds is not None for seconds in aborted_after), (aborted_after, server.output)
    assert "aborted: " in server.output
    assert grown_mb < 64, grown_mb  # the tail's first steps included; unbounded pongs grew ~4 MB/s a peer
    assert "round 2/2 closed with 1 clients (honest)" in server.output
    assert "[server] round 1/2: 1 of about 4 steps" in server.output  # serve's per-step progress, in a pipe
    assert "FutureWarning" not in server.output
