"""The cloud server: one PyTorch tail shared by many edge clients over websockets, and FedAvg each round.

Per client connection (the protocol's states are in edgesplit/client/protocol.py):

    Hello ──> checks (token, manifest hash) ──> waits until --min-clients have joined ──> Welcome
    Activations ──> tail step on the worker thread ──> Gradients          (repeated, steps_per_round times)
    AdapterUpdate ──> waits for the round to close ──> RoundResult        (the new global adapters)

A round closes when every client taking part in it has sent its adapters (and at least --min-clients
have), or at its deadline with at least --min-clients updates. Then: FedAvg weighted by samples, the
evaluation, the checkpoint, and the next round.

Faults, and what the server does about them (docs/security.md has the threat model):
- A client that disconnects is dropped; the round closes without it when the others are done (quorum and
  deadline as above). A step queued for a client that is gone is skipped, not run.
- A client that reconnects under the same id (and token) replaces its old connection, which may not look
  dead yet (a cut link is silent until pings time out). Its Welcome says where it stands: the current
  round, `resume_step` (how many of this round's steps the server took from it) and `update_received`.
- Every step and every update is taken at most once per client and round: a replayed step is refused, a
  second update for a round is ignored, an update for a round already closed is dropped as stale.
- Anything a peer sends ends, at worst, its own connection with an Error and a close code.

The tail runs on one worker thread: the event loop stays free for pings and other clients, and the updates
to the shared tail are serialised by construction.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.head import Head
from edgesplit.client.metrics import JsonlWriter
from edgesplit.client.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    Activations,
    AdapterUpdate,
    Bye,
    Error,
    Gradients,
    Hello,
    Kind,
    Role,
    RoundResult,
    Session,
    SessionSettings,
    State,
    Welcome,
    Wire,
    encode,
    kind_may_come,
    max_frame_bytes,
)
from edgesplit.errors import ArtifactError, EdgesplitError, ProtocolError, TrainingError
from edgesplit.server.aggregate import fedavg
from edgesplit.server.checkpoint import Checkpoint, load_latest, remove_partial, save_checkpoint
from edgesplit.server.generate import eval_loss
from edgesplit.server.strategies import FRAMEWORKS, FedLlmStrategy, KdSettings, KdStrategy, encode_file
from edgesplit.server.tail import OptimizerSettings, Tail

CLOSE_POLICY = 1008  # websocket close code: policy violation (bad token, wrong artifacts, bad tensor)
CLOSE_TRY_AGAIN_LATER = 1013  # websocket close code: the server is busy (too many connections awaiting Hello)
# Until a client has shown a valid Hello, its frames may be no bigger than this: a stranger cannot make the
# server buffer an activation-sized frame. A Hello is a few hundred bytes.
HELLO_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class ServerConfig:
    artifacts: Path
    host: str = "127.0.0.1"
    port: int = 8765
    rounds: int = 10
    min_clients: int = 2
    steps_per_round: int = 20
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    wire: str = "fp32"
    eval_data: Path | None = None
    eval_batches: int = 8
    checkpoint_dir: Path | None = None
    metrics_out: Path | None = None
    tokens: dict[str, str] = field(default_factory=dict)  # client_id -> token; empty: no tokens needed
    tokens_file: Path | None = None  # where `tokens` came from: re-read on SIGHUP, to add or revoke clients
    round_deadline_s: float = 1800.0
    seed: int = 0
    threads: int = 0
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the server speaks wss://
    tls_key: Path | None = None
    hello_timeout_s: float = 30.0  # a connection that has not said Hello by then is closed
    # Connections that have not said Hello yet, at most; more are refused at once ("busy", close 1013) and
    # their clients retry. Bounds what strangers can hold open before the token check.
    max_pending_hellos: int = 64
    framework: str = "split"  # split | fedllm | kd (edgesplit/server/strategies.py)
    proxy_data: Path | None = None  # KD-FedLLM: the shared inputs the clients' logits are computed on
    kd_top_k: int = 16

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_clients < 1 or self.steps_per_round < 1:
            raise ValueError("--rounds, --min-clients and --steps-per-round must be at least 1")
        if not self.round_deadline_s > 0 or not self.hello_timeout_s > 0:
            raise ValueError("--round-deadline and the Hello timeout must be positive")
        if self.max_pending_hellos < 1:
            raise ValueError("--max-pending-hellos must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        Wire(self.wire)  # raises on an unknown wire format
        if self.framework not in FRAMEWORKS:
            raise ValueError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {self.framework!r}")


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


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise EdgesplitError(f"cannot load the TLS certificate {cert} and key {key}: {error}") from error
    return context


@dataclass(eq=False)
class Participant:
    """One admitted connection. A reconnecting client gets a new Participant; the old one is marked gone."""

    client_id: str
    num_samples: int
    joined_round: int
    websocket: Any
    token: str | None  # as presented, so that a revocation can find the sessions it ends
    gone: bool = False  # left, replaced by a newer connection of the same client, or revoked

    def alive(self) -> bool:
        # Read from the tail's worker thread too: a bool and an enum, no lock needed.
        return not self.gone and getattr(self.websocket.state, "name", "OPEN") == "OPEN"


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.manifest = load_manifest(config.artifacts)
        self.wire = Wire(config.wire)
        self.ssl_context = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.ssl_context = tls_context(config.tls_cert, config.tls_key)
        # Split training runs the tail here; FedLLM and KD-FedLLM hand the round's maths to a strategy.
        self.tail: Tail | None = None
        self.strategy: FedLlmStrategy | None = None
        if config.framework == "split":
            if self.manifest.full_model:
                raise ArtifactError(
                    f"{config.artifacts} is a --full-model export: serve it with --framework "
                    "fedllm or kd, or export a split head with --cut-layer"
                )
            self.tail = Tail(
                config.artifacts,
                OptimizerSettings(learning_rate=config.learning_rate, weight_decay=config.weight_decay),
                seed=config.seed,
                threads=config.threads,
            )
            self.head = Head(config.artifacts, verify=False)  # for evaluation: the server runs the head too
        elif config.framework == "fedllm":
            self.strategy = FedLlmStrategy(config.artifacts, config.eval_data, config.eval_batches)
            self.head = self.strategy.head
        else:
            self.strategy = KdStrategy(
                config.artifacts,
                config.eval_data,
                config.eval_batches,
                config.proxy_data,
                config.learning_rate,
                KdSettings(top_k=config.kd_top_k),
            )
            self.head = self.strategy.head
        self.global_adapters = self.head.initial_adapters() if self.strategy is None else self.strategy.global_adapters
        # What a RoundResult carries: the global adapters, or for KD the clients' averaged top-k logits.
        self.round_tensors: dict[str, np.ndarray] = self.global_adapters
        self.round = 0
        self.metrics = JsonlWriter(config.metrics_out)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")
        self.tokens = dict(config.tokens)
        self.participants: dict[str, Participant] = {}
        self.updates: dict[str, tuple[dict[str, np.ndarray], int, dict[str, float]]] = {}
        # client_id -> (round, steps of that round taken): what a reconnecting client resumes from.
        self.steps_taken: dict[str, tuple[int, int]] = {}
        # Held across a client's tail step, so that a reconnection's Welcome counts a step still running.
        self.step_locks: dict[str, asyncio.Lock] = {}
        self.round_closed: dict[int, asyncio.Event] = {}
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.failure: str | None = None  # why the server stopped early, if it did
        self.last_eval_loss: float | None = None
        self.bytes_received: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        self.round_started_at = time.monotonic()
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()  # tasks must be referenced or they may vanish
        self._awaiting_hello = 0  # connections open that have not said Hello yet
        self.eval_set = self._load_eval(config.eval_data) if self.strategy is None else self.strategy.eval_set
        self._resume()

    # ------------------------------------------------------------------------------------------ setup

    def _load_eval(self, path: Path | None) -> Any:
        return None if path is None else encode_file(self.head, path)

    def _resume(self) -> None:
        if self.config.checkpoint_dir is None:
            return
        removed = remove_partial(self.config.checkpoint_dir)
        if removed:
            print(f"[server] removed {len(removed)} unfinished checkpoint write(s): {', '.join(removed)}", flush=True)
        checkpoint = load_latest(self.config.checkpoint_dir)
        if checkpoint is None:
            return
        self.round = checkpoint.round
        for name, value in checkpoint.global_adapters.items():  # in place: a KD strategy trains these arrays
            self.global_adapters[name][...] = value
        if self.tail is not None:
            self.tail.load_state_dict({"lora": checkpoint.tail_lora, "optimizer": checkpoint.tail_optimizer})
        self.last_eval_loss = checkpoint.extra.get("eval_loss")
        folder = checkpoint.path
        print(
            f"[server] resumed from checkpoint {folder}: {self.round} of {self.config.rounds} rounds done, "
            f"continuing with round {self.round + 1}",
            flush=True,
        )
        self.metrics.write("resume", round=self.round, checkpoint=str(folder))
        if self.round >= self.config.rounds:
            self.finished.set()

    @property
    def settings(self) -> dict[str, object]:
        return {
            "steps_per_round": self.config.steps_per_round,
            "learning_rate": self.config.learning_rate,
            "weight_decay": self.config.weight_decay,
            "wire": self.wire.value,
            "batch_size": self.manifest.batch_size,
            "max_seq_len": self.manifest.max_seq_len,
            "frozen_head": self.manifest.frozen_head,
            "seed": self.config.seed,
            "framework": self.config.framework,
            **(self.strategy.settings() if self.strategy is not None else {}),
        }

    def max_frame_bytes(self) -> int:
        return max_frame_bytes(self.manifest)

    # ------------------------------------------------------------------------------------------ serving

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        from websockets.asyncio.server import serve

        async with serve(
            self.handle,
            self.config.host,
            self.config.port,
            max_size=self.max_frame_bytes(),
            compression=None,  # tensors do not deflate; compressing them costs CPU for nothing
            ping_interval=20,
            ping_timeout=120,  # a Raspberry Pi may be busy for seconds in a step; pings are answered anyway
            ssl=self.ssl_context,
        ) as websocket_server:
            port = websocket_server.sockets[0].getsockname()[1]
            if self.config.tokens_file is not None:
                _on_sighup(self.reload_tokens)
            scheme = "wss" if self.ssl_context else "ws"
            config = self.config
            print(
                f"[server] listening on {scheme}://{config.host}:{port} for {config.rounds} rounds, "
                f"at least {config.min_clients} clients, {config.steps_per_round} steps a round",
                flush=True,
            )
            loopback = config.host in ("127.0.0.1", "localhost", "::1")
            if not loopback and not (self.ssl_context and self.tokens):
                print(
                    "[server] warning: reachable from other machines without TLS and tokens: anyone who "
                    "can reach this port can join, and the link is readable (see docs/security.md)",
                    flush=True,
                )
            self.port = port
            if self.eval_set is not None and self.round == 0:  # the untrained model's score, for comparison
                before = await asyncio.get_running_loop().run_in_executor(self.executor, self.evaluate)
                self.metrics.write("eval", round=0, when="before_training", eval_loss=before)
                print(f"[server] eval loss before training: {before:.4f}", flush=True)
            if ready is not None:
                ready.set()
            deadline_task = asyncio.create_task(self._deadlines())
            await self.finished.wait()
            await asyncio.sleep(0.5)  # let the last RoundResults go out before the sockets close
            # Whoever is still mid-round (a straggler) is told that training is over, rather than seeing
            # the socket close and retrying against a server that is gone.
            code, close_code = ("failed", 1011) if self.failure else ("finished", 1000)
            reason = self.failure or f"training finished after {self.round} rounds"
            await asyncio.gather(
                *(self._refuse(p.websocket, None, code, reason, close_code) for p in list(self.participants.values()))
            )
            deadline_task.cancel()
        self.executor.shutdown(wait=True)
        self.metrics.write(
            "finished",
            round=self.round,
            eval_loss=self.last_eval_loss,
            failure=self.failure,
            bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
        )
        self.metrics.close()
        if self.failure is not None:
            raise EdgesplitError(self.failure)

    async def handle(self, websocket: Any) -> None:
        # Nothing a peer sends may escape this function: the server carries on serving the others.
        _set_frame_limit(websocket, HELLO_MAX_BYTES)
        session = Session(Role.SERVER, max_size=self.max_frame_bytes())
        client_id = "?"
        participant: Participant | None = None
        try:
            hello = await self._await_hello(websocket, session)
            client_id = hello.client_id
            participant = self._admit(hello, websocket)
            await self._start_barrier()
            async with self._step_lock(client_id):  # a step of the old connection may still be running
                resume_step = self._resume_step(client_id)
            # Where this client stands, for a reconnection (edgesplit/client/client.py: Client._resume).
            settings = SessionSettings.from_mapping(
                {**self.settings, "resume_step": resume_step, "update_received": client_id in self.updates}
            )
            _set_frame_limit(websocket, self.max_frame_bytes())
            welcome_tensors = self.global_adapters if self.strategy is None else self.strategy.welcome_tensors()
            await self._send(websocket, session, Welcome(self.round, self.config.rounds, settings, welcome_tensors))
            while True:
                message = await self._receive(websocket, session)
                if isinstance(message, Activations):
                    gradients = await self._train_step(participant, message)
                    if gradients is None:
                        return  # the client left or reconnected while its step waited
                    await self._send(websocket, session, gradients)
                elif isinstance(message, AdapterUpdate):
                    result = await self._adapter_update(participant, message)
                    await self._send(websocket, session, result)
                    if result.done:
                        return
                elif isinstance(message, Bye):
                    return
        except _Refused as refusal:
            print(f"[server] {client_id}: refused: {refusal}", flush=True)
            self.metrics.write("refused", client_id=client_id, code=refusal.code, reason=str(refusal))
            await self._refuse(websocket, session, refusal.code, str(refusal), refusal.close_code)
        except ProtocolError as error:
            print(f"[server] {client_id}: protocol error: {error}", flush=True)
            self.metrics.write("refused", client_id=client_id, code="protocol", reason=str(error))
            await self._refuse(websocket, session, "protocol", str(error), error.close_code)
        except TrainingError as error:
            print(f"[server] {client_id}: rejected: {error}", flush=True)
            self.metrics.write("refused", client_id=client_id, code="bad_tensor", reason=str(error))
            await self._refuse(websocket, session, "bad_tensor", str(error), CLOSE_POLICY)
        except Exception as error:  # the connection's end: the server itself carries on
            if type(error).__name__.startswith("ConnectionClosed"):
                print(f"[server] {client_id}: connection closed", flush=True)
            else:
                print(f"[server] {client_id}: {type(error).__name__}: {error}", flush=True)
        finally:
            if participant is not None:
                self._leave(participant)

    async def _await_hello(self, websocket: Any, session: Session) -> Hello:
        """The connection's first message, a Hello, within the Hello timeout; refused at once ("busy") when
        `max_pending_hellos` other connections are already waiting to say theirs."""
        if self._awaiting_hello >= self.config.max_pending_hellos:
            raise _Refused(
                "busy",
                f"{self._awaiting_hello} connections are already waiting to say Hello; try again later",
                CLOSE_TRY_AGAIN_LATER,
            )
        self._awaiting_hello += 1
        try:
            hello = await asyncio.wait_for(self._receive(websocket, session), self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(f"no Hello within {self.config.hello_timeout_s:g} s", CLOSE_POLICY) from None
        finally:
            self._awaiting_hello -= 1
        assert isinstance(hello, Hello)  # the Session allows nothing else first
        return hello

    async def _receive(self, websocket: Any, session: Session) -> Any:
        frame = await websocket.recv()
        if isinstance(frame, str):
            raise ProtocolError("text frames are not part of the protocol; send binary frames", 1003)
        _check_kind_allowed(frame, session.state)
        message = session.receive(frame)
        kind = message.kind.name
        self.bytes_received[kind] = self.bytes_received.get(kind, 0) + len(frame)
        return message

    async def _send(self, websocket: Any, session: Session, message: Any) -> int:
        frame = session.send(message, self.wire)
        await websocket.send(frame)
        kind = message.kind.name
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + len(frame)
        return len(frame)

    async def _refuse(self, websocket: Any, session: Session | None, code: str, reason: str, close_code: int) -> None:
        """Tell the peer why, then close with `close_code`. `session` None: a connection another task owns,
        whose Session must not change under it."""
        try:
            if session is not None and session.state is not State.CLOSED:
                frame = session.send(Error(code, reason))
            else:
                frame = encode(Error(code, reason))
            await websocket.send(frame)
            await websocket.close(close_code, reason[:120])
        except Exception:  # the peer may be gone already; nothing more to tell it
            pass

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------------------------------ admission

    def _admit(self, hello: Hello, websocket: Any) -> Participant:
        """Check who this is before anything else it sends is read; then it is the client's one connection."""
        if not self._token_valid(hello.client_id, hello.token):
            raise _Refused("bad_token", f"client {hello.client_id!r}: unknown client or wrong token")
        if hello.manifest_hash != self.manifest.manifest_hash:
            raise _Refused(
                "manifest_mismatch",
                f"the client runs artifacts {hello.manifest_hash}, the server {self.manifest.manifest_hash}: "
                "copy the server's artifact directory to the client",
            )
        if hello.protocol_version != PROTOCOL_VERSION:
            raise _Refused("protocol_version", f"protocol {hello.protocol_version}, server {PROTOCOL_VERSION}")
        if self.finished.is_set():
            raise _Refused("finished", self.failure or f"training finished after {self.round} rounds")
        participant = Participant(hello.client_id, hello.num_samples, self.round, websocket, hello.token)
        old = self.participants.get(hello.client_id)
        if old is not None:
            # The same client (it passed the token check) is back: its old connection is dead or dying,
            # even if TCP has not said so yet. The newest wins; the old one is told why and closed.
            old.gone = True
            reason = "this client connected again; this older connection is closed"
            self._spawn(self._refuse(old.websocket, None, "replaced", reason, CLOSE_POLICY))
            print(f"[server] {hello.client_id} reconnected; its new connection replaces the old one", flush=True)
            self.metrics.write("replace", client_id=hello.client_id, round=self.round)
        self.participants[hello.client_id] = participant
        print(
            f"[server] {hello.client_id} joined at round {self.round + 1} ({hello.num_samples} samples); "
            f"{len(self.participants)} connected",
            flush=True,
        )
        self.metrics.write("join", client_id=hello.client_id, round=self.round, num_samples=hello.num_samples)
        return participant

    def _token_valid(self, client_id: str, token: str | None) -> bool:
        if not self.tokens:
            return True  # no tokens configured: anyone who can reach the port may join
        expected = self.tokens.get(client_id, "")
        # Constant time, and the same path for an unknown id as for a wrong token.
        return hmac.compare_digest((token or "").encode(), expected.encode()) and bool(expected)

    def reload_tokens(self) -> None:
        """Re-read --tokens-file (on SIGHUP): new clients may join, and a client whose token is gone or
        changed is disconnected at once and refused from then on."""
        path = self.config.tokens_file
        if path is None:
            return
        try:
            tokens = read_tokens(path)
        except (OSError, EdgesplitError) as error:
            print(f"[server] tokens not reloaded, the old ones stay: {error}", flush=True)
            return
        if self.tokens and not tokens:
            # An empty file would mean "no tokens needed": never open the door by accident.
            print(f"[server] tokens not reloaded: {path} holds none; the old ones stay", flush=True)
            return
        self.tokens = tokens
        print(f"[server] reloaded {len(tokens)} tokens from {path}", flush=True)
        for participant in list(self.participants.values()):
            if not self._token_valid(participant.client_id, participant.token):
                participant.gone = True
                del self.participants[participant.client_id]
                # Its update for the open round goes too: a revoked client may be a compromised one.
                dropped = self.updates.pop(participant.client_id, None) is not None and not self._closing
                print(
                    f"[server] {participant.client_id}: token revoked; disconnected"
                    f"{', its update for this round dropped' if dropped else ''}",
                    flush=True,
                )
                self.metrics.write("revoked", client_id=participant.client_id, round=self.round)
                self._spawn(
                    self._refuse(
                        participant.websocket, None, "revoked", "this client's token was revoked", CLOSE_POLICY
                    )
                )
        self._maybe_close_round()

    async def _start_barrier(self) -> None:
        if len(self.participants) >= self.config.min_clients:
            if not self.started.is_set():
                self.round_started_at = time.monotonic()
            self.started.set()
        await self.started.wait()

    def _leave(self, participant: Participant) -> None:
        participant.gone = True
        if self.participants.get(participant.client_id) is participant:
            del self.participants[participant.client_id]
            print(f"[server] {participant.client_id} left; {len(self.participants)} connected", flush=True)
            self.metrics.write("leave", client_id=participant.client_id, round=self.round)
            self._maybe_close_round()

    def _step_lock(self, client_id: str) -> asyncio.Lock:
        return self.step_locks.setdefault(client_id, asyncio.Lock())

    def _resume_step(self, client_id: str) -> int:
        taken_round, taken = self.steps_taken.get(client_id, (-1, 0))
        return taken if taken_round == self.round else 0

    # ------------------------------------------------------------------------------------------ training

    def _check_activations(self, message: Activations) -> None:
        activations = message.tensors["activations"]
        if tuple(activations.shape) != self.manifest.activations_shape:
            expected = self.manifest.activations_shape
            raise TrainingError(f"activations of shape {activations.shape}, the artifacts say {expected}")
        if not np.all(np.isfinite(activations)):
            raise TrainingError("activations contain NaN or Inf")
        mask = message.tensors["attention_mask"]
        if np.any((mask != 0) & (mask != 1)):
            raise TrainingError("attention_mask holds values other than 0 and 1")
        labels = message.tensors["labels"]
        if np.any((labels != -100) & ((labels < 0) | (labels >= self.manifest.vocab_size))):
            raise TrainingError(f"labels outside the vocabulary [0, {self.manifest.vocab_size})")

    def _check_step_order(self, client_id: str, message: Activations) -> None:
        """Each (round, step) once per client, in order: a replay would train the tail twice on one batch."""
        if message.round > self.round:
            raise ProtocolError(
                f"Activations for round {message.round + 1}, which has not started "
                f"(the server is at round {self.round + 1})"
            )
        if message.step >= self.config.steps_per_round:
            raise ProtocolError(f"step {message.step} of a round of {self.config.steps_per_round} steps")
        taken_round, taken = self.steps_taken.get(client_id, (-1, 0))
        if (message.round, message.step) < (taken_round, taken):
            raise ProtocolError(
                f"round {message.round + 1} step {message.step + 1} again: the server has "
                f"taken this client's steps up to round {taken_round + 1} step {taken}"
            )

    async def _train_step(self, participant: Participant, message: Activations) -> Gradients | None:
        client_id = participant.client_id
        if self.tail is None:
            raise ProtocolError(
                f"this server runs {self.config.framework}: clients train on the device and send no activations",
                CLOSE_POLICY,
            )
        self._check_activations(message)
        self._check_step_order(client_id, message)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        async with self._step_lock(client_id):
            outcome = await loop.run_in_executor(
                self.executor,
                self._tail_step_if_alive,
                participant,
                message.tensors["activations"],
                message.tensors["attention_mask"],
                message.tensors["labels"],
            )
            if outcome is None:
                print(
                    f"[server] {client_id}: dropped its queued step (round {message.round + 1} step "
                    f"{message.step + 1}): the client is gone",
                    flush=True,
                )
                self.metrics.write("step_dropped", client_id=client_id, round=message.round, step=message.step)
                return None
            # Taken: the tail has learnt from it, so a reconnecting client must not send it again.
            self.steps_taken[client_id] = (message.round, message.step + 1)
        loss, grads = outcome
        seconds = time.perf_counter() - started
        self.metrics.write(
            "step",
            client_id=client_id,
            round=message.round,
            step=message.step,
            loss=loss,
            server_seconds=round(seconds, 6),
        )
        tensors = {} if grads is None else {"activation_grads": grads}
        return Gradients(message.round, message.step, loss, seconds, tensors)

    def _tail_step_if_alive(
        self, participant: Participant, activations: np.ndarray, mask: np.ndarray, labels: np.ndarray
    ) -> tuple[float, np.ndarray | None] | None:
        """On the worker thread. A client that died while its step waited in the queue gets no step."""
        if not participant.alive():
            return None
        return self.tail.train_step(activations, mask, labels, not self.manifest.frozen_head)

    def _check_update(self, message: AdapterUpdate) -> None:
        if self.strategy is not None:
            self.strategy.check_update(message.tensors)
            return
        names, expected = set(message.tensors), set(self.manifest.lora.matrices)
        if names != expected:
            raise TrainingError(
                f"AdapterUpdate carries {sorted(names)[:8]}, the head's adapters are {sorted(expected)[:8]}"
            )
        self.head.check_adapters(message.tensors)  # shapes, finite

    async def _adapter_update(self, participant: Participant, message: AdapterUpdate) -> RoundResult:
        client_id, round_index = participant.client_id, self.round
        if message.round > round_index:
            raise ProtocolError(
                f"AdapterUpdate for round {message.round + 1}, which has not started "
                f"(the server is at round {round_index + 1})"
            )
        self._check_update(message)
        if participant.gone:
            pass  # a connection that has been replaced: the client's newer connection speaks for it
        elif message.round < round_index or self._closing:
            # The round closed (or is closing) without it: a straggler, or a client that was away. It
            # catches up with the global adapters in the result.
            print(
                f"[server] {client_id}: stale update for round {message.round + 1} dropped; the server is "
                f"at round {round_index + 1}{' (closing)' if self._closing else ''}",
                flush=True,
            )
            self.metrics.write("stale_update", client_id=client_id, round=message.round, server_round=round_index)
            if message.round == round_index:
                await self._round_event(round_index).wait()
        elif client_id in self.updates:
            # Once per client per round: the first update stands (a reconnected client resends its own).
            print(f"[server] {client_id}: second update for round {round_index + 1} ignored", flush=True)
            self.metrics.write("duplicate_update", client_id=client_id, round=round_index)
            await self._round_event(round_index).wait()
        else:
            self.updates[client_id] = (message.tensors, message.num_samples, message.metrics)
            self.metrics.write(
                "update",
                client_id=client_id,
                round=round_index,
                num_samples=message.num_samples,
                **{f"client_{k}": v for k, v in message.metrics.items()},
            )
            self._maybe_close_round()
            await self._round_event(round_index).wait()
        done = self.round >= self.config.rounds
        return RoundResult(message.round, self.round, done, self.last_eval_loss, self.round_tensors)

    def _round_event(self, round_index: int) -> asyncio.Event:
        return self.round_closed.setdefault(round_index, asyncio.Event())

    def _maybe_close_round(self, deadline_passed: bool = False) -> None:
        if self.finished.is_set() or not self.updates or self._closing:
            return
        waiting_for = [c for c in self.participants if c not in self.updates]
        enough = len(self.updates) >= self.config.min_clients
        if enough and (not waiting_for or deadline_passed):
            self._closing = True  # here, not in the task: a second call before it runs must not spawn another
            self._spawn(self._close_round())

    async def _close_round(self) -> None:
        round_index = self.round
        try:
            await self._aggregate_and_checkpoint(round_index)
        except Exception as error:
            # A round that cannot be aggregated or saved must stop the run loudly, not hang it silently.
            self.failure = f"round {round_index + 1} could not close: {type(error).__name__}: {error}"
            print(f"[server] {self.failure}\n{traceback.format_exc()}", flush=True)
            self.finished.set()
            return
        finally:
            self._closing = False
        self._round_event(round_index).set()
        if self.round >= self.config.rounds:
            self.finished.set()

    async def _aggregate_and_checkpoint(self, round_index: int) -> None:
        updates = dict(self.updates)
        accepted = [(tensors, samples) for tensors, samples, _ in updates.values()]
        loop = asyncio.get_running_loop()
        eval_loss = self.last_eval_loss
        if self.strategy is None:
            global_adapters = round_tensors = fedavg(accepted)
            if self.eval_set is not None:
                eval_loss = await loop.run_in_executor(self.executor, self.evaluate_with, global_adapters)
        else:
            round_tensors = await loop.run_in_executor(self.executor, self.strategy.aggregate, accepted)
            global_adapters = self.strategy.global_adapters
            if self.eval_set is not None:
                eval_loss = await loop.run_in_executor(self.executor, self.strategy.evaluate)
        summary = {
            "round": round_index,
            "clients": sorted(updates),
            "num_samples": {c: n for c, (_, n, _) in updates.items()},
            "eval_loss": eval_loss,
            "seconds": round(time.monotonic() - self.round_started_at, 3),
            "bytes_received": dict(self.bytes_received),
            "bytes_sent": dict(self.bytes_sent),
            "client_metrics": {c: m for c, (_, _, m) in updates.items()},
        }
        if self.config.checkpoint_dir is not None:
            # Saved before any client hears of the round: a result a client has seen survives a restart.
            tail_state: dict[str, Any] = {"lora": {}, "optimizer": {"state": {}, "param_groups": []}}
            if self.tail is not None:
                tail_state = await loop.run_in_executor(self.executor, self.tail.state_dict)
            checkpoint = Checkpoint(
                round_index + 1,
                global_adapters,
                tail_state["lora"],
                tail_state["optimizer"],
                {"eval_loss": eval_loss, "num_samples": summary["num_samples"]},
                updates={client: tensors for client, (tensors, _, _) in updates.items()},
            )
            await loop.run_in_executor(self.executor, save_checkpoint, self.config.checkpoint_dir, checkpoint)
        # Only now does the round count as closed. Updates that came in meanwhile were refused as stale
        # (self._closing), so the reset below loses none.
        self.updates = {}
        self.global_adapters = global_adapters
        self.round_tensors = round_tensors
        self.last_eval_loss = eval_loss
        self.round = round_index + 1
        self.metrics.write("round", **summary)
        eval_text = "" if eval_loss is None else f", eval loss {eval_loss:.4f}"
        print(
            f"[server] round {round_index + 1}/{self.config.rounds} closed with {len(updates)} clients "
            f"({', '.join(sorted(updates))}){eval_text}",
            flush=True,
        )
        self.round_started_at = time.monotonic()

    async def _deadlines(self) -> None:
        while not self.finished.is_set():
            await asyncio.sleep(0.5)
            overdue = time.monotonic() - self.round_started_at > self.config.round_deadline_s
            if self.started.is_set() and overdue:
                self._maybe_close_round(deadline_passed=True)

    def evaluate(self) -> float:
        if self.strategy is not None:
            return self.strategy.evaluate() or 0.0
        return self.evaluate_with(self.global_adapters)

    def evaluate_with(self, adapters: dict[str, np.ndarray]) -> float:
        """Mean loss over the eval set (up to eval_batches batches) with these client adapters."""
        assert self.tail is not None and self.eval_set is not None
        return eval_loss(self.head, self.tail, self.eval_set, adapters, self.config.eval_batches)


class _Refused(Exception):
    def __init__(self, code: str, reason: str, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(reason)
        self.code = code
        self.close_code = close_code


def _check_kind_allowed(frame: bytes, state: State) -> None:
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


def _set_frame_limit(websocket: Any, limit: int) -> None:
    """The largest frame websockets will take from this peer from now on. websockets >= 15 reads the limit
    for every frame from its protocol object; older versions keep the limit given to serve()."""
    protocol = getattr(websocket, "protocol", None)
    if protocol is not None and hasattr(protocol, "max_message_size"):
        protocol.max_message_size = limit


def _on_sighup(callback: Any) -> None:
    import signal

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        print("[server] SIGHUP cannot reload tokens here; restart the server to change them", flush=True)


def run_server(config: ServerConfig) -> Server:
    server = Server(config)
    asyncio.run(server.serve())
    return server
