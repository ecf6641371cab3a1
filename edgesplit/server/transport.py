"""The server's transport: one websocket conversation (Connection), tokens, TLS, frame limits, SIGHUP.

Nothing here knows about rounds or frameworks; server.py joins this to the round engine.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.client.protocol import MAGIC, Error, Kind, Message, Role, Session, State, Wire, encode, kind_may_come
from edgesplit.errors import EdgesplitError, ProtocolError
from edgesplit.server.round_events import Action

CLOSE_TRY_AGAIN_LATER = 1013  # websocket close code: the server is busy (too many connections awaiting Hello)
# Until a client has shown a valid Hello, its frames may be no bigger than this: a stranger cannot make the
# server buffer an activation-sized frame. A Hello is a few hundred bytes.
HELLO_MAX_BYTES = 64 * 1024


def read_tokens(path: Path) -> dict[str, str]:
    """A tokens file: one `client_id token` pair a line; # starts a comment."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise EdgesplitError(f"{path}:{number}: expected 'client_id token', got {len(parts)} fields")
        tokens[parts[0]] = parts[1]
    return tokens


def reread_tokens(path: Path, current: dict[str, str]) -> dict[str, str] | None:
    """The tokens file read again (on SIGHUP), or None, said why, if the current tokens must stay."""
    try:
        tokens = read_tokens(path)
    except (OSError, EdgesplitError) as error:
        print(f"[server] tokens not reloaded, the old ones stay: {error}", flush=True)
        return None
    if current and not tokens:
        # An empty file would mean "no tokens needed": never open the door by accident.
        print(f"[server] tokens not reloaded: {path} holds none; the old ones stay", flush=True)
        return None
    print(f"[server] reloaded {len(tokens)} tokens from {path}", flush=True)
    return tokens


def token_valid(tokens: dict[str, str], client_id: str, token: str | None) -> bool:
    if not tokens:
        return True  # no tokens configured: anyone who can reach the port may join
    expected = tokens.get(client_id, "")
    # Constant time, and the same path for an unknown id as for a wrong token.
    return hmac.compare_digest((token or "").encode(), expected.encode()) and bool(expected)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise EdgesplitError(f"cannot load the TLS certificate {cert} and key {key}: {error}") from error
    return context


@dataclass(eq=False)
class Connection:
    """One websocket conversation. A reconnecting client gets a new Connection (and a new number). Only the
    connection's own task sends on its Session; other tasks reach it through `actions`."""

    number: int
    websocket: Any
    session: Session
    client_id: str = "?"
    token: str | None = None  # as presented, so that a revocation can find the sessions it ends
    # The round engine's actions for this connection, in order; None: stop (closed from outside, run over).
    actions: asyncio.Queue[Action | None] = field(default_factory=asyncio.Queue)

    def open(self) -> bool:
        # Read from the tail's worker thread too: an enum's name, no lock needed.
        return getattr(self.websocket.state, "name", "OPEN") == "OPEN"

    async def receive(self, counted: dict[str, int]) -> Message:
        frame = await self.websocket.recv()
        if isinstance(frame, str):
            raise ProtocolError("text frames are not part of the protocol; send binary frames", 1003)
        check_kind_allowed(frame, self.session.state)
        message = self.session.receive(frame)
        counted[message.kind.name] = counted.get(message.kind.name, 0) + len(frame)
        return message

    async def send(self, message: Message, wire: Wire, counted: dict[str, int]) -> None:
        frame = self.session.send(message, wire)
        await self.websocket.send(frame)
        counted[message.kind.name] = counted.get(message.kind.name, 0) + len(frame)

    async def refuse(self, code: str, reason: str, close_code: int) -> None:
        """Tell the peer why, on this conversation, then close with `close_code`."""
        error = Error(code, reason)
        frame = self.session.send(error) if self.session.state is not State.CLOSED else encode(error)
        await _send_and_close(self.websocket, frame, reason, close_code)

    async def close_from_outside(self, code: str, reason: str, close_code: int) -> None:
        """Close a connection another task owns: its Session must not change under it."""
        self.actions.put_nowait(None)
        await _send_and_close(self.websocket, encode(Error(code, reason)), reason, close_code)


async def _send_and_close(websocket: Any, frame: bytes, reason: str, close_code: int) -> None:
    try:
        await websocket.send(frame)
        await websocket.close(close_code, reason[:120])
    except Exception:  # the peer may be gone already; nothing more to tell it
        pass


def check_kind_allowed(frame: bytes, state: State) -> None:
    """Refuse a frame the conversation does not allow now from its 4-byte header alone, before its tensors
    are decoded: nothing but a Hello is parsed from a client that has not been admitted."""
    if len(frame) < 4 or frame[:2] != MAGIC:
        return  # not a frame at all: decode says why
    try:
        kind = Kind(frame[3])
    except ValueError:
        return
    if not kind_may_come(Role.SERVER, state, kind):
        raise ProtocolError(f"unexpected {kind.name} in state {state.name} (refused before its payload was read)")


def set_frame_limit(websocket: Any, limit: int) -> None:
    """The largest frame websockets will take from this peer from now on. websockets >= 15 reads the limit
    for every frame from its protocol object; older versions keep the limit given to serve()."""
    protocol = getattr(websocket, "protocol", None)
    if protocol is not None and hasattr(protocol, "max_message_size"):
        protocol.max_message_size = limit


def on_sighup(callback: Callable[[], None]) -> None:
    import signal

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        print("[server] SIGHUP cannot reload tokens here; restart the server to change them", flush=True)
