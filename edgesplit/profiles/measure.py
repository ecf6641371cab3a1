"""The split-point profiler's measurements on this machine: the bytes of one step's frames, the exports of
every cut (in parallel processes), the torch-free worker that times each cut's client (edgesplit/profiles/
worker.py, run in a fresh interpreter), and the server's tail step. The sweep (splitpoint.py) runs them in
that order.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.client.protocol import Activations, Gradients, Wire, encode, tensor_nbytes_on_wire
from edgesplit.profiles.records import DEFAULT_MAX_CUT, ProfilingError, SweepConfig, WireBytes
from edgesplit.profiles.worker import REFERENCE_GFLOPS, benchmark_round

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(f"[edgesplit] {message}", file=sys.stderr, flush=True)


def wire_bytes(
    batch_size: int,
    seq_len: int,
    hidden_size: int,
    wire: Wire,
    trainable: bool = True,
    real_tokens: float = 1.0,
) -> WireBytes:
    """Bytes of one step's frames, from frames encoded for real (the metadata's size is what it is).

    `real_tokens`: the fraction of the B x T positions that are tokens rather than padding. Only int4k's
    size depends on it (it leaves padding rows out: a bitmap bit each, and their int64 mask and labels);
    the profile's sweep has no data set and takes 1, every position a token, the most int4k sends."""
    if not 0.0 <= real_tokens <= 1.0:
        raise ProfilingError(f"the fraction of real tokens is between 0 and 1, got {real_tokens}")
    rng = np.random.default_rng(0)
    activations = rng.standard_normal((batch_size, seq_len, hidden_size)).astype(np.float32)  # (B, T, H)
    real = round(batch_size * seq_len * real_tokens)
    tokens = (np.arange(batch_size * seq_len) < real).astype(np.int64).reshape(batch_size, seq_len)  # (B, T)
    activations[tokens == 0] = 0  # padding, zeroed by both sides under int4k
    up = Activations(0, 0, {"activations": activations, "attention_mask": tokens, "labels": tokens})
    down = Gradients(0, 0, 2.5, 0.1, {"activation_grads": activations} if trainable else {})
    float_bytes = tensor_nbytes_on_wire(activations.shape, np.float32, wire, rows_sent=real)
    int_bytes = tensor_nbytes_on_wire(tokens.shape, np.int64, wire)
    return WireBytes(
        upload=len(encode(up, wire)),
        download=len(encode(down, wire)),
        upload_payload=float_bytes + 2 * int_bytes,
        download_payload=float_bytes if trainable else 0,
    )


def run_worker(arguments: list[str]) -> dict[str, Any]:
    """Run edgesplit/profiles/worker.py in a fresh interpreter and return the JSON it prints."""
    command = [sys.executable, "-m", "edgesplit.profiles.worker", *arguments]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ProfilingError(
            f"`{' '.join(command)}` failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@dataclass(frozen=True)
class ModelInfo:
    source: str
    family: str
    num_layers: int
    hidden_size: int


# The model inside an export process (see export_cuts), or why it could not be loaded; None elsewhere.
_PROCESS_MODEL: Any = None
_PROCESS_ERROR: BaseException | None = None


def _load_in_process(model: str, threads: int) -> None:
    """Export-process initializer: load the model once for every cut this process will export. A failure is
    kept for the tasks to raise: an initializer that raises only breaks the pool, losing the message."""
    global _PROCESS_MODEL, _PROCESS_ERROR
    import torch

    from edgesplit.export.models import load_model

    torch.set_num_threads(threads)  # the processes share the cores: no oversubscription
    try:
        _PROCESS_MODEL = load_model(model)
    except Exception as error:
        _PROCESS_ERROR = error


def _process_model(loaded: Any) -> Any:
    if loaded is not None:
        return loaded
    if _PROCESS_ERROR is not None:
        raise _PROCESS_ERROR
    return _PROCESS_MODEL


def _describe(loaded: Any = None) -> ModelInfo:
    from edgesplit.export.families import family_for

    loaded = _process_model(loaded)
    family = family_for(loaded.model)
    num_layers = family.num_layers(loaded.model)
    return ModelInfo(loaded.source, family.name, num_layers, int(loaded.model.config.hidden_size))


def _export_cut(settings: dict[str, Any], loaded: Any = None) -> float:
    """Export one cut (ExportConfig keyword arguments); seconds it took."""
    from edgesplit.export.exporter import ExportConfig, export

    started = time.perf_counter()
    export(ExportConfig(**settings), loaded=_process_model(loaded))
    return time.perf_counter() - started


def export_cuts(
    config: SweepConfig, work: Path, loaded: Any = None, cores: int = 1, log: Log = _log
) -> tuple[ModelInfo, tuple[int, ...], dict[int, float], dict[str, float]]:
    """Export every cut of `config` under `work` (cut-<k>/); returns the model, the cuts, each cut's export
    seconds and the phase seconds (load, export).

    An export is mostly single-threaded Python (tracing, torch.export, the ONNX optimiser), so with
    `config.export_jobs` > 1 the cuts are shared out between that many processes, each loading the model once,
    biggest cut first so that the processes finish together. With one job, or a model already `loaded`, the
    cuts are exported one after another in this process, as they are when an export process dies. Only the
    smallest cut writes its tail: measure_server gets every cut's server time from it.
    """

    def settings(cut: int, smallest: int) -> dict[str, Any]:
        return dict(
            model=config.model,
            cut_layer=cut,
            out=work / f"cut-{cut}",
            lora_rank=config.lora_rank,
            lora_alpha=config.lora_alpha,
            quantize=config.quantize,
            batch_size=config.batch_size,
            max_seq_len=config.seq_len,
            write_tail=cut == smallest,
            force=True,  # the directory is ours; after a failed parallel attempt it may hold a finished cut
        )

    def choose(info: ModelInfo) -> tuple[int, ...]:
        wanted = config.cut_layers or range(1, min(DEFAULT_MAX_CUT, info.num_layers - 1) + 1)
        cuts = tuple(sorted(set(wanted)))
        if cuts[-1] >= info.num_layers:
            raise ProfilingError(
                f"the model has {info.num_layers} layers: a cut layer must be 1 to {info.num_layers - 1}, "
                f"got {cuts[-1]}"
            )
        return cuts

    started = time.perf_counter()
    if loaded is not None or config.export_jobs == 1:
        if loaded is None:
            from edgesplit.export.models import load_model

            loaded = load_model(config.model)
        info = _describe(loaded)
        cuts = choose(info)
        loaded_at = time.perf_counter()
        seconds = {cut: _export_cut(settings(cut, cuts[0]), loaded) for cut in cuts}
        return info, cuts, seconds, {"load": loaded_at - started, "export": time.perf_counter() - loaded_at}

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: this process may hold PyTorch's thread pools, which a forked child inherits broken.
    jobs = config.export_jobs
    try:
        with ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_load_in_process,
            initargs=(config.model, max(1, cores // jobs)),
        ) as pool:
            # One task per process at once, so that every process starts and loads the model now, in parallel.
            info = [future.result() for future in [pool.submit(_describe) for _ in range(jobs)]][0]
            cuts = choose(info)
            loaded_at = time.perf_counter()
            futures = {cut: pool.submit(_export_cut, settings(cut, cuts[0])) for cut in sorted(cuts, reverse=True)}
            seconds = {cut: futures[cut].result() for cut in cuts}
    except BrokenProcessPool:
        # Killed (out of memory), or the program that called us cannot be re-imported by a spawned process
        # (code read from stdin, say): one process, one model in memory, still works.
        log(
            "an export process died (out of memory, or a program spawn cannot re-import); exporting the cuts "
            "one after another in this process instead"
        )
        return export_cuts(replace(config, export_jobs=1), work, None, cores, log)
    return info, cuts, seconds, {"load": loaded_at - started, "export": time.perf_counter() - loaded_at}


def measure_server(
    tail_dir: Path, cuts: tuple[int, ...], every_cut: bool, log: Log = _log
) -> tuple[dict[int, tuple[float, str]], float]:
    """Seconds of one Tail.train_step per cut, with the tail exported at the smallest cut `cuts[0]`, and this
    machine's speed factor while they ran (benchmark rounds between the steps, as in the client worker).

    The tail of cut k is the layers [k, L) of the model, which are the last layers of the smallest cut's tail:
    a Tail of that range, built from the smallest cut's export (`Tail(first_layer=k)`), is exactly the
    computation of cut k's tail, without exporting a ~0.5 GB tail per cut. By default two tails are timed, the
    whole tail (cut cuts[0], "measured") and no tail layer at all (final norm, LM head and loss), and the cuts
    in between are "fitted" on the line through them: the layers are identical, so the time is linear in
    their number. With `every_cut` each cut is timed directly.
    """
    from edgesplit.client.artifacts import load_manifest
    from edgesplit.server.tail import Tail

    manifest = load_manifest(tail_dir, verify=False)
    first = manifest.cut_layer
    num_layers = manifest.num_layers
    rng = np.random.default_rng(0)
    batch = (manifest.batch_size, manifest.max_seq_len)
    activations = rng.standard_normal((*batch, manifest.hidden_size)).astype(np.float32)  # (B, T, H)
    attention_mask = np.ones(batch, dtype=np.int64)
    labels = rng.integers(0, manifest.vocab_size, size=batch, dtype=np.int64)

    speeds: list[float] = []

    def step_seconds(cut: int) -> float:
        tail = Tail(tail_dir, first_layer=cut)
        # An untimed first step: allocations and the optimiser's state, once per tail.
        tail.train_step(activations, attention_mask, labels)
        speeds.append(benchmark_round())
        t0 = time.perf_counter()
        tail.train_step(activations, attention_mask, labels)
        return time.perf_counter() - t0

    if every_cut:
        times = {cut: (step_seconds(cut), "measured") for cut in cuts}
    else:
        head_only = step_seconds(num_layers)
        whole = step_seconds(first)
        per_layer = max(whole - head_only, 0.0) / (num_layers - first)
        log(
            f"server: Tail.train_step {whole:.2f} s with {num_layers - first} layers, "
            f"{head_only:.2f} s with none (measured here): {per_layer * 1e3:.0f} ms per tail layer"
        )
        times = {
            cut: (whole, "measured") if cut == first else (head_only + per_layer * (num_layers - cut), "fitted")
            for cut in cuts
        }
    speeds.append(benchmark_round())
    return times, float(np.median(speeds)) / REFERENCE_GFLOPS
