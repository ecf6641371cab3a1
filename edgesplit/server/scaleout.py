"""Starting the tail worker ranks of `edgesplit serve --workers N`, or joining those torchrun started.

    edgesplit serve --workers 2 ...                           this process is rank 0 and starts ranks 1..N-1
                                                              itself, with env:// on a free loopback port
    torchrun --nproc-per-node 2 -m edgesplit serve ...        torchrun starts every rank (RANK, WORLD_SIZE,
                                                              MASTER_ADDR, MASTER_PORT in the environment),
                                                              on one machine or several

Each rank runs the same command line. Rank 0 serves the devices (the one address they know) and is the
front door of distributed.py; the others load a replica of the tail and wait for it. One rank per GPU with
--device cuda (rank r on cuda:LOCAL_RANK), NCCL between them; gloo on the CPU.

The settings are checked before anything loads: --workers must be at least 1, the framework must have a
server tail (split), there must be a GPU per local rank, and under torchrun --workers, if given, must be
the world's size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from edgesplit.client.artifacts import load_manifest
from edgesplit.errors import EdgesplitError
from edgesplit.server.batching import BatchingTailWorker, build_worker
from edgesplit.server.config import ServerConfig
from edgesplit.server.workers import ThreadTailWorker

MEETING_TIMEOUT = timedelta(minutes=10)  # how long the ranks wait for each other to start


@dataclass(frozen=True)
class WorkerPlan:
    """This process's place among the ranks: `spawn` when it is rank 0 of --workers and starts the others."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    spawn: bool = False

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> str:
        """For the server's placement line: empty with one worker."""
        return f", {self.size} worker ranks (this one rank {self.rank})" if self.distributed else ""


def plan_workers(config: ServerConfig, environ: dict[str, str] | None = None) -> WorkerPlan:
    """Where this process stands (the environment torchrun sets, or --workers), checked before anything loads."""
    env = dict(os.environ if environ is None else environ)
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun, or a rank that --workers started
        try:
            size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            local_rank = int(env.get("LOCAL_RANK", rank))
        except ValueError:
            raise EdgesplitError("RANK, WORLD_SIZE and LOCAL_RANK in the environment must be whole numbers") from None
        if config.workers not in (1, size):
            raise EdgesplitError(
                f"--workers {config.workers} under torchrun, which started {size} ranks: leave --workers out "
                "(torchrun's --nproc-per-node and --nnodes decide), or make them agree"
            )
        plan = WorkerPlan(rank, size, local_rank, spawn=False)
    else:
        plan = WorkerPlan(0, config.workers, 0, spawn=config.workers > 1)
    if plan.distributed and config.framework != "split":
        raise EdgesplitError(f"--framework {config.framework} has no server tail to spread over {plan.size} ranks")
    if plan.distributed:
        check_u_shaped(config, plan)
        check_devices(config, plan)
    return plan


def check_u_shaped(config: ServerConfig, plan: WorkerPlan) -> None:
    """The ranks all-reduce whole tail steps, which need the labels; a U-shaped export keeps them on the device."""
    try:
        u_shaped = load_manifest(config.artifacts, verify=False).u_shaped
    except EdgesplitError:
        return  # the server's own loading says what is wrong with the artifacts
    if u_shaped:
        raise EdgesplitError(
            f"{config.artifacts} is a U-shaped export (--top-layers): its middle steps have no labels for "
            f"{plan.size} worker ranks to share; serve it with one worker (leave --workers out)"
        )


def check_devices(config: ServerConfig, plan: WorkerPlan) -> None:
    """One GPU per local rank with --device cuda (or auto on a machine with GPUs); CPU ranks need nothing."""
    import torch

    if config.device.startswith("cuda:"):
        raise EdgesplitError(
            f"--device {config.device} with several workers: each rank takes its own GPU (rank r on cuda:r); "
            "use --device cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs"
        )
    gpus = torch.cuda.device_count() if config.device in ("cuda", "auto") else 0
    wanted = plan.size if plan.spawn else plan.local_rank + 1  # torchrun: this machine's ranks, up to this one
    if (config.device == "cuda" or gpus > 0) and wanted > gpus:
        instead = f"--workers {gpus} or fewer, or --device cpu" if gpus else "--device cpu"
        raise EdgesplitError(
            f"{plan.size} workers with --device {config.device} need a GPU each; this machine shows {gpus}: "
            f"use {instead}"
        )


def worker_warning(config: ServerConfig, plan: WorkerPlan) -> str | None:
    """A setting that runs but wastes the ranks: batches smaller than the ranks leave some of them idle."""
    if plan.distributed and config.max_batch_clients < plan.size:
        return (
            f"{plan.size} worker ranks share batches of at most --max-batch-clients {config.max_batch_clients} "
            f"steps: some ranks wait through every step; use --max-batch-clients {plan.size} or more"
        )
    return None


def rank_config(config: ServerConfig, plan: WorkerPlan) -> ServerConfig:
    """The configuration as this rank runs it: on its own GPU where the tail runs on GPUs."""
    if not plan.distributed:
        return config
    import torch

    on_gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return dataclasses.replace(config, device=f"cuda:{plan.local_rank}" if on_gpu else "cpu")


def free_port() -> int:
    """A port free on every interface (rank 0's store listens on all of them), for the ranks to meet at."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def worker_ranks(config: ServerConfig, plan: WorkerPlan, argv: Sequence[str], output: Any = None) -> Iterator[Any]:
    """Start the other ranks if this process is to (--workers), join the process group, and yield its
    RankGroup (None with one worker); on the way out, wait for the ranks started here (or stop them).
    `config` is this rank's (rank_config); `argv`: the serve command line the other ranks run too; `output`:
    where the ranks started here write (default: this process's stdout)."""
    if not plan.distributed:
        yield None
        return
    import torch.distributed as dist

    from edgesplit.server.distributed import RankGroup

    children: list[subprocess.Popen[bytes]] = []
    joined = threading.Event()
    backend = "nccl" if config.device.startswith("cuda") else "gloo"  # config: rank_config's, this rank's device
    timeout = timedelta(seconds=config.worker_timeout_s)
    # The ranks' meeting may wait for slow starts (imports on a loaded machine, another node booting); the
    # groups the run uses time out after --worker-timeout.
    meeting = max(timeout, MEETING_TIMEOUT)
    if plan.spawn:
        environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(plan.size)}
        os.environ.update({**environment, "RANK": "0", "LOCAL_RANK": "0"})
        for rank in range(1, plan.size):
            env = {**os.environ, **environment, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            command = [sys.executable, "-m", "edgesplit", "serve", *argv]
            children.append(subprocess.Popen(command, env=env, stdout=output))
        threading.Thread(target=_watch_start, args=(children, joined), daemon=True).start()
    try:
        if backend == "nccl":
            import torch

            torch.cuda.set_device(config.device)  # before NCCL's communicators: this rank's GPU, not GPU 0
        # MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE: torchrun's, or those set above
        dist.init_process_group(backend, init_method="env://", timeout=meeting)
        joined.set()
        control = dist.new_group(backend="gloo", timeout=timeout)
        gradients = dist.new_group(backend=backend, timeout=timeout) if backend == "nccl" else control
        yield RankGroup(control, gradients)
    except BaseException:
        for child in children:  # rank 0 failed: the ranks it started go with it
            child.terminate()
        raise
    finally:
        joined.set()
        for child in children:
            try:
                child.wait(timeout=config.worker_timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()


def _watch_start(children: list[subprocess.Popen[bytes]], joined: threading.Event) -> None:
    """A rank started here that exits before the ranks have joined (rank 0 would wait --worker-timeout for
    it) ends the run at once, saying so."""
    while not joined.wait(0.5):
        for rank, child in enumerate(children, start=1):
            code = child.poll()
            if code is not None:
                print(f"[server] tail worker rank {rank} exited with code {code} before the ranks joined", flush=True)
                for other in children:
                    other.terminate()
                os._exit(1)


def serve_worker_rank(config: ServerConfig, plan: WorkerPlan, group: Any) -> int:
    """A rank other than 0: a replica of the tail, built as the split strategy builds rank 0's, serving shares."""
    from edgesplit.server.distributed import serve_rank
    from edgesplit.server.strategies.split import build_tail

    tail = build_tail(config.strategy_options())

    def say(text: str) -> None:
        print(f"[worker {plan.rank}] {text}", flush=True)

    say(f"tail replica on {tail.placement.describe()}, serving rank 0")
    return serve_rank(tail, group, say)


def build_tail_worker(strategy: Any, config: ServerConfig, ranks: Any = None) -> ThreadTailWorker | BatchingTailWorker:
    """The server's tail worker: across the ranks (`ranks`, the RankGroup worker_ranks gave) when this process
    is rank 0 of several, else build_worker's."""
    if ranks is None:
        return build_worker(strategy, config.max_batch_clients, config.batch_window_ms / 1000)
    from edgesplit.server.distributed import DistributedTailWorker

    tail = getattr(strategy, "tail", None)
    if tail is None:  # ServerConfig refuses --workers for these frameworks; torchrun may still start them
        raise EdgesplitError(f"--framework {config.framework} has no server tail to spread over worker ranks")
    window, heartbeat = config.batch_window_ms / 1000, min(5.0, config.worker_timeout_s / 4)
    train_head = not strategy.manifest.frozen_head
    return DistributedTailWorker(tail, train_head, ranks, config.max_batch_clients, window, heartbeat)


def on_worker_lost(worker: Any, end_run: Callable[[str], None]) -> None:
    """Have `end_run(reason)` called on the running event loop if the worker's ranks are lost (a no-op for
    a worker of one process)."""
    import asyncio

    if hasattr(worker, "on_lost"):
        loop = asyncio.get_running_loop()
        worker.on_lost = lambda reason: loop.call_soon_threadsafe(end_run, reason)
        if worker.lost is not None:  # lost before the server was listening
            loop.call_soon(end_run, worker.lost)
