"""The server's transport: one websocket conversation (Connection), tokens, TLS, frame limits, SIGHUP.

Nothing here knows about rounds or frameworks; server.py joins this to the round engine.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.server import ServerConnection

from edgesplit.client.protocol import MAGIC, Error, Kind, Message, Role, Session, State, Wire, encode, kind_may_come
from edgesplit.errors import EdgesplitError, ProtocolError
from edgesplit.server.round_events import Action

CLOSE_TRY_AGAIN_LATER = 1013  # websocket close code: the server is busy (too many connections awaiting Hello)
# Until a client has shown a valid Hello, its frames may be no bigger than this: a stranger cannot make the
# server buffer an activation-sized frame. A Hello is a few hundred bytes.
HELLO_MAX_BYTES = 64 * 1024
# A peer's string (an id, a reason, an error naming its keys) is cut to this many characters wherever the
# server prints, records or returns it: one Hello must not write megabytes into the log or the metrics.
PEER_TEXT_MAX_CHARS = 500
# A close reason travels in the close frame's 125-byte payload, after the 2-byte code; a longer one makes
# websockets refuse the close, and the peer would see a normal close (1000) instead of the refusal's code.
CLOSE_REASON_MAX_BYTES = 123
# Refusals printed per address in each window; the rest are counted and the count printed once.
REFUSALS_LOGGED_PER_WINDOW = 30
REFUSAL_WINDOW_S = 60.0
# What the server has written to a peer and the peer has not read yet (pongs to its pings, a Gradients frame,
# an Error) may be at most the largest frame the server sends plus this; past it the connection is aborted.
# A peer that sends pings and never reads would otherwise grow the server's memory by every pong.
WRITE_BUFFER_SLACK_BYTES = 1 << 20
# The longest a peer may leave the server's writes unread (the write buffer above websockets' write_limit)
# before the connection is aborted; `edgesplit serve --send-timeout` changes it. A Gradients frame of a few
# MB crosses a link of 1 Mbit/s in well under this.
SEND_TIMEOUT_S = 60.0
# Incoming messages buffered per connection before websockets stops reading it. The protocol is one request,
# one answer: an honest client has at most one message waiting, and 16 activation-sized frames would be a lot
# of memory to hold for one peer.
MAX_QUEUE = 4


class WriteStalled(ConnectionError):
    """Why a connection was aborted: its peer does not read what the server writes."""


class BoundedConnection(ServerConnection):
    """websockets' server connection with the write side bounded: its sans-I/O protocol answers every ping
    with a pong written straight to the transport, whatever the peer has left unread, and a send waits for
    the peer to read without limit. Here the connection is aborted (the transport closed, no close
    handshake) when its write buffer passes `write_buffer_max_bytes`, or when writing has been paused
    (the buffer above the write limit) for `send_timeout_s`. Subclass it through `bounded_connection`."""

    write_buffer_max_bytes = 0
    send_timeout_s = SEND_TIMEOUT_S
    _stalled: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # may queue automatic replies: pongs, a close
        unread, limit = self.transport.get_write_buffer_size(), self.write_buffer_max_bytes
        if limit and unread > limit:
            self.abort_unread(f"{unread:,} bytes written to it unread, past the limit of {limit:,}")

    def pause_writing(self) -> None:
        super().pause_writing()
        why = f"it left what the server wrote unread for {self.send_timeout_s:g} s"
        self._stalled = self.loop.call_later(self.send_timeout_s, self.abort_unread, why)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_stall()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall()
        super().connection_lost(exc)

    def abort_unread(self, why: str) -> None:
        """Close the transport now, dropping what it holds; recv and send then raise ConnectionClosed, whose
        __cause__ is a WriteStalled saying why."""
        self._cancel_stall()
        self.set_connection_exc(WriteStalled(f"aborted: {why}"))
        self.transport.abort()

    def _cancel_stall(self) -> None:
        if self._stalled is not None:
            self._stalled.cancel()
            self._stalled = None


def bounded_connection(max_frame_bytes: int, send_timeout_s: float) -> type[BoundedConnection]:
    """The connection class for websockets' serve(create_connection=...): unread output bounded to the
    session's largest frame plus WRITE_BUFFER_SLACK_BYTES, and unread time to `send_timeout_s`."""
    bounds = {"write_buffer_max_bytes": max_frame_bytes + WRITE_BUFFER_SLACK_BYTES, "send_timeout_s": send_timeout_s}
    return type("ServerBoundedConnection", (BoundedConnection,), bounds)


def aborted_because(error: BaseException) -> str | None:
    """The reason a connection was aborted for not reading, if `error` (its ConnectionClosed) says one."""
    cause = error.__cause__
    return str(cause) if isinstance(cause, WriteStalled) else None


def peer_text(value: object, limit: int = PEER_TEXT_MAX_CHARS) -> str:
    """A peer-supplied string made safe to print and record: every control character (a newline, a terminal
    escape) written as its escape sequence, so a peer cannot forge a log line, and cut to `limit`
    characters, saying how long it was."""
    text = str(value)
    cut = text[:limit]
    escaped = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
    return escaped if len(text) <= limit else f"{escaped}... ({len(text)} characters in all)"


def close_reason(reason: str) -> str:
    """`reason` cut to fit a close frame in UTF-8, never in the middle of a character."""
    return reason.encode("utf-8")[:CLOSE_REASON_MAX_BYTES].decode("utf-8", errors="ignore")


class RefusalLog:
    """Rate-limits the printing of refusals per address: a peer refused in a loop cannot fill the disk.
    Sans-I/O: `admit` says whether to print this one, and what to say about those it suppressed."""

    def __init__(self, per_window: int = REFUSALS_LOGGED_PER_WINDOW, window_s: float = REFUSAL_WINDOW_S) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (window start, refusals in it)

    def admit(self, address: str, now: float) -> tuple[bool, str | None]:
        """(print this refusal?, a line to print first about the suppressed ones, or None)."""
        started, count = self._windows.get(address, (now, 0))
        note = None
        if now - started >= self.window_s:
            if count > self.per_window:
                note = f"{count - self.per_window} more refusal(s) from {address} were not logged"
            started, count = now, 0
        elif count == self.per_window:
            note = f"refusals from {address}: {count} in {now - started:.0f} s; not logging more for a while"
        if len(self._windows) > 10_000 and address not in self._windows:
            self._windows.clear()  # many addresses: forget old windows rather than grow without bound
        self._windows[address] = (started, count + 1)
        return count < self.per_window, note


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


def startup_warnings(host: str, tls_cert: Path | None, tokens: bool) -> list[str]:
    """What an operator should hear before anyone connects: an open door, a certificate out of date."""
    warnings = []
    if host not in ("127.0.0.1", "localhost", "::1") and not (tls_cert and tokens):
        warnings.append(
            "reachable from other machines without TLS and tokens: anyone who can reach this port can join, "
            "and the link is readable (see docs/security.md)"
        )
    if tls_cert is not None:
        warnings.extend(certificate_warnings(tls_cert, datetime.datetime.now(datetime.timezone.utc)))
    return warnings


def certificate_warnings(cert: Path, now: datetime.datetime) -> list[str]:
    """A certificate that has expired (or is not valid yet) loads, but every client will refuse it."""
    try:
        from cryptography import x509
    except ImportError:  # an optional dependency: without it the dates go unchecked
        return []
    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except (OSError, ValueError):
        return []  # loading it for TLS already said what is wrong, if anything
    if certificate.not_valid_after_utc < now:
        return [f"the TLS certificate {cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"]
    if certificate.not_valid_before_utc > now:
        return [f"the TLS certificate {cert} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d} UTC"]
    return []


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
        reason = peer_text(reason)
        error = Error(code, reason)
        frame = self.session.send(error) if self.session.state is not State.CLOSED else encode(error)
        await _send_and_close(self.websocket, frame, reason, close_code)

    async def close_from_outside(self, code: str, reason: str, close_code: int) -> None:
        """Close a connection another task owns: its Session must not change under it."""
        self.actions.put_nowait(None)
        reason = peer_text(reason)
        await _send_and_close(self.websocket, encode(Error(code, reason)), reason, close_code)


async def _send_and_close(websocket: Any, frame: bytes, reason: str, close_code: int) -> None:
    try:
        await websocket.send(frame)
        await websocket.close(close_code, close_reason(reason))
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
