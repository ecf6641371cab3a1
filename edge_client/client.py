"""The edge client: trains the head's LoRA adapters with ONNX Runtime and numpy, against a cloud server.

One step, with the phases the metrics time:

    batch (B, T) ─ head_forward ─> activations (B, T, H) ─ encode ─> [network] ─> server: tail, loss, step
    adapters <─ optimizer <─ grad_graph <─ activation_grads (B, T, H) <─ decode <─ [network] <─┘

Everything that can be checked before connecting is checked first (artifacts, data, tokenizer), so that a
bad file never costs the server a half-finished client. Blocking compute runs off the event loop, so the
websocket answers pings while a slow device works.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_client.data import Batch, encode_examples, iterate_batches, read_jsonl
from edge_client.energy import EnergyReader, detect_energy_reader
from edge_client.errors import EdgesplitError, ProtocolError
from edge_client.head import Head
from edge_client.metrics import JsonlWriter
from edge_client.optim import AdamW
from edge_client.protocol import (
    PROTOCOL_VERSION,
    Activations,
    AdapterUpdate,
    Error,
    Gradients,
    Hello,
    Message,
    Role,
    RoundResult,
    Session,
    Welcome,
    Wire,
)
from edge_client.resources import MemorySampler, PhaseTimer


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
    device_profile: str | None = None
    ca_file: Path | None = None
    quiet: bool = False
    connect_timeout_s: float = 60.0


class ServerRefused(EdgesplitError):
    """The server ended the session with an Error message."""


class Client:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.head = Head(config.artifacts, threads=config.threads or None)
        manifest = self.head.manifest
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(config.artifacts / "tokenizer.json"))
        examples = read_jsonl(config.data)
        self.encoded = encode_examples(
            tokenizer, examples, manifest.max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
        )
        self.num_samples = len(examples)
        self.metrics = JsonlWriter(config.metrics_out)
        self.timer = PhaseTimer()
        self.memory = MemorySampler(interval_ms=10)
        self.energy: EnergyReader = detect_energy_reader(config.device_profile)
        self.adapters: dict[str, np.ndarray] = self.head.initial_adapters()
        self.optimizer: AdamW | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.steps_done = 0
        self.losses: list[float] = []

    def log(self, text: str) -> None:
        if not self.config.quiet:
            print(f"[{self.config.client_id}] {text}", flush=True)

    def batches(self, seed: int) -> Iterator[Batch]:
        return iterate_batches(self.encoded, self.head.manifest.batch_size, seed=seed)

    # ------------------------------------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        from websockets.asyncio.client import connect

        ssl_context = None
        if self.config.server.startswith("wss://"):
            import ssl

            ssl_context = ssl.create_default_context(cafile=str(self.config.ca_file) if self.config.ca_file else None)
        self.memory.start()
        self.energy.start()
        started = time.perf_counter()
        try:
            websocket = await self._connect(connect, ssl_context)
            async with websocket:
                summary = await self._train(websocket)
        finally:
            self.memory.stop()
            self.energy.stop()
        summary["seconds"] = time.perf_counter() - started
        summary.update(self._resource_summary())
        self.metrics.write("summary", client_id=self.config.client_id, **summary)
        self.metrics.close()
        return summary

    async def _connect(self, connect: Any, ssl_context: Any) -> Any:
        """Connect, retrying with capped exponential backoff and jitter while the server is not up yet."""
        import random

        deadline = time.monotonic() + self.config.connect_timeout_s
        delay = 0.5
        while True:
            try:
                return await connect(
                    self.config.server,
                    max_size=self._max_frame_bytes(),
                    compression=None,  # tensors do not deflate; compressing them costs CPU for nothing
                    ping_interval=20,
                    ping_timeout=120,  # a step on a slow device can take seconds; pings are answered anyway
                    open_timeout=30,
                    ssl=ssl_context,
                )
            except OSError as error:
                if time.monotonic() + delay > deadline:
                    raise EdgesplitError(f"cannot reach the server at {self.config.server}: {error}") from error
                self.log(f"server not reachable ({error}); retrying in {delay:.1f} s")
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, 10.0)

    def _max_frame_bytes(self) -> int:
        manifest = self.head.manifest
        adapters = sum(int(np.prod(s)) * 4 for s in manifest.lora.matrices.values())
        return max(int(np.prod(manifest.activations_shape)) * 4, adapters) + (1 << 20)

    async def _exchange(self, websocket: Any, session: Session, message: Message, wire: Wire) -> Message:
        frame = session.send(message, wire)
        with self.timer.phase("network"):
            await websocket.send(frame)
            reply = await websocket.recv()
        if isinstance(reply, str):
            raise ProtocolError("the server sent a text frame", 1003)
        self.bytes_up += len(frame)
        self.bytes_down += len(reply)
        with self.timer.phase("decode"):
            answer = session.receive(reply)
        if isinstance(answer, Error):
            raise ServerRefused(f"the server refused: {answer.message} ({answer.code})")
        return answer

    async def _train(self, websocket: Any) -> dict[str, Any]:
        session = Session(Role.CLIENT, max_size=self._max_frame_bytes())
        hello = Hello(self.config.client_id, PROTOCOL_VERSION, self.head.manifest.manifest_hash,
                      self.config.token, self.num_samples)
        self.log(f"connecting to {self.config.server} with {self.num_samples} examples")
        welcome = await self._exchange(websocket, session, hello, Wire.FP32)
        assert isinstance(welcome, Welcome)
        settings = welcome.settings
        wire = Wire(str(settings["wire"]))
        steps_per_round = int(settings["steps_per_round"])  # type: ignore[call-overload]
        self._set_adapters(welcome.tensors)
        self.optimizer = AdamW(self.adapters, lr=float(settings["learning_rate"]),  # type: ignore[arg-type]
                               weight_decay=float(settings.get("weight_decay", 0.0)))  # type: ignore[arg-type]
        batches = self.batches(seed=int(settings.get("seed", 0)) + self.config.seed)  # type: ignore[call-overload]
        round_index = welcome.round
        self.log(f"joined at round {round_index + 1}/{welcome.total_rounds}: {steps_per_round} steps a round, "
                 f"wire {wire.value}")
        loop = asyncio.get_running_loop()
        while True:
            round_losses = []
            for step in range(steps_per_round):
                loss = await self._step(websocket, session, loop, next(batches), round_index, step, wire)
                round_losses.append(loss)
            update = AdapterUpdate(round_index, self.num_samples, self.adapters,
                                   {"mean_loss": float(np.mean(round_losses)), "steps": float(steps_per_round)})
            result = await self._exchange(websocket, session, update, Wire.FP32)
            assert isinstance(result, RoundResult)
            self._set_adapters(result.tensors)
            eval_text = "" if result.eval_loss is None else f", eval loss {result.eval_loss:.4f}"
            self.log(f"round {round_index + 1} done: mean loss {np.mean(round_losses):.4f}{eval_text}")
            self.metrics.write("round", client_id=self.config.client_id, round=round_index,
                               mean_loss=float(np.mean(round_losses)), eval_loss=result.eval_loss)
            if result.done:
                break
            round_index = result.next_round
        return {"rounds": round_index + 1, "steps": self.steps_done, "final_loss": self.losses[-1],
                "first_loss": self.losses[0], "bytes_up": self.bytes_up, "bytes_down": self.bytes_down}

    def _set_adapters(self, tensors: dict[str, np.ndarray]) -> None:
        """Take new global adapters in place: the optimiser holds references to these arrays."""
        self.head.check_adapters(tensors)
        for name, value in tensors.items():
            self.adapters[name][...] = value

    async def _step(self, websocket: Any, session: Session, loop: asyncio.AbstractEventLoop, batch: Batch,
                    round_index: int, step: int, wire: Wire) -> float:
        up_before, down_before = self.bytes_up, self.bytes_down
        energy_before = self.energy.read_joules()
        with self.timer.phase("head_forward"), self.memory.phase("head_forward"):
            forward = await loop.run_in_executor(
                None, self.head.forward, batch.input_ids, batch.attention_mask, self.adapters
            )
        with self.timer.phase("encode"):
            message = Activations(round_index, step, {"activations": forward.activations,
                                                      "attention_mask": batch.attention_mask,
                                                      "labels": batch.labels})
        waited = time.perf_counter()
        gradients = await self._exchange(websocket, session, message, wire)
        waited = time.perf_counter() - waited
        assert isinstance(gradients, Gradients)
        if self.head.trainable:
            with self.timer.phase("grad_graph"), self.memory.phase("grad_graph"):
                grads = await loop.run_in_executor(
                    None, self.head.backward, forward, gradients.tensors["activation_grads"]
                )
            with self.timer.phase("optimizer"):
                assert self.optimizer is not None
                self.optimizer.step(grads)
        del forward
        phases = self.timer.step_done()
        # The wait for the reply holds the server's compute; what is left of it is the network.
        phases["server_compute"] = gradients.server_seconds
        phases["network"] = max(phases.get("network", 0.0) - gradients.server_seconds, 0.0)
        self.steps_done += 1
        self.losses.append(gradients.loss)
        self.metrics.write(
            "step", client_id=self.config.client_id, round=round_index, step=step, loss=gradients.loss,
            bytes_up=self.bytes_up - up_before, bytes_down=self.bytes_down - down_before,
            seconds={k: round(v, 6) for k, v in phases.items()}, wait_seconds=round(waited, 6),
            energy_j=round(self.energy.read_joules() - energy_before, 6),
        )
        self.log(f"round {round_index + 1} step {step + 1}: loss {gradients.loss:.4f}, "
                 f"{sum(phases.values()) * 1000:.0f} ms")
        return gradients.loss

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


def run_client(config: ClientConfig) -> dict[str, Any]:
    client = Client(config)
    try:
        return asyncio.run(client.run())
    except OSError as error:
        raise EdgesplitError(f"cannot reach the server at {config.server}: {error}") from error


def main_summary(summary: dict[str, Any]) -> str:
    return (f"trained {summary['steps']} steps in {summary['rounds']} rounds: loss {summary['first_loss']:.4f} -> "
            f"{summary['final_loss']:.4f}; {summary['bytes_up'] / 1e6:.1f} MB up, "
            f"{summary['bytes_down'] / 1e6:.1f} MB down; peak RSS {summary['peak_rss_mb']:.0f} MB; "
            f"energy {summary['energy_j']:.1f} J ({summary['energy_method']}, {summary['energy_source']})")


if __name__ == "__main__":
    sys.exit("use `edgesplit client`")
