"""Helpers for tests that run a real server and real clients as processes on loopback.

    with Processes() as run:                       # kills whatever is still running at the end, pass or fail
        server = run.start("server", serve_command(artifacts, port, work, rounds=2))
        server.wait_for(r"listening on")           # event-based: a line of its output, not a sleep
        client = run.start("a", client_command(f"ws://127.0.0.1:{port}", artifacts, data, "a"))
        assert client.wait(120) == 0, client.output

The command lines are edgesplit.server.orchestrate's records, rendered for this interpreter.
`TcpProxy` sits between a client and the server to cut the link (`cut`, `restore`) or slow it (`delay_s`).
`probe` and `raw_frame` speak the protocol only as far as a test wants, to play a bad peer.
`federated_run` is the in-process form: a real Server and one real Client over a loopback websocket, in one
event loop, for tests that check what a short run leaves behind (its losses, its checkpoint).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed

from edgesplit.client.artifacts import Manifest
from edgesplit.client.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Activations,
    Error,
    Hello,
    decode,
    encode,
    encode_tensor,
)
from edgesplit.server.orchestrate import ClientCommand, ServeCommand, command_line

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def federated_run(
    artifacts: Path,
    data: Path,
    checkpoint_dir: Path,
    rounds: int,
    steps: int,
    learning_rate: float,
    client_id: str = "a",
    group_by_length: bool = False,
    summary: dict[str, Any] | None = None,
) -> list[float]:
    """A short run of one client, `rounds` x `steps` at `learning_rate`, checkpointed into `checkpoint_dir`;
    the client's training losses, step by step (and its summary into `summary`, if given)."""
    from edgesplit.client.client import Client, ClientConfig
    from edgesplit.server.server import Server, ServerConfig

    server = Server(
        ServerConfig(
            artifacts=artifacts,
            port=0,
            rounds=rounds,
            min_clients=1,
            steps_per_round=steps,
            learning_rate=learning_rate,
            checkpoint_dir=checkpoint_dir,
        )
    )
    ready = asyncio.Event()
    serving = asyncio.create_task(server.serve(ready))
    await ready.wait()
    url = f"ws://127.0.0.1:{server.port}"
    client = Client(
        ClientConfig(
            server=url, artifacts=artifacts, data=data, client_id=client_id, quiet=True, group_by_length=group_by_length
        )
    )
    outcome = await client.run()
    if summary is not None:
        summary.update(outcome)
    await serving
    return list(client.losses)


def write_task(path: Path, seed: int, count: int, prompt_key: str = "prompt") -> None:
    """Prompt 'wA wB' -> completion 'wA+2 wA+3': learnable by a tiny model in a few steps. `prompt_key`:
    "prompt", or "context" (the E2E files' name for it)."""
    rng = np.random.default_rng(seed)
    with path.open("w") as handle:
        for _ in range(count):
            a = int(rng.integers(0, 40))
            handle.write(json.dumps({prompt_key: f"w{a} w{a + 1}", "completion": f"w{a + 2} w{a + 3}"}) + "\n")


def serve_command(
    artifacts: Path,
    port: int,
    work: Path,
    *,
    rounds: int,
    steps: int = 4,
    min_clients: int = 2,
    extra: Sequence[str] = (),
) -> list[str]:
    command = ServeCommand(
        artifacts=artifacts,
        port=port,
        rounds=rounds,
        min_clients=min_clients,
        steps_per_round=steps,
        learning_rate=0.02,
        checkpoint_dir=work / "ckpt",
        metrics_out=work / "server.jsonl",
        threads=1,
        extra=tuple(extra),
    )
    return command_line(command)


def client_command(
    server: str, artifacts: Path, data: Path, client_id: str, work: Path, extra: Sequence[str] = ()
) -> list[str]:
    command = ClientCommand(
        server=server,
        artifacts=artifacts,
        data=data,
        client_id=client_id,
        metrics_out=work / f"{client_id}-metrics.jsonl",
        threads=1,
        connect_timeout_s=120.0,
        extra=tuple(extra),
    )
    return command_line(command)


class Proc:
    """A child process whose merged stdout/stderr is collected line by line as it comes."""

    def __init__(
        self, name: str, command: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.process = subprocess.Popen(
            list(command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            cwd=cwd or REPO,
            env=env,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        """The first output line matching `pattern`, waiting for it; fails if the process ends without it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                finished = not self._reader.is_alive()
                remaining = deadline - time.monotonic()
                if finished or remaining <= 0:
                    state = "exited" if finished else f"still running after {timeout:g} s"
                    raise AssertionError(f"{self.name} {state} without printing /{pattern}/:\n{self.output}")
                self._changed.wait(min(remaining, 1.0))

    def wait(self, timeout: float = 180.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._reader.join(10)


class Processes:
    """Starts processes and kills every one still running when the block ends, however it ends."""

    def __init__(self) -> None:
        self.started: list[Proc] = []
        self.proxies: list[TcpProxy] = []

    def start(
        self, name: str, command: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        proc = Proc(name, command, cwd, env)
        self.started.append(proc)
        return proc

    def proxy(self, target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        self.proxies.append(proxy)
        return proxy

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for proc in self.started:
            proc.kill()
        for proxy in self.proxies:
            proxy.close()
        for proc in self.started:  # pytest shows this when the test fails
            print(f"----- {proc.name} (exit {proc.process.returncode})\n{proc.output}")


class _Link:
    def __init__(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self.downstream = downstream  # the client's side
        self.upstream = upstream  # the server's side
        self.cut = False


class TcpProxy:
    """A loopback TCP relay, client <-> proxy <-> server, that a test can cut, restore and slow down.

    `cut` is what a lost Wi-Fi link looks like to each side: the client's connection fails at once (and new
    ones are refused until `restore`), while the server's connection stays open and silent, as a dead
    peer's does until pings time out. `delay_s` holds each chunk going up to the server that long: a slow
    uplink.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay_s = 0.0
        self.accepted = 0
        self._links: list[_Link] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return  # the listener was closed by cut() or close()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            link = _Link(downstream, upstream)
            with self._lock:
                self._links.append(link)
                self.accepted += 1
            threading.Thread(target=self._pump, args=(link, downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(link, upstream, downstream, False), daemon=True).start()

    def _pump(self, link: _Link, source: socket.socket, target: socket.socket, going_up: bool) -> None:
        try:
            while True:
                chunk = source.recv(1 << 16)
                if not chunk:
                    break
                if going_up and self.delay_s:
                    time.sleep(self.delay_s)
                if link.cut:
                    return
                target.sendall(chunk)
        except OSError:
            pass
        if not link.cut:  # an ordinary close on one side closes the other
            for sock in (link.downstream, link.upstream):
                _close(sock)

    def cut(self) -> None:
        if self._listener is not None:
            _close(self._listener)
            self._listener = None
        with self._lock:
            for link in self._links:
                link.cut = True
                _close(link.downstream)  # the server-side socket stays open, and nobody reads or writes it

    def close(self) -> None:
        self.cut()
        with self._lock:
            for link in self._links:
                _close(link.upstream)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


# ------------------------------------------------------------------------------------------ bad peers

# Pings with the largest payload a control frame may carry (125 bytes), masked with a zero key as a client must.
PINGS = (b"\x89\xfd" + b"\0" * 4 + b"p" * 125) * 500


def websocket_handshake(sock: socket.socket, port: int) -> bytes:
    """Open a websocket by hand on a connected socket: the server's answer to the opening handshake, up to its
    blank line. A socket closed before that raises ConnectionResetError."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(1024)
        if not chunk:
            raise ConnectionResetError("closed during the opening handshake")
        answer += chunk
    return answer


def raw_frame(
    kind: int,
    metadata: dict[str, Any],
    tensors: dict[str, np.ndarray] | None = None,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    """A frame built by hand, so that it can say what the message classes would refuse to construct."""
    encoded = [encode_tensor(name, array) for name, array in (tensors or {}).items()]
    body = json.dumps({**metadata, "tensors": [header.to_json() for header, _ in encoded]}).encode()
    return struct.pack("<2sBBI", MAGIC, version, kind, len(body)) + body + b"".join(data for _, data in encoded)


@dataclass
class Probe:
    """What a bad peer got back: the messages, the Error code among them, and the close code."""

    messages: list[Any]
    error: str | None
    close_code: int | None


def probe(url: str, first: bytes | str, *then: bytes | str, ssl: Any = None) -> Probe:
    """Open a connection, send `first`, wait for its answer (a Welcome to a good Hello), send `then`, and read
    everything until the server closes the connection. The server handles a connection's frames in order.

    The asyncio client, not the sync one: websockets' sync client over TLS now and then did not finish its
    opening handshake within the server's 10 s here (1 or 2 in 60); the asyncio one always did."""

    async def run() -> Probe:
        messages: list[Any] = []
        async with async_connect(url, ssl=ssl, max_size=None, compression=None, open_timeout=60) as ws:
            try:
                await ws.send(first)
                messages.append(decode(await asyncio.wait_for(ws.recv(), 120)))
                for frame in then:
                    await ws.send(frame)
                while True:
                    messages.append(decode(await asyncio.wait_for(ws.recv(), 120)))
            except ConnectionClosed as closed:
                errors = [m.code for m in messages if isinstance(m, Error)]
                return Probe(
                    messages,
                    errors[-1] if errors else None,
                    closed.rcvd.code if closed.rcvd is not None else None,
                )

    return asyncio.run(run())


def hello_frame(client_id: str, manifest: Manifest, token: str | None = None) -> bytes:
    return encode(Hello(client_id, PROTOCOL_VERSION, manifest.manifest_hash, token, 8))


def activations(
    manifest: Manifest, *, round: int = 0, step: int = 0, batch: int | None = None, value: float = 0.1
) -> Activations:
    batch_size, seq, hidden = manifest.activations_shape
    batch_size = batch or batch_size
    labels = np.random.default_rng(0).integers(0, manifest.vocab_size, (batch_size, seq))
    return Activations(
        round,
        step,
        {
            "activations": np.full((batch_size, seq, hidden), value, np.float32),
            "attention_mask": np.ones((batch_size, seq), np.int64),
            "labels": labels.astype(np.int64),
        },
    )


def adapters(manifest: Manifest, value: float = 0.0) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in manifest.lora.matrices.items()}
