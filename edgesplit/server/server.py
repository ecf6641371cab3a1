"""The cloud server: an asyncio shell over the round engine (rounds.py), a strategy and a tail worker.

Per client connection (the protocol's states are in edgesplit/client/protocol.py):
    Hello ──> checks (token, manifest hash) ──> waits until --min-clients have joined ──> Welcome
    Activations ──> a step on the tail worker ──> Gradients               (repeated, steps_per_round times)
    AdapterUpdate ──> waits for the round to close ──> RoundResult        (the new global model)

The rules (admission, barrier, step order, quorum, deadlines, stale and duplicate updates, reconnection,
revocation, the close order) are the round engine's, which takes events and returns actions; what differs by
framework is the strategy's (strategies/); the heavy work runs on the tail worker (workers.py). This shell
keeps the transport (transport.py: websockets, TLS, frame limits, SIGHUP, bytes counted) and carries out the
engine's actions; a new connection's Hello and the refusals are admission.py's, the metrics file's round and
end-of-run records and the Prometheus endpoint records.py's. Anything a peer sends ends, at worst, its own
connection.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from typing import Any

from edgesplit.client.artifacts import load_manifest
from edgesplit.client.int4k import zero_padding
from edgesplit.client.metrics import JsonlWriter
from edgesplit.client.protocol import (
    PROTOCOL_VERSION,
    Activations,
    AdapterUpdate,
    Bye,
    Gradients,
    Role,
    RoundResult,
    Session,
    SessionSettings,
    Welcome,
    Wire,
    max_frame_bytes,
)
from edgesplit.errors import EdgesplitError, ProtocolError, TrainingError
from edgesplit.server import round_events as events
from edgesplit.server.admission import Admission, Refused
from edgesplit.server.checkpoint import Checkpoint, load_latest, remove_partial, save_checkpoint
from edgesplit.server.config import ServerConfig
from edgesplit.server.guards import check_finite_state, check_result, update_problem
from edgesplit.server.metrics import MetricsEndpoint
from edgesplit.server.progress import StepProgress
from edgesplit.server.records import RunRecords
from edgesplit.server.round_events import CLOSE_POLICY, StepEnd
from edgesplit.server.rounds import RoundEngine
from edgesplit.server.scaleout import build_tail_worker, on_worker_lost
from edgesplit.server.strategies import (
    Arrays,
    StepOutcome,
    Strategy,
    build_strategy,
    load_global_adapters,
)
from edgesplit.server.transport import (
    HELLO_MAX_BYTES,
    MAX_QUEUE,
    Connection,
    aborted_because,
    bounded_connection,
    on_sighup,
    peer_text,
    read_tokens,
    reread_tokens,
    set_frame_limit,
    startup_warnings,
    tls_context,
    token_valid,
)
from edgesplit.server.workers import StepJob, WorkResult

# What the engine says to one connection: carried out by that connection's own task, in order.
CONVERSATION_ACTIONS = (
    events.Refuse,
    events.SendWelcome,
    events.RunStep,
    events.SendGradients,
    events.DropStep,
    events.SendRoundResult,
)
__all__ = ["HELLO_MAX_BYTES", "Server", "ServerConfig", "read_tokens", "run_server"]


class _Stop(Exception):  # the engine has nothing more for this connection: end its conversation quietly
    pass


class _StepFault(Exception):
    """The server itself failed on a client's step (not the client's tensors: those raise TrainingError). The
    client is told and stops: sending the step again would fail again, and it would reconnect forever."""


CLOSE_INTERNAL_ERROR = 1011  # websocket close code: the server met a condition that kept it from answering


class Server:
    def __init__(self, config: ServerConfig, ranks: Any = None) -> None:
        """`ranks`: the tail worker ranks' group, on rank 0 of `serve --workers N` (scaleout.py); None: one worker."""
        self.config = config
        self.manifest = load_manifest(config.artifacts)
        # A mixed-cut export: the deepest cut's client sends and receives the most adapters.
        cuts = [load_manifest(config.artifacts / cut.directory, verify=False) for cut in self.manifest.cuts]
        self._frame_bytes = max(max_frame_bytes(manifest) for manifest in [self.manifest, *cuts])
        self.wire = Wire(config.wire)
        self.ssl_context = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.ssl_context = tls_context(config.tls_cert, config.tls_key)
        self.strategy: Strategy = build_strategy(config.framework, config.strategy_options())
        self.head = self.strategy.head
        self.metrics = JsonlWriter(config.metrics_out)
        self.worker = build_tail_worker(self.strategy, config, ranks)
        self.tokens = dict(config.tokens)
        self.connections: dict[int, Connection] = {}
        self.finished = asyncio.Event()  # set when the run is over (tests set it to stop a server)
        self.bytes_received: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        self._background: set[asyncio.Task[Any]] = set()  # tasks must be referenced or they may vanish
        self._numbers = 0
        self.admission = Admission(config, self.manifest, self.metrics)
        self.records = RunRecords(config, self.metrics, self.manifest.cut_layer)
        round_index, last_eval_loss = self._resume()
        rules = config.round_rules(self.manifest.manifest_hash, PROTOCOL_VERSION)
        self.engine = RoundEngine(rules, round_index, last_eval_loss)
        self.progress = StepProgress(config.rounds, config.steps_per_round, config.min_clients, round_index)
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
    def metrics_endpoint(self) -> MetricsEndpoint | None:
        return self.records.endpoint

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
        return {**self.config.session_settings(self.manifest), **self.strategy.settings()}

    def max_frame_bytes(self) -> int:
        return self._frame_bytes

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
            max_queue=MAX_QUEUE,
            # A peer that never reads (pings answered into a full buffer, a send that never drains) is aborted.
            create_connection=bounded_connection(self.max_frame_bytes(), self.config.send_timeout_s),
            ssl=self.ssl_context,
        ) as websocket_server:
            port = websocket_server.sockets[0].getsockname()[1]
            if self.config.tokens_file is not None:
                on_sighup(self.reload_tokens)
            scheme = "wss" if self.ssl_context else "ws"
            config = self.config
            print(
                f"[server] listening on {scheme}://{config.host}:{port} for {config.rounds} rounds, "
                f"at least {config.min_clients} clients, {config.steps_per_round} steps a round",
                flush=True,
            )
            for warning in startup_warnings(config.host, config.tls_cert, bool(self.tokens)):
                print(f"[server] warning: {warning}", flush=True)
            self.port = port
            on_worker_lost(self.worker, lambda reason: self._dispatch(events.RoundFailed(self.round, reason)))
            self.records.start_endpoint(self.worker)
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
            await asyncio.gather(*(c.close_from_outside(code, reason, close_code) for c in members))
            for connection in list(self.connections.values()):
                connection.actions.put_nowait(None)
            deadline_task.cancel()
        self.worker.close()
        self.progress.close()
        self.records.finished(self.round, self.last_eval_loss, self.failure, self.bytes_received, self.bytes_sent)
        if self.failure is not None:
            raise EdgesplitError(self.failure)

    async def handle(self, websocket: Any) -> None:
        # Nothing a peer sends may escape this function: the server carries on serving the others.
        set_frame_limit(websocket, HELLO_MAX_BYTES)
        self._numbers += 1
        connection = Connection(self._numbers, websocket, Session(Role.SERVER, max_size=self.max_frame_bytes()))
        self.connections[connection.number] = connection
        try:
            event, cut = await self.admission.hello(connection, self.tokens, self.bytes_received)
            welcome = await self._ask(connection, event, events.SendWelcome)
            # Where this client stands, for a reconnection (edgesplit/client/client.py: Client._resume).
            settings = SessionSettings.from_mapping(
                {**self.settings, "resume_step": welcome.resume_step, "update_received": welcome.update_received}
            )
            set_frame_limit(websocket, self.max_frame_bytes())
            tensors = self.admission.for_cut(self.welcome_tensors, cut)
            await connection.send(
                Welcome(welcome.round, self.config.rounds, settings, tensors), self.wire, self.bytes_sent
            )
            while True:
                message = await connection.receive(self.bytes_received)
                if isinstance(message, Activations):
                    gradients = await self._train_step(connection, message)
                    if gradients is None:
                        return  # the client left or reconnected while its step waited
                    await connection.send(gradients, self.wire, self.bytes_sent)
                elif isinstance(message, AdapterUpdate):
                    result = await self._adapter_update(connection, message)
                    await connection.send(result, self.wire, self.bytes_sent)
                    if result.done:
                        return
                elif isinstance(message, Bye):
                    return
        except _Stop:
            pass
        except Refused as refusal:  # refused before the engine heard of it (busy, no such cut)
            await self.admission.refuse(connection, "refused", refusal.code, str(refusal), refusal.close_code)
        except ProtocolError as error:
            await self.admission.refuse(connection, "protocol error", "protocol", str(error), error.close_code)
        except TrainingError as error:
            await self.admission.refuse(connection, "rejected", "bad_tensor", str(error), CLOSE_POLICY)
        except _StepFault as fault:
            reason = f"the server failed on this client's step ({fault}); the server's log has the details"
            await self.admission.refuse(connection, "server error", "server_error", reason, CLOSE_INTERNAL_ERROR)
        except Exception as error:  # the connection's end: the server itself carries on
            closed = type(error).__name__.startswith("ConnectionClosed")
            text = "connection closed" if closed else peer_text(f"{type(error).__name__}: {error}")
            aborted = aborted_because(error)
            if aborted is None or self.admission.refusal_logged(connection):  # aborts, like refusals: rate-limited
                print(f"[server] {connection.client_id}: {aborted or text}", flush=True)
        finally:
            del self.connections[connection.number]
            self.admission.forget(connection)
            self._dispatch(events.ClientLeft(connection.number))

    async def _ask(self, connection: Connection, event: events.Event, expected: type[Any]) -> Any:
        self._dispatch(event)
        action = await connection.actions.get()
        if isinstance(action, events.Refuse):
            await connection.refuse(action.code, action.reason, action.close_code)
            raise _Stop
        if action is None or not isinstance(action, expected):
            raise _Stop  # DropStep, or closed from outside: nothing more to say on this connection
        return action

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------------------------------ the engine's actions

    def _dispatch(self, event: events.Event) -> None:
        """Feed one event to the engine and carry out what it says, in order; a connection's own task sends."""
        actions = self.engine.handle(event)
        if isinstance(event, events.ClientHello) and any(isinstance(a, events.Refuse) for a in actions):
            connection = self.connections.get(event.connection)  # a stranger refused in a loop: rate-limited
            if connection is not None and not self.admission.refusal_logged(connection):
                actions = [a for a in actions if not isinstance(a, (events.Log, events.Metric))]
        for action in actions:
            if isinstance(action, events.Log):
                print(f"[server] {action.text}", flush=True)
            elif isinstance(action, events.Metric):
                self.metrics.write(action.kind, **action.fields)
            elif isinstance(action, CONVERSATION_ACTIONS):
                connection = self.connections.get(action.connection)
                if connection is not None:
                    connection.actions.put_nowait(action)
            elif isinstance(action, events.Disconnect):
                connection = self.connections.get(action.connection)
                if connection is not None:
                    self._spawn(connection.close_from_outside(action.code, action.reason, action.close_code))
            elif isinstance(action, events.Aggregate):
                self._spawn(self._aggregate(action))
            elif isinstance(action, events.SaveCheckpoint):
                self._spawn(self._save(action))
            elif isinstance(action, events.RoundClosed):
                self._round_closed(action)
            elif isinstance(action, events.Finish):
                self.finished.set()
        self.records.refresh(self.engine.state)

    async def _train_step(self, connection: Connection, message: Activations) -> Gradients | None:
        if message.stage == "lower":
            return await self._u_shaped_step(connection, message)
        cut = self.admission.cuts.get(connection.number)
        self.strategy.check_step(message.tensors, cut)  # shapes and values; the whole-model frameworks refuse
        started = time.perf_counter()
        number = connection.number
        await self._ask(connection, events.StepArrived(number, message.round, message.step), events.RunStep)
        key = (message.stage, message.tensors["activations"].shape[1:], cut)  # only steps alike share a batch
        result = await self.worker.submit_step(self._job(connection, message, message.tensors, key))
        seconds = time.perf_counter() - started  # the queue's wait included, as the client has always seen it
        return await self._step_answer(connection, message, result, seconds, None, message.stage)

    def _unpadded(self, tensor: Any, message: Activations) -> Any:
        """Under int4k, a step's (B, T, H) tensor with the padding rows of `message`'s mask zeroed, as the
        client zeroes its own: the wire leaves zero rows out, and the model masks those positions anyway."""
        mask = message.tensors.get("attention_mask")
        return tensor if self.wire is not Wire.INT4K or mask is None else zero_padding(tensor, mask)

    def _job(self, connection: Connection, message: Activations, tensors: Any, key: tuple[object, ...]) -> StepJob:
        number = connection.number

        def still_wanted() -> bool:  # on the worker thread: a client gone while its step waited gets none
            return self.engine.is_current(number) and connection.open()

        cut = self.admission.cuts.get(number)
        return StepJob(connection.client_id, message.round, message.step, tensors, still_wanted, cut, key)

    async def _u_shaped_step(self, connection: Connection, message: Activations) -> Gradients | None:
        """A U-shaped step: two exchanges, two pieces of work on the worker (the middle's forward; then its
        forward again, backward and AdamW), and one step for the round engine: StepArrived before the first,
        StepDone after the second, so replay refusal and resumption count whole steps. A client that leaves
        or breaks off between them has trained nothing: its step ends FAILED (not taken), the engine forgets
        it, and a reconnection sends it again. Never batched: each half is one client's alone."""
        cut, number, step_id = (
            self.admission.cuts.get(connection.number),
            connection.number,
            (message.round, message.step),
        )
        self.strategy.check_step(message.tensors, cut)  # no labels: they stay on the device
        started = time.perf_counter()
        await self._ask(connection, events.StepArrived(number, *step_id), events.RunStep)
        key = (message.stage, number)
        first = await self.worker.submit_step(self._job(connection, message, message.tensors, key))
        if first.skipped or first.error is not None:
            return await self._step_answer(connection, message, first, time.perf_counter() - started, None, "lower")
        outcome = first.unwrap()
        assert outcome.activations is not None  # the strategy's first half gives the middle's output
        seconds = time.perf_counter() - started
        try:
            middle = self._unpadded(outcome.activations, message)
            upper = Activations(message.round, message.step, {"activations": middle}, "upper")
            await connection.send(upper, self.wire, self.bytes_sent)
            reply = await connection.receive(self.bytes_received)  # the Session admits Gradients "upper" or Bye
            resumed = time.perf_counter()
            if not isinstance(reply, Gradients):
                self._dispatch(events.StepDone(number, *step_id, StepEnd.FAILED))
                return None  # Bye: the client left in the middle of its step
            tensors = {**message.tensors, "activation_grads": reply.tensors["activation_grads"]}
            self.strategy.check_step(tensors, cut)
        except BaseException:
            self._dispatch(events.StepDone(number, *step_id, StepEnd.FAILED))
            raise
        second = await self.worker.submit_step(self._job(connection, message, tensors, key))
        seconds += time.perf_counter() - resumed  # the server's own time: the device's top is not in it
        merged = WorkResult(
            second.value,
            second.error,
            second.skipped,
            first.queue_seconds + second.queue_seconds,
            first.compute_seconds + second.compute_seconds,
        )
        return await self._step_answer(connection, message, merged, seconds, reply.loss, "lower")

    async def _step_answer(
        self,
        connection: Connection,
        message: Activations,
        result: WorkResult[StepOutcome],
        seconds: float,
        device_loss: float | None,
        stage: str,
    ) -> Gradients | None:
        """The step's end for the round engine (taken, skipped or failed), its metrics, and its Gradients.
        `device_loss`: the loss the device computed (a U-shaped step's), else the strategy's."""
        number, cut = connection.number, self.admission.cuts.get(connection.number)
        end = StepEnd.SKIPPED if result.skipped else StepEnd.FAILED if result.error is not None else StepEnd.TAKEN
        if end is StepEnd.FAILED:
            self._dispatch(events.StepDone(number, message.round, message.step, end))
            error = result.error
            assert error is not None
            if isinstance(error, EdgesplitError):
                raise error  # the client's tensors (TrainingError), or a rule of the protocol
            trace = "".join(traceback.format_exception(error)).rstrip()
            print(f"[server] {connection.client_id}: step {message.step} failed on the server:\n{trace}", flush=True)
            raise _StepFault(peer_text(f"{type(error).__name__}: {error}")) from error
        step = result.unwrap() if end is StepEnd.TAKEN else None
        loss = float("nan")
        if step is not None:
            loss = step.loss if device_loss is None else device_loss
            self.records.step_times.queue_seconds += result.queue_seconds
            self.records.step_times.compute_seconds += result.compute_seconds
            self.progress.step(message.round, connection.client_id, loss)
            self.metrics.write(
                "step",
                client_id=connection.client_id,
                round=message.round,
                step=message.step,
                loss=loss,
                cut_layer=cut if cut is not None else self.manifest.cut_layer,
                server_seconds=round(seconds, 6),
                queue_seconds=round(result.queue_seconds, 6),
                compute_seconds=round(result.compute_seconds, 6),
            )
        await self._ask(connection, events.StepDone(number, message.round, message.step, end), events.SendGradients)
        assert step is not None  # a skipped step's answer is DropStep, which ends the conversation
        grads = step.activation_grads
        tensors = {} if grads is None else {"activation_grads": self._unpadded(grads, message)}
        return Gradients(
            message.round,
            message.step,
            loss,
            seconds,
            tensors,
            stage,
            queue_seconds=result.queue_seconds,
            compute_seconds=result.compute_seconds,
        )

    async def _adapter_update(self, connection: Connection, message: AdapterUpdate) -> RoundResult:
        # An update that cannot be averaged safely is dropped (recorded, and its client told); the round goes on.
        problem = update_problem(message.num_samples, message.tensors, self.wire)
        problem = None if problem is None else peer_text(problem)
        try:
            self.strategy.check_update(message.tensors, self.admission.cuts.get(connection.number))
        except TrainingError as error:
            problem = peer_text(error)
        update = events.Update(connection.client_id, message.num_samples, message.metrics, message.tensors)
        event = events.UpdateArrived(connection.number, message.round, update, problem)
        result: events.SendRoundResult = await self._ask(connection, event, events.SendRoundResult)
        tensors = self.admission.for_cut(self.round_tensors, self.admission.cuts.get(connection.number))
        eval_seconds = self.records.eval_seconds.get(result.update_round)
        return RoundResult(result.update_round, result.next_round, result.done, result.eval_loss, tensors, eval_seconds)

    async def _aggregate(self, action: events.Aggregate) -> None:
        accepted = [(dict(update.tensors), update.num_samples) for update in action.updates]

        def aggregate_and_evaluate() -> float | None:
            self._aggregated = self.strategy.aggregate(accepted)
            check_result(self._aggregated, self.wire)  # a round whose result no client could load is not committed
            if self.strategy.eval_set is None:
                return None
            started = time.perf_counter()
            loss = self.strategy.evaluate()
            self.records.eval_seconds[action.round] = (
                time.perf_counter() - started
            )  # the clients are told (RoundResult)
            return loss

        result = await self.worker.submit(aggregate_and_evaluate)
        if not self._round_failed(action.round, result):
            self._dispatch(events.Aggregated(action.round, result.value, time.monotonic()))

    async def _save(self, action: events.SaveCheckpoint) -> None:
        """Saved before any client hears of the round: a result a client has seen survives a restart."""
        directory = self.config.checkpoint_dir
        assert directory is not None

        def save() -> None:
            tail_state = self.strategy.tail_state()
            check_finite_state("the global adapters", self.strategy.global_adapters)
            check_finite_state("the tail", tail_state)
            num_samples = {update.client_id: update.num_samples for update in action.updates}
            checkpoint = Checkpoint(
                action.round + 1,
                self.strategy.global_adapters,
                tail_state["lora"],
                tail_state["optimizer"],
                {"eval_loss": action.eval_loss, "num_samples": num_samples, "cut_layers": self._update_cuts(action)},
                updates={update.client_id: dict(update.tensors) for update in action.updates},
            )
            save_checkpoint(directory, checkpoint)

        result = await self.worker.submit(save)
        if not self._round_failed(action.round, result):
            self._dispatch(events.RoundSaved(action.round, time.monotonic()))

    def _update_cuts(self, action: events.SaveCheckpoint | events.RoundClosed) -> dict[str, int]:
        return self.records.update_cuts(action.updates, self.admission.client_cuts)

    def _round_failed(self, round_index: int, result: WorkResult[Any]) -> bool:
        if result.error is None:
            return False
        error, trace = result.error, "".join(traceback.format_exception(result.error))
        self._dispatch(events.RoundFailed(round_index, f"{type(error).__name__}: {error}", trace.rstrip()))
        return True

    def _round_closed(self, action: events.RoundClosed) -> None:
        self.round_tensors = self._aggregated
        self.welcome_tensors = self.strategy.welcome_tensors()
        clients = sorted(update.client_id for update in action.updates)
        self.records.round_closed(action, self.admission.client_cuts, self.bytes_received, self.bytes_sent)
        eval_text = "" if action.eval_loss is None else f", eval loss {action.eval_loss:.4f}"
        self.progress.round_closed(action.round + 1)
        print(
            f"[server] round {action.round + 1}/{self.config.rounds} closed with {len(clients)} clients "
            f"({', '.join(clients)}){eval_text}",
            flush=True,
        )

    async def _deadlines(self) -> None:
        while not self.finished.is_set():
            await asyncio.sleep(0.5)
            self._dispatch(events.DeadlineTick(time.monotonic()))

    # ------------------------------------------------------------------------------------------ tokens

    def reload_tokens(self) -> None:
        """Re-read --tokens-file (on SIGHUP): new clients may join, and a client whose token is gone or
        changed is disconnected at once and refused from then on."""
        if self.config.tokens_file is None:
            return
        tokens = reread_tokens(self.config.tokens_file, self.tokens)
        if tokens is None:
            return
        self.tokens = tokens
        current = [c for c in self.connections.values() if self.engine.is_current(c.number)]
        revoked = frozenset(c.client_id for c in current if not token_valid(tokens, c.client_id, c.token))
        self._dispatch(events.TokensRevoked(revoked))


def run_server(config: ServerConfig, ranks: Any = None) -> Server:
    server = Server(config, ranks)
    asyncio.run(server.serve())
    return server
