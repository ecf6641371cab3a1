"""N tail workers as torch.distributed ranks: one step of the tail computed by all of them, in lockstep.

`edgesplit serve --workers N` (or `torchrun --nproc-per-node N -m edgesplit serve ...`; scaleout.py starts
the ranks). Rank 0 is the front door: the websocket server, the round engine and the strategy, unchanged,
with a `DistributedTailWorker` as their tail worker. Ranks 1..N-1 each hold a replica of the tail and run
`serve_rank`: they wait for rank 0's commands and do their share.

One step, for a batch of clients' steps that the front door gathered as the batching worker does:

    rank 0   broadcast ("step", cut, train_head, N)      N: the batch's target tokens, all clients together
    rank 0   scatter the clients' steps: rank r gets its contiguous share (none when there are fewer than ranks)
    each     forward and backward of J_r = sum of its clients' summed token losses / N
    each     all-reduce (sum) of its LoRA gradients, its J_r and a "could not" flag: sum_r dJ_r = dJ
    each     if all is finite: the same AdamW step on the same gradient (the replicas stay equal)
    rank 0   gather each client's loss and d its loss / d its activations: (N / n_i) dJ_r / dx_i

J is Tail.train_batch's loss over the same clients (the token-weighted mean), so N ranks take the step one
worker takes with the same batch, up to the order of floating-point sums. A share that fails (a loss or
gradient not finite, an error) sets the flag, every rank sees it after the all-reduce, none applies anything,
and the batching worker runs the steps again one at a time, as it does for one worker.

Other work (aggregation, evaluation, checkpoint) runs on rank 0 alone; rank 0's tail is the reference, and
its state (LoRA and AdamW moments) goes to the replicas before the next step after it ("sync"). Whenever a
few seconds pass without a step (idle, or busy evaluating), a thread of rank 0 sends a "ping", so that each
collective can have a timeout: a rank that dies or stops answering ends the run with one line saying so
(`on_lost`), and the other ranks stop.

The control messages go over a gloo group (pickled Python objects on the CPU); the gradients over the
default group: NCCL between GPUs, gloo on the CPU.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from edgesplit.errors import EdgesplitError, TrainingError
from edgesplit.server.batching import BatchingTailWorker
from edgesplit.server.strategies.base import StepOutcome
from edgesplit.server.tail import Tail

Step = Mapping[str, np.ndarray]  # activations (B, T, H), attention_mask (B, T), labels (B, T)
ShareResult = list[tuple[float, np.ndarray | None]]


def target_tokens(labels: np.ndarray) -> int:
    """The tokens a step's loss counts: labels[:, 1:] that are not -100 (causal_lm_loss's shift)."""
    return int((np.asarray(labels)[:, 1:] != -100).sum())


def shares(steps: Sequence[Step], ranks: int) -> list[list[Step]]:
    """The steps split into `ranks` contiguous shares, as even as can be; the first ranks take the extra."""
    size, extra = divmod(len(steps), ranks)
    bounds = list(itertools.accumulate([0] + [size + (1 if r < extra else 0) for r in range(ranks)]))
    return [list(steps[start:end]) for start, end in itertools.pairwise(bounds)]


def share_step(
    tail: Tail, steps: Sequence[Step], total_tokens: int, train_head: bool, from_layer: int | None, group: Any
) -> ShareResult:
    """This rank's part of one distributed step (module docstring); every rank of `group` calls it together.
    TrainingError on every rank, nothing applied, if any rank's share failed or was not finite."""
    if tail.optimizer is not None:
        tail.optimizer.zero_grad(set_to_none=True)
    failed, local_error = 0.0, ""
    share = torch.zeros((), device=tail.device)
    inputs: torch.Tensor | None = None
    sums: list[torch.Tensor] = []
    counts: list[int] = []
    sizes = [len(step["activations"]) for step in steps]
    if steps:
        try:
            keys = ("activations", "attention_mask", "labels")
            parts = [np.concatenate([step[key] for step in steps]) for key in keys]
            inputs, mask, target = tail._tensors(*parts)  # the Tail's own conversion, onto its device
            inputs.requires_grad_(train_head)
            logits = tail._logits(inputs, mask, from_layer)
            shifted = target[:, 1:]
            token_losses = torch.nn.functional.cross_entropy(
                logits[:, :-1, :].reshape(-1, logits.shape[-1]).float(),
                shifted.reshape(-1),
                ignore_index=-100,
                reduction="none",
            ).view(shifted.shape)  # (sum B_i, T-1), as Tail.train_batch computes it
            bounds = list(itertools.pairwise(np.cumsum([0, *sizes])))
            sums = [token_losses[start:end].sum() for start, end in bounds]
            counts = [int((shifted[start:end] != -100).sum()) for start, end in bounds]
            share = torch.stack(sums).sum() / total_tokens
            share.backward()  # type: ignore[no-untyped-call]
            if inputs.grad is not None and not bool(torch.isfinite(inputs.grad).all()):
                failed, local_error = 1.0, "its activations' gradients are not finite"
        except Exception as error:  # said on every rank through the flag; the batch then runs one step at a time
            failed, local_error = 1.0, f"{type(error).__name__}: {error}"
    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for p in tail.parameters]
    extra = torch.stack([share.detach().float(), torch.tensor(failed, device=tail.device)])
    flat = torch.cat([*(g.reshape(-1).float() for g in gradients), extra])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    if flat[-1] > 0 or not bool(torch.isfinite(flat).all()):
        if tail.optimizer is not None:
            tail.optimizer.zero_grad(set_to_none=True)
        because = f" ({local_error})" if local_error else ""
        raise TrainingError(f"a distributed step's loss or gradients are not finite{because}; it was not applied")
    offset = 0
    for parameter in tail.parameters:
        count = parameter.numel()
        parameter.grad = flat[offset : offset + count].view_as(parameter).to(parameter.dtype)
        offset += count
    if tail.optimizer is not None:
        tail.optimizer.step()
    own = inputs.grad.cpu().numpy() if train_head and inputs is not None and inputs.grad is not None else None
    results: ShareResult = []
    for (start, end), summed, count in zip(itertools.pairwise(np.cumsum([0, *sizes])), sums, counts, strict=True):
        grads = None if own is None else own[start:end] * np.float32(total_tokens / count)
        results.append((float(summed.detach()) / count, grads))
    return results


def first_sentence(error: BaseException) -> str:
    """A collective's error, said in a line: gloo's "[.../pair.cc:553] Connection closed by peer [addr]. This is
    typically ..." -> "Connection closed by peer [addr]"."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0] if str(error).strip() else "")
    return (text.split(". ")[0] or type(error).__name__)[:200]


def _on_cpu(value: Any) -> Any:
    """A state dict with every tensor on the CPU, to pickle for another rank (its load puts them on its device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_on_cpu(item) for item in value]
    return value


class RankGroup:
    """The process groups of a run: `control` (gloo, for commands and tensors as Python objects) and
    `gradients` (the default group: NCCL between GPUs, gloo on the CPU)."""

    def __init__(self, control: Any, gradients: Any) -> None:
        self.control = control
        self.gradients = gradients
        self.rank = dist.get_rank()
        self.size = dist.get_world_size()

    def command(self, message: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
        """Rank 0 sends `message` to every rank; the others receive it."""
        box: list[Any] = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return tuple(box[0])

    def scatter(self, parts: list[Any] | None) -> Any:
        box: list[Any] = [None]
        dist.scatter_object_list(box, parts if self.rank == 0 else None, src=0, group=self.control)
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0, group=self.control)
        return out


class DistributedTailWorker(BatchingTailWorker):
    """Rank 0's tail worker: gathers steps as BatchingTailWorker does, and runs each batch across the ranks.
    `stats.rank_busy_seconds[r]`: the seconds rank r spent on its shares, for the metrics endpoint."""

    def __init__(
        self,
        tail: Tail,
        train_head: bool,
        group: RankGroup,
        max_batch_clients: int,
        window_s: float,
        heartbeat_s: float = 5.0,
    ) -> None:
        self.tail = tail
        self.train_head = train_head
        self.group = group
        self.synced = False  # whether the replicas hold rank 0's tail state
        self.lost: str | None = None  # why the ranks can no longer be reached, once they cannot
        self.on_lost: Callable[[str], None] | None = None  # told once, on the worker or the pinging thread
        self.heartbeat_s = heartbeat_s
        self._wire = threading.Lock()  # one exchange with the ranks at a time: a step's, or a ping
        self._closing = threading.Event()
        self._last_exchange = time.monotonic()
        super().__init__(self._step, self._batch, max_batch_clients, window_s)
        self.stats.rank_busy_seconds = [0.0] * group.size
        self._pinger = threading.Thread(target=self._ping, name="tail-ranks-ping", daemon=True)
        self._pinger.start()

    def _step(self, tensors: Step, cut_layer: int | None) -> StepOutcome:
        return self._batch([tensors], cut_layer)[0]

    def _batch(self, steps: Sequence[Step], cut_layer: int | None) -> list[StepOutcome]:
        if self.lost is not None:
            raise EdgesplitError(self.lost)
        counts = [target_tokens(step["labels"]) for step in steps]
        if min(counts) == 0:
            raise TrainingError("a batched step has no target token: its loss is not defined; nothing was applied")
        total = sum(counts)
        with self._wire:
            return self._exchange(steps, cut_layer, total)

    def _exchange(self, steps: Sequence[Step], cut_layer: int | None, total: int) -> list[StepOutcome]:
        """One step across the ranks (the module docstring's protocol), under the wire lock."""
        if self.lost is not None:
            raise EdgesplitError(self.lost)
        try:
            if not self.synced:
                self.group.command(("sync", _on_cpu(self.tail.state_dict())))
                self.synced = True
            self.group.command(("step", cut_layer, self.train_head, total))
            mine = self.group.scatter(shares(steps, self.group.size))
            started = time.perf_counter()
            results = share_step(self.tail, mine, total, self.train_head, cut_layer, self.group.gradients)
            busy = time.perf_counter() - started
            gathered = self.group.gather((results, busy))
        except TrainingError:
            raise  # every rank raised it after the all-reduce: nothing applied anywhere, the ranks still in step
        except Exception as error:  # a collective failed or timed out: a rank is gone
            raise EdgesplitError(self._lose(error)) from None
        finally:
            self._last_exchange = time.monotonic()
        assert gathered is not None
        outcomes: list[StepOutcome] = []
        for rank, (rank_results, rank_busy) in enumerate(gathered):
            self.stats.rank_busy_seconds[rank] += rank_busy
            outcomes.extend(StepOutcome(loss, grads) for loss, grads in rank_results)
        return outcomes

    def _run_work(self, item: Any, started: float) -> None:
        super()._run_work(item, started)
        self.synced = False  # the work may have changed rank 0's tail (a mixed-cut aggregation, a resume)

    def _ping(self) -> None:
        """On a thread of its own: a ping to the ranks whenever heartbeat_s pass without an exchange, so that
        their waits (and rank 0's) can time out, idle or not (an evaluation on rank 0 may take minutes)."""
        while not self._closing.wait(self.heartbeat_s / 2):
            with self._wire:
                quiet = time.monotonic() - self._last_exchange >= self.heartbeat_s
                if self.lost is not None or self._closing.is_set() or not quiet:
                    continue
                self._last_exchange = time.monotonic()
                try:
                    self.group.command(("ping",))
                except Exception as error:
                    self._lose(error)

    def _lose(self, error: BaseException) -> str:
        if self.lost is None:
            self.lost = (
                f"a tail worker rank stopped answering ({first_sentence(error)}); its own output says why. The "
                "run cannot go on without it: restart the server (it resumes from --checkpoint-dir)"
            )
            if self.on_lost is not None:
                self.on_lost(self.lost)
        return self.lost

    def close(self) -> None:
        super().close()
        self._closing.set()
        self._pinger.join()
        if self.lost is None:
            try:
                self.group.command(("stop",))
            except Exception as error:
                self._lose(error)
        dist.destroy_process_group()


def serve_rank(tail: Tail, group: RankGroup, say: Callable[[str], None]) -> int:
    """A rank other than 0: its share of each step until rank 0 says stop (0) or cannot be heard (1)."""
    while True:
        try:
            command = group.command()
        except Exception as error:
            say(f"lost rank 0 ({first_sentence(error)}); stopping")
            return 1
        kind = command[0]
        if kind == "stop":
            dist.destroy_process_group()
            return 0
        if kind == "sync":
            tail.load_state_dict(command[1])
        elif kind == "step":
            _, cut_layer, train_head, total = command
            try:
                mine = group.scatter(None)
                started = time.perf_counter()
                try:
                    results = share_step(tail, mine, total, train_head, cut_layer, group.gradients)
                except TrainingError:
                    continue  # every rank saw it; rank 0 runs the steps again one at a time
                group.gather((results, time.perf_counter() - started))
            except Exception as error:
                say(f"lost the other ranks mid-step ({first_sentence(error)}); stopping")
                return 1
