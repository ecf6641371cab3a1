"""The cloud server: one PyTorch tail shared by many edge clients over websockets, and FedAvg each round.

Per client connection (the protocol's states are in edge_client/protocol.py):

    Hello ──> checks (token, manifest hash) ──> waits until --min-clients have joined ──> Welcome
    Activations ──> tail step on the worker thread ──> Gradients          (repeated, steps_per_round times)
    AdapterUpdate ──> waits for the round to close ──> RoundResult        (the new global adapters)

A round closes when every client taking part in it has sent its adapters (and at least --min-clients
have), or at its deadline with at least --min-clients updates. Then: FedAvg weighted by samples, the
evaluation, the checkpoint, and the next round.

The tail runs on one worker thread: the event loop stays free for pings and other clients, and the updates
to the shared tail are serialised by construction.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_server.aggregate import fedavg
from cloud_server.checkpoint import Checkpoint, load_latest, save_checkpoint
from cloud_server.tail import OptimizerSettings, Tail
from edge_client.artifacts import load_manifest
from edge_client.errors import EdgesplitError, ProtocolError, TrainingError
from edge_client.head import Head
from edge_client.metrics import JsonlWriter
from edge_client.protocol import (
    PROTOCOL_VERSION,
    Activations,
    AdapterUpdate,
    Bye,
    Error,
    Gradients,
    Hello,
    Role,
    RoundResult,
    Session,
    Welcome,
    Wire,
)

CLOSE_POLICY = 1008  # websocket close code: policy violation (bad token, wrong artifacts, bad tensor)


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
    round_deadline_s: float = 1800.0
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.min_clients < 1 or self.steps_per_round < 1:
            raise ValueError("--rounds, --min-clients and --steps-per-round must be at least 1")
        Wire(self.wire)  # raises on an unknown wire format


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


@dataclass
class Participant:
    client_id: str
    num_samples: int
    joined_round: int


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.manifest = load_manifest(config.artifacts)
        self.wire = Wire(config.wire)
        self.tail = Tail(
            config.artifacts,
            OptimizerSettings(learning_rate=config.learning_rate, weight_decay=config.weight_decay),
            seed=config.seed,
            threads=config.threads,
        )
        self.head = Head(config.artifacts, verify=False)  # for evaluation: the server runs the head too
        self.global_adapters = self.head.initial_adapters()
        self.round = 0
        self.metrics = JsonlWriter(config.metrics_out)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tail")
        self.participants: dict[str, Participant] = {}
        self.updates: dict[str, tuple[dict[str, np.ndarray], int, dict[str, float]]] = {}
        self.round_closed: dict[int, asyncio.Event] = {}
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.last_eval_loss: float | None = None
        self.bytes_received: dict[str, int] = {}
        self.bytes_sent: dict[str, int] = {}
        self.round_started_at = time.monotonic()
        self.eval_set = self._load_eval(config.eval_data)
        self._resume()

    # ------------------------------------------------------------------------------------------ setup

    def _load_eval(self, path: Path | None) -> Any:
        if path is None:
            return None
        from tokenizers import Tokenizer

        from edge_client.data import encode_examples, read_jsonl

        tokenizer = Tokenizer.from_file(str(self.config.artifacts / "tokenizer.json"))
        examples = read_jsonl(path)
        return encode_examples(
            tokenizer,
            examples,
            self.manifest.max_seq_len,
            self.manifest.eos_token_id,
            self.manifest.pad_token_id or 0,
        )

    def _resume(self) -> None:
        if self.config.checkpoint_dir is None:
            return
        checkpoint = load_latest(self.config.checkpoint_dir)
        if checkpoint is None:
            return
        self.round = checkpoint.round
        self.global_adapters = {k: v.copy() for k, v in checkpoint.global_adapters.items()}
        self.tail.load_state_dict({"lora": checkpoint.tail_lora, "optimizer": checkpoint.tail_optimizer})
        self.last_eval_loss = checkpoint.extra.get("eval_loss")
        print(f"[server] resumed from {self.config.checkpoint_dir}: {self.round} rounds done", flush=True)
        self.metrics.write("resume", round=self.round)
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
        }

    def max_frame_bytes(self) -> int:
        """The largest frame a client may send: fp32 activations plus labels and mask, or its adapters."""
        batch, seq, hidden = self.manifest.activations_shape
        activations = batch * seq * (hidden * 4 + 16)
        adapters = sum(int(np.prod(s)) * 4 for s in self.manifest.lora.matrices.values())
        return max(activations, adapters) + (1 << 20)

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
        ) as websocket_server:
            port = websocket_server.sockets[0].getsockname()[1]
            print(f"[server] listening on ws://{self.config.host}:{port} for {self.config.rounds} rounds, "
                  f"at least {self.config.min_clients} clients, {self.config.steps_per_round} steps a round",
                  flush=True)
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
            deadline_task.cancel()
        self.executor.shutdown(wait=True)
        self.metrics.write("finished", round=self.round, eval_loss=self.last_eval_loss,
                           bytes_received=self.bytes_received, bytes_sent=self.bytes_sent)
        self.metrics.close()

    async def handle(self, websocket: Any) -> None:
        session = Session(Role.SERVER, max_size=self.max_frame_bytes())
        client_id = "?"
        try:
            hello = await self._receive(websocket, session)
            if not isinstance(hello, Hello):
                raise ProtocolError("the first message must be Hello")
            client_id = hello.client_id
            self._admit(hello)
            await self._start_barrier(hello)
            await self._send(websocket, session, Welcome(self.round, self.config.rounds, self.settings,
                                                         self.global_adapters))
            while True:
                message = await self._receive(websocket, session)
                if isinstance(message, Activations):
                    gradients = await self._train_step(client_id, message)
                    await self._send(websocket, session, gradients)
                elif isinstance(message, AdapterUpdate):
                    result = await self._adapter_update(client_id, message)
                    await self._send(websocket, session, result)
                    if result.done:
                        return
                elif isinstance(message, Bye):
                    return
        except _Refused as refusal:
            await self._refuse(websocket, session, refusal.code, str(refusal), CLOSE_POLICY)
        except ProtocolError as error:
            print(f"[server] {client_id}: protocol error: {error}", flush=True)
            await self._refuse(websocket, session, "protocol", str(error), error.close_code)
        except TrainingError as error:
            print(f"[server] {client_id}: rejected: {error}", flush=True)
            await self._refuse(websocket, session, "bad_tensor", str(error), CLOSE_POLICY)
        except Exception as error:  # the connection's end: the server itself carries on
            if type(error).__name__.startswith("ConnectionClosed"):
                print(f"[server] {client_id}: connection closed", flush=True)
            else:
                print(f"[server] {client_id}: {type(error).__name__}: {error}", flush=True)
        finally:
            self._leave(client_id)

    async def _receive(self, websocket: Any, session: Session) -> Any:
        frame = await websocket.recv()
        if isinstance(frame, str):
            raise ProtocolError("text frames are not part of the protocol; send binary frames", 1003)
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

    async def _refuse(self, websocket: Any, session: Session, code: str, reason: str, close_code: int) -> None:
        try:
            await websocket.send(session.send(Error(code, reason)) if session.state.name != "CLOSED"
                                 else _encode_error(code, reason))
            await websocket.close(close_code, reason[:120])
        except Exception:  # the peer may be gone already; nothing more to tell it
            pass

    # ------------------------------------------------------------------------------------------ admission

    def _admit(self, hello: Hello) -> None:
        if self.config.tokens:
            expected = self.config.tokens.get(hello.client_id, "")
            # Constant time, and the same path for an unknown id as for a wrong token.
            if not hmac.compare_digest((hello.token or "").encode(), expected.encode()) or not expected:
                raise _Refused("bad_token", f"client {hello.client_id!r}: unknown client or wrong token")
        if hello.manifest_hash != self.manifest.manifest_hash:
            raise _Refused(
                "manifest_mismatch",
                f"the client runs artifacts {hello.manifest_hash}, the server {self.manifest.manifest_hash}: "
                "copy the server's artifact directory to the client",
            )
        if hello.protocol_version != PROTOCOL_VERSION:
            raise _Refused("protocol_version", f"protocol {hello.protocol_version}, server {PROTOCOL_VERSION}")
        if hello.client_id in self.participants:
            raise _Refused("duplicate_client", f"client {hello.client_id!r} is already connected")
        if self.finished.is_set():
            raise _Refused("finished", "training is finished")
        self.participants[hello.client_id] = Participant(hello.client_id, hello.num_samples, self.round)
        print(f"[server] {hello.client_id} joined ({hello.num_samples} samples); "
              f"{len(self.participants)} connected", flush=True)
        self.metrics.write("join", client_id=hello.client_id, round=self.round, num_samples=hello.num_samples)

    async def _start_barrier(self, hello: Hello) -> None:
        if len(self.participants) >= self.config.min_clients:
            if not self.started.is_set():
                self.round_started_at = time.monotonic()
            self.started.set()
        await self.started.wait()

    def _leave(self, client_id: str) -> None:
        if self.participants.pop(client_id, None) is not None:
            print(f"[server] {client_id} left; {len(self.participants)} connected", flush=True)
            self.metrics.write("leave", client_id=client_id, round=self.round)
            self._maybe_close_round()

    # ------------------------------------------------------------------------------------------ training

    def _check_activations(self, message: Activations) -> None:
        activations = message.tensors["activations"]
        if tuple(activations.shape) != self.manifest.activations_shape:
            raise TrainingError(
                f"activations of shape {activations.shape}, the artifacts say {self.manifest.activations_shape}"
            )
        if not np.all(np.isfinite(activations)):
            raise TrainingError("activations contain NaN or Inf")
        labels = message.tensors["labels"]
        if np.any((labels != -100) & ((labels < 0) | (labels >= self.manifest.vocab_size))):
            raise TrainingError(f"labels outside the vocabulary [0, {self.manifest.vocab_size})")

    async def _train_step(self, client_id: str, message: Activations) -> Gradients:
        self._check_activations(message)
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        loss, grads = await loop.run_in_executor(
            self.executor,
            self.tail.train_step,
            message.tensors["activations"],
            message.tensors["attention_mask"],
            message.tensors["labels"],
            not self.manifest.frozen_head,
        )
        seconds = time.perf_counter() - started
        self.metrics.write("step", client_id=client_id, round=message.round, step=message.step, loss=loss,
                           server_seconds=round(seconds, 6))
        tensors = {} if grads is None else {"activation_grads": grads}
        return Gradients(message.round, message.step, loss, seconds, tensors)

    async def _adapter_update(self, client_id: str, message: AdapterUpdate) -> RoundResult:
        round_index = self.round
        if message.round == round_index and client_id in self.participants:
            self.head.check_adapters(message.tensors)
            self.updates[client_id] = (message.tensors, message.num_samples, message.metrics)
            self.metrics.write("update", client_id=client_id, round=round_index, num_samples=message.num_samples,
                               **{f"client_{k}": v for k, v in message.metrics.items()})
            self._maybe_close_round()
            await self._round_event(round_index).wait()
        # A stale update (the round closed without it) is dropped: the client catches up with the result.
        done = self.round >= self.config.rounds
        return RoundResult(message.round, self.round, done, self.last_eval_loss, self.global_adapters)

    def _round_event(self, round_index: int) -> asyncio.Event:
        return self.round_closed.setdefault(round_index, asyncio.Event())

    def _maybe_close_round(self, deadline_passed: bool = False) -> None:
        if self.finished.is_set() or not self.updates:
            return
        waiting_for = [c for c in self.participants if c not in self.updates]
        enough = len(self.updates) >= self.config.min_clients
        if enough and (not waiting_for or deadline_passed):
            asyncio.get_running_loop().create_task(self._close_round())

    async def _close_round(self) -> None:
        round_index = self.round
        if not self.updates or self._round_event(round_index).is_set() or getattr(self, "_closing", False):
            return
        self._closing = True
        try:
            updates = self.updates
            self.updates = {}
            self.global_adapters = fedavg([(tensors, samples) for tensors, samples, _ in updates.values()])
            loop = asyncio.get_running_loop()
            if self.eval_set is not None:
                self.last_eval_loss = await loop.run_in_executor(self.executor, self.evaluate)
            self.round = round_index + 1
            summary = {
                "round": round_index,
                "clients": sorted(updates),
                "num_samples": {c: n for c, (_, n, _) in updates.items()},
                "eval_loss": self.last_eval_loss,
                "seconds": round(time.monotonic() - self.round_started_at, 3),
                "bytes_received": dict(self.bytes_received),
                "bytes_sent": dict(self.bytes_sent),
                "client_metrics": {c: m for c, (_, _, m) in updates.items()},
            }
            self.metrics.write("round", **summary)
            eval_text = "" if self.last_eval_loss is None else f", eval loss {self.last_eval_loss:.4f}"
            print(f"[server] round {round_index + 1}/{self.config.rounds} closed with {len(updates)} clients"
                  f"{eval_text}", flush=True)
            if self.config.checkpoint_dir is not None:
                tail_state = await loop.run_in_executor(self.executor, self.tail.state_dict)
                save_checkpoint(
                    self.config.checkpoint_dir,
                    Checkpoint(
                        self.round, self.global_adapters, tail_state["lora"], tail_state["optimizer"],
                        {"eval_loss": self.last_eval_loss, "num_samples": summary["num_samples"]},
                        updates={client: tensors for client, (tensors, _, _) in updates.items()},
                    ),
                )
            self.round_started_at = time.monotonic()
        finally:
            self._closing = False
        self._round_event(round_index).set()
        if self.round >= self.config.rounds:
            self.finished.set()

    async def _deadlines(self) -> None:
        while not self.finished.is_set():
            await asyncio.sleep(0.5)
            if self.started.is_set() and time.monotonic() - self.round_started_at > self.config.round_deadline_s:
                self._maybe_close_round(deadline_passed=True)

    def evaluate(self) -> float:
        """Mean loss over the eval set (up to eval_batches batches) with the global adapters."""
        encoded = self.eval_set
        batch = self.manifest.batch_size
        total, tokens = 0.0, 0
        count = min(len(encoded.input_ids), batch * self.config.eval_batches)
        for start in range(0, count, batch):
            index = np.arange(start, start + batch) % len(encoded.input_ids)
            ids, mask, labels = encoded.input_ids[index], encoded.attention_mask[index], encoded.labels[index]
            if start + batch > count:  # wrapped rows fill the batch but must not count twice
                labels = labels.copy()
                labels[count - start:] = -100
            activations = self.head.forward(ids, mask, self.global_adapters).activations
            loss, counted = self.tail.eval_loss(activations, mask, labels)
            total += loss * counted
            tokens += counted
        return total / max(tokens, 1)


class _Refused(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def _encode_error(code: str, reason: str) -> bytes:
    from edge_client.protocol import encode

    return encode(Error(code, reason))


def run_server(config: ServerConfig) -> Server:
    server = Server(config)
    asyncio.run(server.serve())
    return server
