"""The edge client: trains the head's LoRA adapters with ONNX Runtime and numpy, against a cloud server.

One step, with the phases the metrics time:

    batch (B, T) ─ head_forward ─> activations (B, T, H) ─ encode ─> [network] ─> server: tail, loss, step
    adapters <─ optimizer <─ grad_graph <─ activation_grads (B, T, H) <─ decode <─ [network] <─┘

Everything that can be checked before connecting is checked first (artifacts, data, tokenizer), so that a
bad file never costs the server a half-finished client. Blocking compute runs off the event loop, so the
websocket answers pings while a slow device works.

Devices lose Wi-Fi and power: a dropped connection is retried with capped exponential backoff and jitter
(`backoff_delays`, for --connect-timeout seconds per outage), and the server's Welcome on the new connection
says where to pick up (`Client._resume`). A restarted process rejoins the same way, with the global adapters.
An Error from the server (bad token, wrong artifacts, a rejected tensor) is final: the client stops.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.client.checks import check_token_window
from edgesplit.client.data import Batch, encode_examples, iterate_batches, load_tokenizer, read_jsonl
from edgesplit.client.defences import ActivationDefence
from edgesplit.client.energy import EnergyReader, detect_energy_reader
from edgesplit.client.head import Head
from edgesplit.client.metrics import JsonlWriter
from edgesplit.client.protocol import (
    PROTOCOL_VERSION,
    AdapterUpdate,
    Error,
    Hello,
    Message,
    Role,
    RoundResult,
    Session,
    Welcome,
    Wire,
    decode,
    max_frame_bytes,
)
from edgesplit.client.resources import MemorySampler, PhaseTimer
from edgesplit.client.top import Top
from edgesplit.client.trainers import Result, SplitTrainer, StepResult, Trainer, trainer_for
from edgesplit.errors import EdgesplitError, ProtocolError


@dataclass(frozen=True)
class ClientConfig:
    server: str
    artifacts: Path
    data: Path
    client_id: str
    token: str | None = None
    metrics_out: Path | None = None
    seed: int = 0
    threads: int = 0
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers by preference; () is the CPU
    device_profile: str | None = None
    ca_file: Path | None = None
    quiet: bool = False
    connect_timeout_s: float = 60.0
    activation_defence: ActivationDefence | None = None  # --activation-noise/--activation-clip (defences.py)
    group_by_length: bool = False  # --group-by-length: batches of like-length examples (data.iterate_batches)


class ServerRefused(EdgesplitError):
    """The server ended the session with an Error message: `code` says why (protocol.Error)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"the server refused: {reason} ({code})")
        self.code = code
        self.reason = reason


class _LinkLost(Exception):
    """The connection dropped mid-conversation: reconnect and resume."""


@dataclass
class _Position:
    """Where this client stands in the run; it outlives connections."""

    round: int
    step: int  # the next step of `round` to run
    losses: list[float] = field(default_factory=list)  # this round's, as far as this process has seen


def backoff_delays(
    first_s: float = 0.5, cap_s: float = 10.0, jitter: float = 0.2, rng: random.Random | None = None
) -> Iterator[float]:
    """Seconds to wait before each retry: doubling from `first_s` up to `cap_s`, each scaled by a random
    factor in [1 - jitter, 1 + jitter] so that clients cut off together do not all come back at once."""
    rng = rng or random.Random()
    delay = first_s
    while True:
        yield delay * rng.uniform(1 - jitter, 1 + jitter)
        delay = min(delay * 2, cap_s)


class Client:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        # The data first: reading it takes milliseconds and a mistake in it names its file and line, while
        # loading the head takes seconds.
        examples = read_jsonl(config.data)
        self.head = Head(config.artifacts, threads=config.threads or None, providers=config.providers)
        manifest = self.head.manifest
        tokenizer = load_tokenizer(config.artifacts)
        self.encoded = encode_examples(
            tokenizer, examples, manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
        )
        check_token_window(config.data, self.encoded, config.client_id)
        self.num_samples = len(examples)
        self.metrics = JsonlWriter(config.metrics_out)
        self.timer = PhaseTimer()
        self.memory = MemorySampler(interval_ms=10)
        self.energy: EnergyReader = detect_energy_reader(config.device_profile)
        self.adapters: dict[str, np.ndarray] = self.head.initial_adapters()
        # A U-shaped export's top: the last layers, the LM head and the loss run here too (the labels stay).
        self.top = (
            Top(config.artifacts, threads=config.threads or None, providers=config.providers)
            if manifest.u_shaped
            else None
        )
        if self.top is not None:
            self.adapters.update(self.top.initial_adapters())
        self.trainer: Trainer | None = None  # from the run's first Welcome: its framework's trainer
        self.bytes_up = 0
        self.bytes_down = 0
        self.steps_done = 0
        self.losses: list[float] = []
        self.reconnects = 0
        self.real_tokens = 0  # the batches' attended tokens, over the steps run
        self.computed_tokens = 0  # the tokens the head computed for them, padding included
        self.position: _Position | None = None  # None until the first Welcome
        self.steps_per_round = 0
        self.batch_iterator: Iterator[Batch] = iter(())
        self.batches_drawn = 0
        self._current_batch: tuple[int, Batch] | None = None

    def log(self, text: str) -> None:
        if not self.config.quiet:
            print(f"[{self.config.client_id}] {text}", flush=True)

    def batches(self, seed: int) -> Iterator[Batch]:
        return iterate_batches(
            self.encoded, self.head.manifest.batch_size, seed=seed, group_by_length=self.config.group_by_length
        )

    # ------------------------------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        from websockets.asyncio.client import connect

        ssl_context = None
        if self.config.server.startswith("wss://"):
            import ssl

            cafile = str(self.config.ca_file) if self.config.ca_file else None
            ssl_context = ssl.create_default_context(cafile=cafile)
        self.memory.start()
        self.energy.start()
        started = time.perf_counter()
        try:
            summary = await self._run_sessions(connect, ssl_context)
        finally:
            self.memory.stop()
            self.energy.stop()
        summary["seconds"] = time.perf_counter() - started
        summary["providers"] = self.head.providers
        summary["cpu_features"] = self.head.cpu.names()
        summary["head_route"] = self.head.route  # fp32, int8-dot or fp32-dequantised (edgesplit/client/cpu.py)
        summary["seq_buckets"] = list(self.head.manifest.seq_buckets)  # the lengths the head was traced for
        summary["dynamic_seq"] = self.head.manifest.dynamic_seq  # any length in 2..max_seq_len
        if self.head.route_note:
            summary["head_route_note"] = self.head.route_note
        summary.update(self._resource_summary())
        self.metrics.write("summary", client_id=self.config.client_id, **summary)
        self.metrics.close()
        return summary

    async def _run_sessions(self, connect: Any, ssl_context: Any) -> dict[str, Any]:
        """One session per connection, until training is done. A lost link is not the end of the run: the
        client reconnects and the server's Welcome says where to pick up (see _resume). A busy server (too many
        connections waiting to say Hello) is tried again with backoff for up to --connect-timeout."""
        busy_delays = backoff_delays()
        busy_since: float | None = None
        while True:
            websocket = await self._connect(connect, ssl_context)
            try:
                async with websocket:
                    return await self._session(websocket)
            except _LinkLost as lost:
                busy_since = None  # it got in: a later busy spell gets its own --connect-timeout
                self.reconnects += 1
                self.log(f"lost the server ({lost}); reconnecting")
                self.metrics.write(
                    "disconnect",
                    client_id=self.config.client_id,
                    reason=str(lost),
                    round=None if self.position is None else self.position.round,
                    step=None if self.position is None else self.position.step,
                )
            except ServerRefused as refusal:
                if refusal.code == "busy":
                    busy_since = busy_since or time.monotonic()
                    delay = next(busy_delays)
                    if time.monotonic() + delay - busy_since > self.config.connect_timeout_s:
                        raise
                    self.log(f"the server is busy ({refusal.reason}); retrying in {delay:.1f} s")
                    await asyncio.sleep(delay)
                    continue
                if refusal.code == "replaced":  # this process never left: another one took its id
                    raise EdgesplitError(
                        f"another process connected as client id {self.config.client_id!r}, and the server closed "
                        "this one; two devices must not share an id: give each its own --client-id (with tokens, "
                        "someone else holds this client's token)"
                    ) from refusal
                if refusal.code != "finished":
                    raise
                # The run ended while this client was mid-round (a straggler) or away: its part is done.
                self.log(f"the server has finished: {refusal.reason}")
                return self._summary()

    async def _connect(self, connect: Any, ssl_context: Any) -> Any:
        """Connect, retrying with capped exponential backoff and jitter while the server is unreachable."""
        import ssl

        from websockets.exceptions import InvalidHandshake

        deadline = time.monotonic() + self.config.connect_timeout_s
        for delay in backoff_delays():
            try:
                return await connect(
                    self.config.server,
                    max_size=max_frame_bytes(self.head.manifest),
                    compression=None,  # tensors do not deflate; compressing them costs CPU for nothing
                    ping_interval=20,
                    ping_timeout=120,  # a step on a slow device can take seconds; pings are answered anyway
                    open_timeout=30,
                    ssl=ssl_context,
                )
            except ssl.SSLError as error:
                # A certificate that does not verify will not verify on the next try either.
                raise EdgesplitError(
                    f"TLS with {self.config.server} failed: {error} (is --ca-file the CA "
                    "that signed the server's certificate?)"
                ) from error
            except (OSError, asyncio.TimeoutError, InvalidHandshake) as error:
                if time.monotonic() + delay > deadline:
                    raise EdgesplitError(f"cannot reach the server at {self.config.server}: {error}") from error
                self.log(f"server not reachable ({error}); retrying in {delay:.1f} s")
                await asyncio.sleep(delay)
        raise AssertionError("backoff_delays is endless")

    async def _exchange(
        self,
        websocket: Any,
        session: Session,
        message: Message,
        wire: Wire | None = None,
        timer: PhaseTimer | None = None,
    ) -> Message:
        """Send one message (in `wire`, by default the session's) and return the server's answer. The wait and
        the decoding count in the step's phases, or in `timer`'s when one is given."""
        from websockets.exceptions import ConnectionClosed

        timer = timer or self.timer
        frame = session.send(message, wire)
        try:
            with timer.phase("network"):
                await websocket.send(frame)
                reply = await websocket.recv()
        except (ConnectionClosed, OSError) as error:
            # The server may have said why before it closed (a revoked token, say) while this side was
            # sending: that Error is still queued, and it makes this the end rather than a lost link.
            refusal = await _queued_error(websocket)
            if refusal is not None:
                raise ServerRefused(refusal.code, refusal.message) from error
            raise _LinkLost(str(error) or type(error).__name__) from error
        if isinstance(reply, str):
            raise ProtocolError("the server sent a text frame", 1003)
        self.bytes_up += len(frame)
        self.bytes_down += len(reply)
        with timer.phase("decode"):
            answer = session.receive(reply)
        if isinstance(answer, Error):
            raise ServerRefused(answer.code, answer.message)
        return answer

    async def _session(self, websocket: Any) -> dict[str, Any]:
        session = Session(Role.CLIENT, max_size=max_frame_bytes(self.head.manifest))
        hello = Hello(
            self.config.client_id,
            PROTOCOL_VERSION,
            self.head.manifest.manifest_hash,
            self.config.token,
            self.num_samples,
            cut_layer=self.head.manifest.cut_layer,
        )
        self.log(f"connecting to {self.config.server} with {self.num_samples} examples")
        welcome = await self._exchange(websocket, session, hello)
        assert isinstance(welcome, Welcome)
        position = self._resume(welcome)
        trainer = self.trainer
        assert trainer is not None  # _resume made it
        runtime = _SessionRuntime(self, websocket, session)
        while True:
            while position.step < self.steps_per_round:
                batch = self._batch(position.round, position.step)
                loss = await self._step(trainer, runtime, batch, position.round, position.step)
                position.losses.append(loss)
                position.step += 1
            metrics = {"steps": float(len(position.losses))}
            if position.losses:
                metrics["mean_loss"] = float(np.mean(position.losses))
            # The round's own device work (kd: the proxy logits, then the distillation), timed for the record.
            started = time.perf_counter()
            upload = await trainer.upload(runtime)
            upload_seconds = time.perf_counter() - started
            update = AdapterUpdate(position.round, self.num_samples, upload, metrics)
            # The round's upload goes in fp32 whatever the step's wire: it is what the server averages. Its wait
            # (the other clients' last steps, the averaging, the evaluation) is the round's, not the next step's.
            round_timer = PhaseTimer()
            result = await self._exchange(websocket, session, update, Wire.FP32, round_timer)
            assert isinstance(result, RoundResult)
            close_seconds = sum(round_timer.step_done().values())
            started = time.perf_counter()
            await trainer.take_result(result, runtime)
            take_result_seconds = time.perf_counter() - started
            mean_loss = metrics.get("mean_loss")
            loss_text = "" if mean_loss is None else f": mean loss {mean_loss:.4f}"
            eval_text = "" if result.eval_loss is None else f", eval loss {result.eval_loss:.4f}"
            self.log(
                f"round {position.round + 1} done{loss_text}{eval_text}; {round_close_text(close_seconds, result)}"
            )
            self.metrics.write(
                "round",
                client_id=self.config.client_id,
                round=position.round,
                mean_loss=mean_loss,
                eval_loss=result.eval_loss,
                close_seconds=round(close_seconds, 6),
                server_eval_seconds=result.eval_seconds,
                upload_seconds=round(upload_seconds, 6),
                take_result_seconds=round(take_result_seconds, 6),
            )
            if result.done:
                return self._summary()
            if result.next_round != position.round + 1:
                self.log(f"the server is at round {result.next_round + 1}: catching up with its adapters")
            self.position = position = _Position(result.next_round, 0)

    def _resume(self, welcome: Welcome) -> _Position:
        """Where to pick up after a Welcome: the first one of the run, or one after a reconnection.

        The server says its round, how many of this client's steps of that round it has taken
        (`resume_step`) and whether it has this client's update for it. A step the server took is never
        sent again (the tail learnt from it already; only its gradients were lost). Within the same round
        this process keeps its own adapters; otherwise it takes the global ones.
        """
        settings = welcome.settings
        resume_step = settings.resume_step
        self.steps_per_round = settings.steps_per_round
        if self.trainer is None:  # the first Welcome of this process
            self.trainer = trainer_for(self.head, self.adapters, settings, self.top)
            self._attach_defence(self.trainer)
            self.batch_iterator = self.batches(seed=settings.seed + self.config.seed)
        elif settings.framework != self.trainer.framework:
            raise EdgesplitError(
                f"the server now runs {settings.framework}, this process trained with {self.trainer.framework}"
            )
        first = self.position is None
        new_round = self.position is None or self.position.round != welcome.round
        self.trainer.take_welcome(welcome.tensors, new_round)
        if self.position is None or new_round:
            self.position = _Position(welcome.round, resume_step)
        else:
            self.position.step = max(self.position.step, resume_step)
        if settings.update_received:
            self.position.step = self.steps_per_round  # straight to the update: the server waits to answer it
        position = self.position
        where = f"round {position.round + 1}/{welcome.total_rounds}"
        if first and position.step == 0:
            self.log(f"joined at {where}: {self.steps_per_round} steps a round, wire {settings.wire.value}")
        elif settings.update_received:
            self.log(f"rejoined at {where}: the server has this client's update; waiting for the round")
        elif position.step >= self.steps_per_round:
            self.log(f"rejoined at {where}: this client's steps are done; sending its update again")
        else:
            self.log(
                f"rejoined at {where}, step {position.step + 1} "
                f"(the server had taken {resume_step} steps of this round from this client)"
            )
        self.metrics.write(
            "welcome",
            client_id=self.config.client_id,
            round=position.round,
            step=position.step,
            resume_step=resume_step,
            update_received=settings.update_received,
        )
        return position

    def _attach_defence(self, trainer: Trainer) -> None:
        """Give the split trainer the --activation-noise defence; say so, or say that it has nothing to act on."""
        defence = self.config.activation_defence
        if defence is None:
            return
        if isinstance(trainer, SplitTrainer):
            trainer.defence = defence
            self.log(defence.describe())
        else:
            framework = trainer.framework
            self.log(f"--activation-noise has nothing to act on: the server runs {framework}, no activation goes up")

    def _batch(self, round_index: int, step: int) -> Batch:
        """The batch of (round, step): number round * steps_per_round + step of this client's sequence, so
        that a restarted process neither resends what the server already took nor trains on it twice."""
        target = round_index * self.steps_per_round + step
        if self._current_batch is not None and self._current_batch[0] == target:
            return self._current_batch[1]  # the step was cut off before the server took it: send it again
        while self.batches_drawn < target:
            next(self.batch_iterator)
            self.batches_drawn += 1
        batch = next(self.batch_iterator)
        self.batches_drawn += 1
        self._current_batch = (target, batch)
        return batch

    def _summary(self) -> dict[str, Any]:
        rounds = 0 if self.position is None else self.position.round + 1
        defence = self.config.activation_defence if isinstance(self.trainer, SplitTrainer) else None
        return {
            "rounds": rounds,
            "steps": self.steps_done,
            "final_loss": self.losses[-1] if self.losses else None,
            "first_loss": self.losses[0] if self.losses else None,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "reconnects": self.reconnects,
            "activation_defence": None if defence is None else defence.to_json(),
            "real_tokens": self.real_tokens,
            "computed_tokens": self.computed_tokens,
            "group_by_length": self.config.group_by_length,
        }

    async def _step(
        self, trainer: Trainer, runtime: _SessionRuntime, batch: Batch, round_index: int, step: int
    ) -> float:
        """One step of the framework's trainer, with its metrics line."""
        up_before, down_before = self.bytes_up, self.bytes_down
        energy_before = self.energy.read_joules()
        outcome: StepResult = await trainer.step(batch, round_index, step, runtime)
        phases = self.timer.step_done()
        extra: dict[str, float] = {}
        if outcome.server_seconds is not None and outcome.wait_seconds is not None:
            phases.update(server_phases(phases.get("network", 0.0), outcome))
            extra["wait_seconds"] = round(outcome.wait_seconds, 6)
        self.steps_done += 1
        self.losses.append(outcome.loss)
        real = int(batch.attention_mask.sum())
        computed = int(batch.input_ids.size) if outcome.computed_tokens is None else outcome.computed_tokens
        self.real_tokens += real
        self.computed_tokens += computed
        self.metrics.write(
            "step",
            client_id=self.config.client_id,
            round=round_index,
            step=step,
            loss=outcome.loss,
            tokens=real,
            computed_tokens=computed,
            bytes_up=self.bytes_up - up_before,
            bytes_down=self.bytes_down - down_before,
            seconds={k: round(v, 6) for k, v in phases.items()},
            **extra,
            energy_j=round(self.energy.read_joules() - energy_before, 6),
        )
        where = "" if outcome.server_seconds is not None else " (local)"
        self.log(f"round {round_index + 1} step {step + 1}: loss {outcome.loss:.4f}{where}, {step_time_text(phases)}")
        return outcome.loss

    def _resource_summary(self) -> dict[str, Any]:
        report = self.memory.report()
        return {
            "memory": report.to_json(),
            "peak_rss_mb": report.peak_bytes / 2**20,
            "energy_j": self.energy.read_joules(),
            "energy_method": self.energy.method,
            "energy_source": self.energy.source,
            "phase_seconds_total": {k: round(v, 6) for k, v in self.timer.totals.items()},
        }


def server_phases(network_seconds: float, outcome: StepResult) -> dict[str, float]:
    """The wait for the server's answer, split: its queue, its compute, and the rest (the link, and the frames'
    handling at both ends) as `network`. A server that does not split its time gets one `server` phase."""
    assert outcome.server_seconds is not None
    queue, compute = outcome.server_queue_seconds, outcome.server_compute_seconds
    if queue is None or compute is None:
        return {"server": outcome.server_seconds, "network": max(network_seconds - outcome.server_seconds, 0.0)}
    return {"server_queue": queue, "server_compute": compute, "network": max(network_seconds - queue - compute, 0.0)}


SERVER_PHASES = {"server_queue": "server queue", "server_compute": "server compute", "server": "server"}


def step_time_text(phases: dict[str, float]) -> str:
    """'1234 ms (server queue 400, server compute 480, network 50, device 304)': what the step's time was."""
    total = sum(phases.values())
    parts = [f"{label} {phases[name] * 1000:.0f}" for name, label in SERVER_PHASES.items() if name in phases]
    if not parts:
        return f"{total * 1000:.0f} ms"
    device = total - sum(phases[name] for name in SERVER_PHASES if name in phases) - phases.get("network", 0.0)
    parts += [f"network {phases.get('network', 0.0) * 1000:.0f}", f"device {device * 1000:.0f}"]
    return f"{total * 1000:.0f} ms ({', '.join(parts)})"


def round_close_text(close_seconds: float, result: RoundResult) -> str:
    """How long the round took to close after this client's update, and how much of it was the evaluation."""
    text = f"the round closed {close_seconds:.1f} s after this client's update"
    if result.eval_seconds is not None:
        text += f" (of which the server's evaluation {result.eval_seconds:.1f} s)"
    return text


class _SessionRuntime:
    """What a trainer may use of the client while one session is open (trainers.Runtime)."""

    def __init__(self, client: Client, websocket: Any, session: Session) -> None:
        self.client = client
        self.websocket = websocket
        self.session = session

    async def compute(self, phase: str, function: Callable[..., Result], *args: object) -> Result:
        # Blocking compute runs off the event loop, so the websocket answers pings while a slow device works.
        with self.client.timer.phase(phase), self.client.memory.phase(phase):
            return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    async def offload(self, function: Callable[..., Result], *args: object) -> Result:
        return await asyncio.get_running_loop().run_in_executor(None, function, *args)

    def phase(self, name: str) -> AbstractContextManager[None]:
        return self.client.timer.phase(name)

    async def exchange(self, message: Message) -> Message:
        return await self.client._exchange(self.websocket, self.session, message)


async def _queued_error(websocket: Any) -> Error | None:
    """An Error frame the closed connection had received but not yet handed over, if there is one."""
    try:
        frame = await asyncio.wait_for(websocket.recv(), timeout=1.0)
        message = decode(frame) if isinstance(frame, bytes) else None
    except Exception:  # closed with nothing queued, or not a frame of ours: a plain lost link
        return None
    return message if isinstance(message, Error) else None


def run_client(config: ClientConfig) -> dict[str, Any]:
    client = Client(config)
    try:
        return asyncio.run(client.run())
    except OSError as error:
        raise EdgesplitError(f"cannot reach the server at {config.server}: {error}") from error


def main_summary(summary: dict[str, Any]) -> str:
    loss = (
        "no steps"
        if summary["final_loss"] is None
        else f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
    )
    reconnects = f", {summary['reconnects']} reconnections" if summary.get("reconnects") else ""
    defence = summary.get("activation_defence")
    if defence:
        clip = "" if defence["clip"] is None else f", clip {defence['clip']:g}"
        reconnects += f"; activations noised (sigma {defence['sigma']:g}{clip})"
    computed = summary.get("computed_tokens") or 0
    if computed:
        share = summary["real_tokens"] / computed
        cuts = summary.get("dynamic_seq") or len(summary.get("seq_buckets") or ()) > 1  # the head skips padding
        if summary.get("group_by_length"):
            hint = ", batches grouped by length"
        elif cuts and share < 0.9:
            hint = " (--group-by-length would cut most of the rest)"
        else:
            hint = ""
        loss += f"; {share:.0%} of the tokens computed were real, not padding{hint}"
    return (
        f"trained {summary['steps']} steps in {summary['rounds']} rounds{reconnects}: {loss}; "
        f"{summary['bytes_up'] / 1e6:.1f} MB up, "
        f"{summary['bytes_down'] / 1e6:.1f} MB down; peak RSS {summary['peak_rss_mb']:.0f} MB; "
        f"energy {summary['energy_j']:.1f} J ({summary['energy_method']}, {summary['energy_source']})"
    )


if __name__ == "__main__":
    sys.exit("use `edgesplit client`")
