"""The cloud server: an asyncio shell over the round engine (rounds.py), a strategy and a tail worker.

Per client connection (the protocol's states are in edgesplit/client/protocol.py):

    Hello ──> checks (token, manifest hash) ──> waits until --min-clients have joined ──> Welcome
    Activations ──> a step on the tail worker ──> Gradients               (repeated, steps_per_round times)
    AdapterUpdate ──> waits for the round to close ──> RoundResult        (the new global model)

What the server decides (admission, barrier, step order, quorum, deadlines, stale and duplicate updates,
reconnection, revocation, the close order) is decided by the round engine, which takes events and returns
actions. What the framework decides (the tail step, what an update holds, aggregation, evaluation) is the
strategy's (strategies/). What runs the heavy work off the event loop is the tail worker (workers.py). This
module keeps the transport: websockets, TLS, the Hello timeout, the cap on connections awaiting Hello, frame
limits, SIGHUP, and the bytes counted each way. Each connection's task is the only one that sends on its
Session; the engine's actions for a connection reach that task through its queue.

Faults, and what the server does about them, are in rounds.py and docs/security.md. Anything a peer sends
ends, at worst, its own connection with an Error and a close code.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.metrics import JsonlWriter
from edgesplit.client.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    TRANSITIONS,
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
    State,
    Welcome,
    Wire,
    encode,
    max_frame_bytes,
)
from edgesplit.errors import EdgesplitError, ProtocolError, TrainingError
from edgesplit.server.checkpoint import Checkpoint, load_latest, remove_partial, save_checkpoint
from edgesplit.server.round_events import (
    Action,
    Aggregate,
    Aggregated,
    ClientHello,
    ClientLeft,
    DeadlineTick,
    Disconnect,
    DropStep,
    Event,
    Finish,
    Log,
    Metric,
    Refuse,
    RoundClosed,
    RoundFailed,
    RoundRules,
    RoundSaved,
    RunStep,
    SaveCheckpoint,
    SendGradients,
    SendRoundResult,
    SendWelcome,
    StepArrived,
    StepDone,
    TokensRevoked,
    Update,
    UpdateArrived,
)
from edgesplit.server.rounds import RoundEngine
from edgesplit.server.strategies import (
    FRAMEWORKS,
    Arrays,
    StepOutcome,
    Strategy,
    StrategyOptions,
    build_strategy,
    load_global_adapters,
)
from edgesplit.server.workers import StepJob, ThreadTailWorker, WorkResult

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
class Connection:
    """One websocket conversation. A reconnecting client gets a new Connection (and a new number)."""

    number: int
    websocket: Any
    session: Session
    client_id: str = "?"
    token: str | None = None  # as presented, so that a revocation can find the sessions it ends
    # The engine's actions for this connection, in order; None: stop (closed from outside, or the run ended).
    actions: asyncio.Queue[Action | None] = field(default_factory=asyncio.Queue)

    def open(self) -> bool:
        # Read from the tail's worker thread too: an enum's name, no lock needed.
        return getattr(self.websocket.state, "name", "OPEN") == "OPEN"


class _Refused(Exception):
    def __init__(self, code: str, reason: str, close_code: int = CLOSE_POLICY) -> None:
        super().__init__(reason)
        self.code = code
        self.close_code = close_code


class _Stop(Exception):
    """The engine has nothing more for this connection: end its conversation quietly."""


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.manifest = load_manifest(config.artifacts)
        self.wire = Wire(config.wire)
        self.ssl_context = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.ssl_context = tls_context(config.tls_cert, config.tls_key)
        options = StrategyOptions(
            artifacts=config.artifacts,
            eval_data=config.eval_data,
            eval_batches=config.eval_batches,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            seed=config.seed,
            threads=config.threads,
            proxy_data=config.proxy_data,
            kd_top_k=config.kd_top_k,
        )
        self.strategy: Strategy = build_strategy(config.framework, options)
        self.head = self.strategy.head
        self.metrics = JsonlWriter(config.metrics_out)
        self.worker = ThreadTailWorker(self.strategy.train_step)
        self.tokens = dict(config.tokens)
        self.connections: dict[int, Connection] = {}
        self.finished = asyncio.Event()  # set when the run is over (tests set it to stop a server)
        self.bytes_received: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        self._background: set[asyncio.Task[Any]] = set()  # tasks must be referenced or they may vanish
        self._awaiting_hello = 0  # connections open that have not said Hello yet
        self._numbers = 0
        round_index, last_eval_loss = self._resume()
        rules = RoundRules(
            total_rounds=config.rounds,
            min_clients=config.min_clients,
            steps_per_round=config.steps_per_round,
            round_deadline_s=config.round_deadline_s,
            manifest_hash=self.manifest.manifest_hash,
            protocol_version=PROTOCOL_VERSION,
            checkpointing=config.checkpoint_dir is not None,
        )
        self.engine = RoundEngine(rules, round_index, last_eval_loss)
        # What a Welcome and a RoundResult carry, as of the last closed round (a KD RoundResult: the
        # averaged top-k logits; the others: the global adapters). Replaced when a round counts as closed.
        self.welcome_tensors: Arrays = self.strategy.welcome_tensors()
        self.round_tensors: Arrays = self.strategy.global_adapters
        self._aggregated: Arrays = {}
        if self.engine.finished:
            self.finished.set()

    # ------------------------------------------------------------------------------------------ state

    @property
    def round(self) -> int:
        return self.engine.state.round

    @property
    def last_eval_loss(self) -> float | None:
        return self.engine.state.last_eval_loss

    @property
    def failure(self) -> str | None:
        return self.engine.state.failure

    @property
    def global_adapters(self) -> Arrays:
        return self.strategy.global_adapters

    @property
    def tail(self) -> Any:
        """The split strategy's PyTorch tail; None for the frameworks that train on the device only."""
        return getattr(self.strategy, "tail", None)

    def _resume(self) -> tuple[int, float | None]:
        if self.config.checkpoint_dir is None:
            return 0, None
        removed = remove_partial(self.config.checkpoint_dir)
        if removed:
            print(f"[server] removed {len(removed)} unfinished checkpoint write(s): {', '.join(removed)}", flush=True)
        checkpoint = load_latest(self.config.checkpoint_dir)
        if checkpoint is None:
            return 0, None
        load_global_adapters(self.strategy.global_adapters, checkpoint.global_adapters)
        self.strategy.load_tail_state({"lora": checkpoint.tail_lora, "optimizer": checkpoint.tail_optimizer})
        print(
            f"[server] resumed from checkpoint {checkpoint.path}: {checkpoint.round} of {self.config.rounds} "
            f"rounds done, continuing with round {checkpoint.round + 1}",
            flush=True,
        )
        self.metrics.write("resume", round=checkpoint.round, checkpoint=str(checkpoint.path))
        return checkpoint.round, checkpoint.extra.get("eval_loss")

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
            **self.strategy.settings(),
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
            if self.strategy.eval_set is not None and self.round == 0:  # the untrained model's score
                before = (await self.worker.submit(self.strategy.evaluate)).unwrap() or 0.0
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
            members = [self.connections[n] for n in self.engine.members() if n in self.connections]
            await asyncio.gather(*(self._close_from_outside(c, code, reason, close_code) for c in members))
            for connection in list(self.connections.values()):
                connection.actions.put_nowait(None)
            deadline_task.cancel()
        self.worker.close()
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
        self._numbers += 1
        connection = Connection(self._numbers, websocket, Session(Role.SERVER, max_size=self.max_frame_bytes()))
        self.connections[connection.number] = connection
        try:
            hello = await self._await_hello(connection)
            connection.client_id, connection.token = hello.client_id, hello.token
            token_ok = self._token_valid(hello.client_id, hello.token)
            event = ClientHello(
                connection.number,
                hello.client_id,
                hello.num_samples,
                token_ok,
                hello.manifest_hash,
                hello.protocol_version,
                time.monotonic(),
            )
            welcome = await self._ask(connection, event, SendWelcome)
            # Where this client stands, for a reconnection (edgesplit/client/client.py: Client._resume).
            settings = {
                **self.settings,
                "resume_step": welcome.resume_step,
                "update_received": welcome.update_received,
            }
            _set_frame_limit(websocket, self.max_frame_bytes())
            await self._send(connection, Welcome(welcome.round, self.config.rounds, settings, self.welcome_tensors))
            while True:
                message = await self._receive(connection)
                if isinstance(message, Activations):
                    gradients = await self._train_step(connection, message)
                    if gradients is None:
                        return  # the client left or reconnected while its step waited
                    await self._send(connection, gradients)
                elif isinstance(message, AdapterUpdate):
                    result = await self._adapter_update(connection, message)
                    await self._send(connection, result)
                    if result.done:
                        return
                elif isinstance(message, Bye):
                    return
        except _Stop:
            pass
        except _Refused as refusal:  # refused before the engine heard of it (busy)
            print(f"[server] {connection.client_id}: refused: {refusal}", flush=True)
            self.metrics.write("refused", client_id=connection.client_id, code=refusal.code, reason=str(refusal))
            await self._refuse(connection, refusal.code, str(refusal), refusal.close_code)
        except ProtocolError as error:
            print(f"[server] {connection.client_id}: protocol error: {error}", flush=True)
            self.metrics.write("refused", client_id=connection.client_id, code="protocol", reason=str(error))
            await self._refuse(connection, "protocol", str(error), error.close_code)
        except TrainingError as error:
            print(f"[server] {connection.client_id}: rejected: {error}", flush=True)
            self.metrics.write("refused", client_id=connection.client_id, code="bad_tensor", reason=str(error))
            await self._refuse(connection, "bad_tensor", str(error), CLOSE_POLICY)
        except Exception as error:  # the connection's end: the server itself carries on
            if type(error).__name__.startswith("ConnectionClosed"):
                print(f"[server] {connection.client_id}: connection closed", flush=True)
            else:
                print(f"[server] {connection.client_id}: {type(error).__name__}: {error}", flush=True)
        finally:
            del self.connections[connection.number]
            self._dispatch(ClientLeft(connection.number))

    async def _ask(self, connection: Connection, event: Event, expected: type[Any]) -> Any:
        """Tell the engine, then wait for its answer to this connection: `expected`, or a refusal."""
        self._dispatch(event)
        action = await connection.actions.get()
        if isinstance(action, Refuse):
            await self._refuse(connection, action.code, action.reason, action.close_code)
            raise _Stop
        if action is None or not isinstance(action, expected):
            raise _Stop  # DropStep, or closed from outside: nothing more to say on this connection
        return action

    async def _await_hello(self, connection: Connection) -> Hello:
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
            hello = await asyncio.wait_for(self._receive(connection), self.config.hello_timeout_s)
        except asyncio.TimeoutError:
            raise ProtocolError(f"no Hello within {self.config.hello_timeout_s:g} s", CLOSE_POLICY) from None
        finally:
            self._awaiting_hello -= 1
        assert isinstance(hello, Hello)  # the Session allows nothing else first
        return hello

    async def _receive(self, connection: Connection) -> Any:
        frame = await connection.websocket.recv()
        if isinstance(frame, str):
            raise ProtocolError("text frames are not part of the protocol; send binary frames", 1003)
        _check_kind_allowed(frame, connection.session.state)
        message = connection.session.receive(frame)
        kind = message.kind.name
        self.bytes_received[kind] = self.bytes_received.get(kind, 0) + len(frame)
        return message

    async def _send(self, connection: Connection, message: Any) -> None:
        frame = connection.session.send(message, self.wire)
        await connection.websocket.send(frame)
        kind = message.kind.name
        self.bytes_sent[kind] = self.bytes_sent.get(kind, 0) + len(frame)

    async def _refuse(self, connection: Connection, code: str, reason: str, close_code: int) -> None:
        """Tell the peer why, on its own conversation, then close with `close_code`."""
        session = connection.session
        frame = session.send(Error(code, reason)) if session.state is not State.CLOSED else encode(Error(code, reason))
        await _send_and_close(connection.websocket, frame, reason, close_code)

    async def _close_from_outside(self, connection: Connection, code: str, reason: str, close_code: int) -> None:
        """Close a connection another task owns: its Session must not change under it."""
        connection.actions.put_nowait(None)
        await _send_and_close(connection.websocket, encode(Error(code, reason)), reason, close_code)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------------------------------ the engine's actions

    def _dispatch(self, event: Event) -> None:
        """Feed one event to the engine and carry out what it says, in order. Sending to a connection is
        left to that connection's own task (through its queue), the one owner of its Session."""
        for action in self.engine.handle(event):
            if isinstance(action, Log):
                print(f"[server] {action.text}", flush=True)
            elif isinstance(action, Metric):
                self.metrics.write(action.kind, **action.fields)
            elif isinstance(action, Refuse | SendWelcome | RunStep | SendGradients | DropStep | SendRoundResult):
                connection = self.connections.get(action.connection)
                if connection is not None:
                    connection.actions.put_nowait(action)
            elif isinstance(action, Disconnect):
                connection = self.connections.get(action.connection)
                if connection is not None:
                    self._spawn(self._close_from_outside(connection, action.code, action.reason, action.close_code))
            elif isinstance(action, Aggregate):
                self._spawn(self._aggregate(action))
            elif isinstance(action, SaveCheckpoint):
                self._spawn(self._save(action))
            elif isinstance(action, RoundClosed):
                self._round_closed(action)
            elif isinstance(action, Finish):
                self.finished.set()

    async def _train_step(self, connection: Connection, message: Activations) -> Gradients | None:
        self.strategy.check_step(message.tensors)  # shapes and values; the whole-model frameworks refuse
        started = time.perf_counter()
        number = connection.number
        await self._ask(connection, StepArrived(number, message.round, message.step), RunStep)

        def still_wanted() -> bool:  # on the worker thread: a client gone while its step waited gets none
            return self.engine.is_current(number) and connection.open()

        job = StepJob(connection.client_id, message.round, message.step, message.tensors, still_wanted)
        result: WorkResult[StepOutcome] = await self.worker.submit_step(job)
        seconds = time.perf_counter() - started  # the queue's wait included, as the client has always seen it
        outcome = "skipped" if result.skipped else "failed" if result.error is not None else "taken"
        if outcome == "failed":
            self._dispatch(StepDone(number, message.round, message.step, outcome))
            assert result.error is not None
            raise result.error
        step = result.unwrap() if outcome == "taken" else None
        if step is not None:
            self.metrics.write(
                "step",
                client_id=connection.client_id,
                round=message.round,
                step=message.step,
                loss=step.loss,
                server_seconds=round(seconds, 6),
                queue_seconds=round(result.queue_seconds, 6),
                compute_seconds=round(result.compute_seconds, 6),
            )
        await self._ask(connection, StepDone(number, message.round, message.step, outcome), SendGradients)
        assert step is not None  # a skipped step's answer is DropStep, which ends the conversation
        tensors = {} if step.activation_grads is None else {"activation_grads": step.activation_grads}
        return Gradients(message.round, message.step, step.loss, seconds, tensors)

    async def _adapter_update(self, connection: Connection, message: AdapterUpdate) -> RoundResult:
        problem = None
        try:
            self.strategy.check_update(message.tensors)
        except TrainingError as error:
            problem = str(error)
        update = Update(connection.client_id, message.num_samples, message.metrics, message.tensors)
        event = UpdateArrived(connection.number, message.round, update, problem)
        result: SendRoundResult = await self._ask(connection, event, SendRoundResult)
        return RoundResult(result.update_round, result.next_round, result.done, result.eval_loss, self.round_tensors)

    async def _aggregate(self, action: Aggregate) -> None:
        accepted = [(dict(update.tensors), update.num_samples) for update in action.updates]
        try:
            self._aggregated = (await self.worker.submit(lambda: self.strategy.aggregate(accepted))).unwrap()
            eval_loss = None
            if self.strategy.eval_set is not None:
                eval_loss = (await self.worker.submit(self.strategy.evaluate)).unwrap()
        except Exception as error:
            self._dispatch(RoundFailed(action.round, f"{type(error).__name__}: {error}", traceback.format_exc()))
            return
        self._dispatch(Aggregated(action.round, eval_loss, time.monotonic()))

    async def _save(self, action: SaveCheckpoint) -> None:
        """Saved before any client hears of the round: a result a client has seen survives a restart."""
        assert self.config.checkpoint_dir is not None
        directory = self.config.checkpoint_dir
        try:
            tail_state = (await self.worker.submit(self.strategy.tail_state)).unwrap()
            checkpoint = Checkpoint(
                action.round + 1,
                self.strategy.global_adapters,
                tail_state["lora"],
                tail_state["optimizer"],
                {"eval_loss": action.eval_loss, "num_samples": {u.client_id: u.num_samples for u in action.updates}},
                updates={update.client_id: dict(update.tensors) for update in action.updates},
            )
            (await self.worker.submit(lambda: save_checkpoint(directory, checkpoint))).unwrap()
        except Exception as error:
            self._dispatch(RoundFailed(action.round, f"{type(error).__name__}: {error}", traceback.format_exc()))
            return
        self._dispatch(RoundSaved(action.round, time.monotonic()))

    def _round_closed(self, action: RoundClosed) -> None:
        self.round_tensors = self._aggregated
        self.welcome_tensors = self.strategy.welcome_tensors()
        clients = sorted(update.client_id for update in action.updates)
        self.metrics.write(
            "round",
            round=action.round,
            clients=clients,
            num_samples={update.client_id: update.num_samples for update in action.updates},
            eval_loss=action.eval_loss,
            seconds=action.seconds,
            bytes_received=dict(self.bytes_received),
            bytes_sent=dict(self.bytes_sent),
            client_metrics={update.client_id: dict(update.metrics) for update in action.updates},
        )
        eval_text = "" if action.eval_loss is None else f", eval loss {action.eval_loss:.4f}"
        print(
            f"[server] round {action.round + 1}/{self.config.rounds} closed with {len(clients)} clients "
            f"({', '.join(clients)}){eval_text}",
            flush=True,
        )

    async def _deadlines(self) -> None:
        while not self.finished.is_set():
            await asyncio.sleep(0.5)
            self._dispatch(DeadlineTick(time.monotonic()))

    # ------------------------------------------------------------------------------------------ tokens

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
        revoked = frozenset(
            connection.client_id
            for connection in self.connections.values()
            if self.engine.is_current(connection.number)
            and not self._token_valid(connection.client_id, connection.token)
        )
        self._dispatch(TokensRevoked(revoked))


async def _send_and_close(websocket: Any, frame: bytes, reason: str, close_code: int) -> None:
    try:
        await websocket.send(frame)
        await websocket.close(close_code, reason[:120])
    except Exception:  # the peer may be gone already; nothing more to tell it
        pass


def _check_kind_allowed(frame: bytes, state: State) -> None:
    """Refuse a frame the conversation does not allow now from its 4-byte header alone, before its tensors
    are decoded: nothing but a Hello is parsed from a client that has not been admitted."""
    if len(frame) < 4 or frame[:2] != MAGIC:
        return  # not a frame at all: decode says why
    try:
        kind = Kind(frame[3])
    except ValueError:
        return
    if (Role.SERVER, state, kind) not in TRANSITIONS:
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
