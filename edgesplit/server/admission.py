"""Admission: from a new connection to the round engine's ClientHello, and the refusals of those turned away.

A connection's first message must be a Hello, within --hello-timeout, while at most --max-pending-hellos
others wait to say theirs; its fields are checked (guards.check_hello), its token compared in constant time,
and a mixed-cut export's client matched to one of the exported cuts. Whether it then joins, waits or is
refused for a bad token or manifest is the round engine's decision (rounds.py). A refusal is told to the
peer, and printed and recorded escaped, cut short and rate-limited per address: a peer refused in a loop
cannot fill the log or the disk.
"""

from __future__ import annotations

import asyncio
import time

from edgesplit.client.artifacts import Manifest
from edgesplit.client.metrics import JsonlWriter
from edgesplit.client.protocol import Hello
from edgesplit.errors import ArtifactError, ProtocolError
from edgesplit.server import round_events as events
from edgesplit.server.config import ServerConfig
from edgesplit.server.guards import check_hello
from edgesplit.server.round_events import CLOSE_POLICY
from edgesplit.server.strategies import Arrays, adapters_below
from edgesplit.server.transport import CLOSE_TRY_AGAIN_LATER, Connection, RefusalLog, peer_text, token_valid


class Refused(Exception):
    """A connection refused before the round engine heard of it (busy, no such cut)."""

    def __init__(self, code: str, reason: str, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(reason)
        self.code = code
        self.close_code = close_code


class Admission:
    """The server's door: what it knows of connections before and outside the round engine (the Hellos
    awaited, each connection's cut, the refusal log). Used on the event loop only."""

    def __init__(self, config: ServerConfig, manifest: Manifest, metrics: JsonlWriter) -> None:
        self.config = config
        self.manifest = manifest
        self.metrics = metrics
        self.awaiting_hello = 0  # connections open that have not said Hello yet
        self.refusal_log = RefusalLog()
        self.cuts: dict[int, int | None] = {}  # connection number -> the client's cut (mixed-cut exports)
        self.client_cuts: dict[str, int] = {}  # client id -> the cut it last joined at, for the metrics

    async def hello(
        self, connection: Connection, tokens: dict[str, str], bytes_received: dict[str, int]
    ) -> tuple[events.ClientHello, int | None]:
        """The connection's Hello, checked, as the engine's event; and the client's cut (None: the export's)."""
        hello = await self.await_hello(connection, bytes_received)
        check_hello(hello)
        connection.client_id, connection.token = hello.client_id, hello.token
        token_ok = token_valid(tokens, hello.client_id, hello.token)
        # A stranger hears of the bad token (from the engine), not of the exported cuts.
        cut, manifest_hash = self.client_cut(connection, hello) if token_ok else (None, hello.manifest_hash)
        numbers = (hello.num_samples, token_ok, manifest_hash, hello.protocol_version, time.monotonic())
        return events.ClientHello(connection.number, hello.client_id, *numbers), cut

    async def await_hello(self, connection: Connection, bytes_received: dict[str, int]) -> Hello:
        """The connection's first message, a Hello, within the Hello timeout; refused at once ("busy") when
        `max_pending_hellos` other connections are already waiting to say theirs."""
        if self.awaiting_hello >= self.config.max_pending_hellos:
            raise Refused(
                "busy",
                f"{self.awaiting_hello} connections are already waiting to say Hello; try again later",
                CLOSE_TRY_AGAIN_LATER,
            )
        self.awaiting_hello += 1
        try:
            hello = await asyncio.wait_for(connection.receive(bytes_received), self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(f"no Hello within {self.config.hello_timeout_s:g} s", CLOSE_POLICY) from None
        finally:
            self.awaiting_hello -= 1
        assert isinstance(hello, Hello)  # the Session allows nothing else first
        return hello

    def client_cut(self, connection: Connection, hello: Hello) -> tuple[int | None, str]:
        """The client's cut, checked against the exported cuts, and the manifest fingerprint the round engine
        is to compare: a mixed-cut export's client presents its own cut's, which stands for the export's."""
        try:
            cut = self.manifest.client_cut(hello.manifest_hash, hello.cut_layer)
        except ArtifactError as error:
            raise Refused("manifest_mismatch", str(error)) from None
        self.cuts[connection.number] = cut
        if cut is not None:
            self.client_cuts[hello.client_id] = cut
        known = self.manifest.cuts and cut is not None
        return cut, self.manifest.manifest_hash if known else hello.manifest_hash

    def for_cut(self, tensors: Arrays, cut: int | None) -> Arrays:
        """What a client at `cut` gets of the global adapters: the layers it holds, in a mixed-cut export."""
        return adapters_below(tensors, cut) if self.manifest.cuts and cut is not None else tensors

    def forget(self, connection: Connection) -> None:
        self.cuts.pop(connection.number, None)

    async def refuse(self, connection: Connection, what: str, code: str, reason: str, close_code: int) -> None:
        """Tell the peer why and close; printed and recorded escaped, cut short, and rate-limited per address."""
        reason = peer_text(reason)
        if self.refusal_logged(connection):
            print(f"[server] {connection.client_id}: {what}: {reason}", flush=True)
            self.metrics.write("refused", client_id=connection.client_id, code=code, reason=reason)
        await connection.refuse(code, reason, close_code)

    def refusal_logged(self, connection: Connection) -> bool:
        """Whether to print and record a refusal of this peer: a few dozen a minute per address at most."""
        address = str((getattr(connection.websocket, "remote_address", None) or ("?",))[0])
        logged, note = self.refusal_log.admit(address, time.monotonic())
        if note is not None:
            print(f"[server] {note}", flush=True)
        return logged
