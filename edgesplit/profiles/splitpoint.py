"""Split-point profiling: what each candidate cut layer costs, measured on this machine, scaled to a device.

For each cut layer k the sweep exports the head (layers [0, k)) once into a temporary directory and measures,
here:
    client step      head forward + gradient graph + AdamW in ONNX Runtime, median of `repeats` steps, in a
                     fresh torch-free process per cut (edgesplit/profiles/worker.py), which also gives
    client peak RSS  the kernel's high-water mark of that process: what the device has to hold for the cut
    artifact bytes   head.onnx + head_grad.onnx
    wire bytes       one Activations frame up and one Gradients frame down, encoded for real
    server step      Tail.train_step (tail forward, loss, backward, AdamW) in this process; see measure_server
Then, for a device profile and a link, the estimate of one training step on that device:

    step_s   = client_s * client_speed / device.cpu_speed_factor    (the client, scaled to the device)
             + upload_bytes * 8 / uplink_bps + download_bytes * 8 / downlink_bps + rtt_s
             + server_s * server_speed / server_speedup              (scaled to the reference machine)
    energy_j = idle_w * step_s + (active_w - idle_w) * device_client_s       (EstimatedEnergy's model, every
                                                                               core busy for the client)

`client_speed` and `server_speed` are this machine's speed over the reference machine's (edgesplit/profiles/worker.py's
benchmark), read between the timed steps: a sweep run on a laptop, or on a reference machine busy with other
jobs, scales as one run on the idle reference machine would.
The recommended cut (edgesplit/profiles/recommendation.py): of the cuts whose measured peak RSS fits the memory
budget, the one with the fewest layers on the device among those within TIE_TOLERANCE (5%) of the lowest
estimated step time. Each estimate also has a spread, from the fastest and slowest of the repeated client
steps; cuts whose spreads overlap are reported as too noisy to separate.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.client.energy import EstimatedEnergy
from edgesplit.client.protocol import Activations, Gradients, Wire, encode, tensor_nbytes_on_wire
from edgesplit.errors import DataError
from edgesplit.profiles.devices import DeviceProfile, LinkProfile
from edgesplit.profiles.recommendation import Recommendation, overlapping_cuts, recommend
from edgesplit.profiles.worker import REFERENCE_GFLOPS, Benchmark, benchmark_round, cpu_name, usable_cores

DEFAULT_MODEL = "smollm2-135m"  # edgesplit.export.models.DEFAULT_MODEL, spelled out so importing this needs no export
DEFAULT_MAX_CUT = 8
MIB = 2**20

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(f"[edgesplit] {message}", file=sys.stderr, flush=True)


class ProfilingError(DataError):
    """A sweep cannot run as asked (bad cut layers, a worker that failed) or its inputs are inconsistent."""


@dataclass(frozen=True)
class SweepConfig:
    model: str = DEFAULT_MODEL
    cut_layers: tuple[int, ...] | None = None  # None: 1 .. min(DEFAULT_MAX_CUT, num_layers - 1)
    batch_size: int = 4
    seq_len: int = 128
    quantize: str = "none"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    wire: str = "fp32"
    repeats: int = 3  # timed client steps per cut (median)
    warmup: int = 1  # untimed client steps first: ONNX Runtime plans its memory on the first run
    server_every_cut: bool = False  # time Tail.train_step at every cut instead of fitting a line
    export_jobs: int = 2  # processes exporting cuts in parallel (each loads the model once)

    def __post_init__(self) -> None:
        if self.cut_layers is not None and (not self.cut_layers or min(self.cut_layers) < 1):
            raise ProfilingError(f"cut layers must be positive, got {self.cut_layers}")
        if self.batch_size < 1 or self.seq_len < 2:
            raise ProfilingError("--batch-size must be at least 1 and --seq-len at least 2")
        if self.repeats < 1 or self.warmup < 0:
            raise ProfilingError(f"--repeats must be at least 1, got {self.repeats}")
        if self.export_jobs < 1:
            raise ProfilingError(f"--jobs must be at least 1, got {self.export_jobs}")
        try:
            Wire(self.wire)
        except ValueError:
            raise ProfilingError(f"--wire must be one of {', '.join(w.value for w in Wire)}") from None


@dataclass(frozen=True)
class WireBytes:
    upload: int  # one Activations frame: activations (B, T, H), attention_mask and labels (B, T) int64
    download: int  # one Gradients frame: activation_grads (B, T, H)
    upload_payload: int  # the tensors alone, without the frame's header and metadata
    download_payload: int


def wire_bytes(batch_size: int, seq_len: int, hidden_size: int, wire: Wire, trainable: bool = True) -> WireBytes:
    """Bytes of one step's frames, from frames encoded for real (the metadata's size is what it is)."""
    rng = np.random.default_rng(0)
    activations = rng.standard_normal((batch_size, seq_len, hidden_size)).astype(np.float32)  # (B, T, H)
    tokens = np.ones((batch_size, seq_len), dtype=np.int64)  # (B, T)
    up = Activations(0, 0, {"activations": activations, "attention_mask": tokens, "labels": tokens})
    down = Gradients(0, 0, 2.5, 0.1, {"activation_grads": activations} if trainable else {})
    float_bytes = tensor_nbytes_on_wire(activations.shape, np.float32, wire)
    int_bytes = tensor_nbytes_on_wire(tokens.shape, np.int64, wire)
    return WireBytes(
        upload=len(encode(up, wire)),
        download=len(encode(down, wire)),
        upload_payload=float_bytes + 2 * int_bytes,
        download_payload=float_bytes if trainable else 0,
    )


@dataclass(frozen=True)
class CutMeasurement:
    """One cut layer, everything measured on this machine."""

    cut_layer: int
    client_step_s: float  # median: forward + gradient graph + AdamW
    client_forward_s: float
    client_backward_s: float
    client_cpu_s: float  # process CPU seconds per step, all threads
    # This machine's speed over the reference machine's while the client's steps ran, and while the server's
    # did (benchmark rounds between the steps): a busy shared machine reads well below 1.
    client_speed_factor: float
    client_peak_rss_bytes: int
    artifact_bytes: int  # head.onnx + head_grad.onnx
    upload_bytes: int
    download_bytes: int
    upload_payload_bytes: int
    download_payload_bytes: int
    server_step_s: float
    server_source: str  # "measured", or "fitted" (see measure_server)
    server_speed_factor: float
    export_s: float
    energy_method: str  # of this machine: "measured" where it has a sensor, else "estimated"
    measured_joules_per_step: float | None
    client_step_samples_s: tuple[float, ...] = ()  # every timed client step, for the spread of the estimate
    worker: dict[str, Any] = field(default_factory=dict, compare=False)  # the worker's whole report


@dataclass(frozen=True)
class CutEstimate:
    """One cut on the device over the link: client times scaled, server time as measured here."""

    cut_layer: int
    client_s: float
    upload_s: float
    download_s: float
    rtt_s: float
    server_s: float
    step_s: float
    # The estimate with the fastest and with the slowest timed client step: how far the repeats disagree.
    step_s_min: float
    step_s_max: float
    client_cpu_s: float
    energy_j: float
    fits_memory: bool


@dataclass
class SweepResult:
    config: SweepConfig
    model_source: str
    family: str
    num_layers: int
    hidden_size: int
    measurements: list[CutMeasurement]
    seconds: dict[str, float]  # wall: load, export, client, server, total
    # CPU seconds of this process and its children per phase: on a machine shared with other jobs the wall
    # times stretch, these do not (much), so they tell what the sweep costs on an idle machine.
    cpu_seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- the sweep


def parse_cut_layers(text: str) -> tuple[int, ...]:
    """ "1-8", "1,2,4", "2-4,8" -> sorted distinct layers."""
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                first, last = (int(bound) for bound in part.split("-", 1))
                if first > last:
                    raise ValueError(part)
                layers.update(range(first, last + 1))
            elif part:
                layers.add(int(part))
    except ValueError:
        raise ProfilingError(f"--cut-layers takes layers and ranges like 1-8 or 1,2,4, got {text!r}") from None
    if not layers:
        raise ProfilingError(f"--cut-layers names no layer: {text!r}")
    return tuple(sorted(layers))


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


def _artifact_bytes(directory: Path) -> int:
    """The head's graphs and their external weight files (head.onnx.data, head_grad.onnx.data)."""
    names = ("head.onnx", "head_grad.onnx", "head.onnx.data", "head_grad.onnx.data")
    return sum((directory / name).stat().st_size for name in names if (directory / name).exists())


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


def sweep(config: SweepConfig, loaded: Any = None, log: Log = _log, work_dir: Path | None = None) -> SweepResult:
    """Export and measure every cut of `config`; `loaded` (an edgesplit.export.models.LoadedModel) saves loading it.

    Three phases, so that nothing else of ours runs while a timing is taken: the exports (in parallel, see
    export_cuts), then each cut's client in its own process, one after another, then the server's tail.
    """
    started = time.perf_counter()
    cpu = [_cpu_seconds()]
    work = Path(tempfile.mkdtemp(prefix="edgesplit-profile-", dir=work_dir))
    measurements: list[CutMeasurement] = []
    try:
        info, cuts, export_seconds, seconds = export_cuts(config, work, loaded, usable_cores(), log)
        cpu.append(_cpu_seconds())
        log(f"exported cuts {', '.join(map(str, cuts))} in {seconds['export']:.1f} s; measuring each client")
        # The activations are (B, T, H) at every cut of these models: the same bytes whichever layer is cut.
        sizes = wire_bytes(config.batch_size, config.seq_len, info.hidden_size, Wire(config.wire))
        t0 = time.perf_counter()
        for index, cut in enumerate(cuts):
            out = work / f"cut-{cut}"
            report = run_worker(["head", str(out), "--repeats", str(config.repeats), "--warmup", str(config.warmup)])
            measurements.append(
                CutMeasurement(
                    cut_layer=cut,
                    client_step_s=report["step_s"],
                    client_forward_s=report["forward_s"],
                    client_backward_s=report["backward_s"],
                    client_cpu_s=report["cpu_s"],
                    client_peak_rss_bytes=report["peak_rss_bytes"],
                    client_speed_factor=report["speed_factor"],
                    artifact_bytes=_artifact_bytes(out),
                    upload_bytes=sizes.upload,
                    download_bytes=sizes.download,
                    upload_payload_bytes=sizes.upload_payload,
                    download_payload_bytes=sizes.download_payload,
                    server_step_s=math.nan,  # filled in below
                    server_source="",
                    server_speed_factor=math.nan,
                    export_s=export_seconds[cut],
                    energy_method=report["energy_method"],
                    measured_joules_per_step=report["measured_joules_per_step"],
                    client_step_samples_s=tuple(report["step_samples_s"]),
                    worker=report,
                )
            )
            log(
                f"cut {cut} ({index + 1}/{len(cuts)}): client step {report['step_s'] * 1e3:.0f} ms, "
                f"peak RSS {report['peak_rss_bytes'] / MIB:.0f} MiB (measured here)"
            )
            if index > 0:  # the smallest cut's directory holds the tail, still needed
                shutil.rmtree(out, ignore_errors=True)
        seconds["client"] = time.perf_counter() - t0
        cpu.append(_cpu_seconds())
        t0 = time.perf_counter()
        server, server_speed = measure_server(work / f"cut-{cuts[0]}", cuts, config.server_every_cut, log)
        seconds["server"] = time.perf_counter() - t0
        cpu.append(_cpu_seconds())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measurements = [
        replace(
            m,
            server_step_s=server[m.cut_layer][0],
            server_source=server[m.cut_layer][1],
            server_speed_factor=server_speed,
        )
        for m in measurements
    ]
    seconds["total"] = time.perf_counter() - started
    phases = ("load+export", "client", "server")
    cpu_seconds = {phase: cpu[i + 1] - cpu[i] for i, phase in enumerate(phases)}
    cpu_seconds["total"] = cpu[-1] - cpu[0]
    return SweepResult(
        config,
        info.source,
        info.family,
        info.num_layers,
        info.hidden_size,
        measurements,
        seconds,
        cpu_seconds,
    )


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have finished (export processes,
    client workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


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


# ------------------------------------------------------------------------------------- estimate, choose


def estimate(
    measurement: CutMeasurement,
    device: DeviceProfile,
    link: LinkProfile,
    budget_mb: float,
    server_speedup: float = 1.0,
) -> CutEstimate:
    """One cut's step on `device` over `link` (see the module docs for the formula). Both sides' times are
    first brought to the idle reference machine with the speed factor measured while they ran; the server is
    then the reference machine, or `server_speedup` times faster (a GPU server, say)."""
    to_device = measurement.client_speed_factor / device.cpu_speed_factor
    client_s = measurement.client_step_s * to_device
    # The link and the server are one figure each: the spread is the client's, around the median.
    samples = measurement.client_step_samples_s or (measurement.client_step_s,)
    # ONNX Runtime's threads spin between operators through a run: the device's cores count as busy for the
    # whole client time. (This machine's CPU seconds are no guide on a shared machine: waiting is not CPU.)
    client_cpu_s = client_s * device.cores
    upload_s = measurement.upload_bytes * 8 / (link.uplink_mbps * 1e6)
    download_s = measurement.download_bytes * 8 / (link.downlink_mbps * 1e6)
    rtt_s = link.rtt_ms / 1e3
    server_s = measurement.server_step_s * measurement.server_speed_factor / server_speedup
    step_s = client_s + upload_s + download_s + rtt_s + server_s
    # Over the network wait and the server's time the device idles: idle power for the whole step.
    energy_j = EstimatedEnergy(device).joules_for(step_s, client_cpu_s)
    return CutEstimate(
        cut_layer=measurement.cut_layer,
        client_s=client_s,
        upload_s=upload_s,
        download_s=download_s,
        rtt_s=rtt_s,
        server_s=server_s,
        step_s=step_s,
        step_s_min=step_s - (measurement.client_step_s - min(samples)) * to_device,
        step_s_max=step_s + (max(samples) - measurement.client_step_s) * to_device,
        client_cpu_s=client_cpu_s,
        energy_j=energy_j,
        fits_memory=measurement.client_peak_rss_bytes / MIB <= budget_mb,
    )


# ---------------------------------------------------------------------------------------------- report


@dataclass
class ProfileReport:
    """A finished sweep with its device, link, budget, estimates and recommendation: what gets written."""

    sweep: SweepResult
    device: DeviceProfile
    link_name: str
    link: LinkProfile
    here: Benchmark  # this machine, at the start of the run (the timings carry their own speed factors)
    budget_mb: float
    budget_label: str
    server_speedup: float
    estimates: list[CutEstimate]
    recommendation: Recommendation

    @staticmethod
    def build(
        sweep: SweepResult,
        device: DeviceProfile,
        link_name: str,
        link: LinkProfile,
        here: Benchmark,
        max_memory_mb: float | None,
        server_speedup: float = 1.0,
    ) -> ProfileReport:
        if max_memory_mb is None:
            budget_mb, budget_label = float(device.memory_mb), f"{device.name}'s RAM"
        else:
            budget_mb, budget_label = float(max_memory_mb), "--max-memory-mb budget"
        if not server_speedup > 0:
            raise ProfilingError(f"--server-speedup must be positive, got {server_speedup}")
        estimates = [estimate(m, device, link, budget_mb, server_speedup) for m in sweep.measurements]
        choice = recommend(sweep.measurements, estimates, budget_mb, budget_label)
        return ProfileReport(
            sweep,
            device,
            link_name,
            link,
            here,
            budget_mb,
            budget_label,
            server_speedup,
            estimates,
            choice,
        )

    @property
    def scaled(self) -> str:
        return f"scaled to {self.device.name}"

    def cuts(self) -> list[tuple[CutMeasurement, CutEstimate]]:
        return list(zip(self.sweep.measurements, self.estimates, strict=True))

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per cut; every column name says whether it was measured here or scaled/estimated."""
        rows = []
        overlaps = overlapping_cuts(self.estimates)
        for m, e in self.cuts():
            samples = m.client_step_samples_s or (m.client_step_s,)
            rows.append(
                {
                    "cut_layer": m.cut_layer,
                    "device_layers": m.cut_layer,
                    "client_step_ms_measured_here": round(m.client_step_s * 1e3, 2),
                    "client_step_ms_min_measured_here": round(min(samples) * 1e3, 2),
                    "client_step_ms_max_measured_here": round(max(samples) * 1e3, 2),
                    "client_steps_timed": len(samples),
                    "client_forward_ms_measured_here": round(m.client_forward_s * 1e3, 2),
                    "client_backward_ms_measured_here": round(m.client_backward_s * 1e3, 2),
                    "client_cpu_ms_measured_here": round(m.client_cpu_s * 1e3, 2),
                    "client_speed_factor_here": round(m.client_speed_factor, 4),
                    "client_peak_rss_mib_measured_here": round(m.client_peak_rss_bytes / MIB, 1),
                    "artifact_bytes": m.artifact_bytes,
                    "upload_bytes_per_step": m.upload_bytes,
                    "download_bytes_per_step": m.download_bytes,
                    "server_step_ms_measured_here": round(m.server_step_s * 1e3, 1),
                    "server_step_source": m.server_source,
                    "server_speed_factor_here": round(m.server_speed_factor, 4),
                    "measured_energy_j_per_step_here": m.measured_joules_per_step,
                    "device": self.device.name,
                    "client_step_ms_scaled_to_device": round(e.client_s * 1e3, 2),
                    "upload_ms_on_link": round(e.upload_s * 1e3, 2),
                    "download_ms_on_link": round(e.download_s * 1e3, 2),
                    "rtt_ms_on_link": round(e.rtt_s * 1e3, 2),
                    "step_s_estimated_on_device": round(e.step_s, 4),
                    "step_s_min_estimated_on_device": round(e.step_s_min, 4),
                    "step_s_max_estimated_on_device": round(e.step_s_max, 4),
                    # Cuts whose spread overlaps this one's: the measurement did not tell them apart.
                    "spread_overlaps_cuts": " ".join(map(str, overlaps[m.cut_layer])),
                    "energy_j_per_step_estimated_on_device": round(e.energy_j, 4),
                    "fits_memory_budget": e.fits_memory,
                    "recommended": m.cut_layer == self.recommendation.cut_layer,
                }
            )
        return rows

    def to_json(self) -> dict[str, Any]:
        sweep = self.sweep
        return {
            "edgesplit_profile_version": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "source": sweep.model_source,
                "family": sweep.family,
                "num_layers": sweep.num_layers,
                "hidden_size": sweep.hidden_size,
            },
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(sweep.config).items()},
            "this_machine": {
                "cpu": cpu_name(),
                "cores": usable_cores(),
                "benchmark": self.here.to_json(),
                "energy": sweep.measurements[0].energy_method if sweep.measurements else None,
            },
            "device": self.device.to_dict(),
            "link": {"name": self.link_name, **asdict(self.link)},
            "server_speedup": self.server_speedup,
            "memory_budget": {
                "mib": self.budget_mb,
                "from": self.budget_label,
                "compared_with": "client peak RSS measured here (the same artifact needs about "
                "the same memory on the device; libraries differ by tens of MiB)",
            },
            "labels": {
                "client step, peak RSS, artifact and wire bytes, server step": "measured here",
                "client_step_scaled": self.scaled,
                "speed factors": "this machine's speed over the reference machine's while the steps ran",
                "server_s in the estimate": "measured here, scaled to the reference machine / server_speedup",
                "upload/download/rtt seconds": f"link {self.link_name} ({self.link.source or 'no source'})",
                "step_s, energy_j": f"estimated for {self.device.name}: client {self.scaled}, link, server",
            },
            "cuts": [
                {
                    "measured_here": {k: v for k, v in asdict(m).items() if k != "worker"},
                    "worker": m.worker,
                    f"estimated_on_{self.device.name}": asdict(e),
                    "spread_overlaps_cuts": list(overlapping_cuts(self.estimates)[m.cut_layer]),
                }
                for m, e in self.cuts()
            ],
            "recommendation": asdict(self.recommendation),
            "sweep_seconds": {k: round(v, 2) for k, v in sweep.seconds.items()},
            "sweep_cpu_seconds": {k: round(v, 2) for k, v in sweep.cpu_seconds.items()},
        }

    def table(self) -> str:
        """The sweep as a fixed-width text table, with its labels."""
        sweep, device, link = self.sweep, self.device, self.link
        config = sweep.config
        measured_columns = (
            ("client", "ms", 8),
            ("speed", "x ref", 6),
            ("peak RSS", "MiB", 9),
            ("artifact", "MB", 9),
            ("up/step", "MB", 8),
            ("down/step", "MB", 9),
            ("server", "ms", 11),
        )
        scaled_columns = (
            ("client", "ms", 8),
            ("network", "ms", 8),
            ("step", "s", 7),
            ("spread", "s", 14),
            ("energy", "J", 7),
            ("fits", "", 5),
        )

        def header(columns: tuple[tuple[str, str, int], ...], row: int) -> str:
            return " ".join(f"{column[row]:>{column[2]}}" for column in columns)

        measured_width, scaled_width = len(header(measured_columns, 0)), len(header(scaled_columns, 0))
        lines = [
            f"split-point profile of {config.model} ({sweep.family}, {sweep.num_layers} layers, "
            f"hidden {sweep.hidden_size}): batch {config.batch_size} x {config.seq_len}, {config.wire} wire, "
            f"quantize {config.quantize}",
            f"this machine at the start: cpu_speed_factor {self.here.speed_factor:.2f} (matmul "
            f"{self.here.gflops:.1f} GFLOP/s vs the reference machine's {self.here.reference_gflops:.1f}), "
            f"{usable_cores()} cores",
            f"device {device.name}: cpu_speed_factor {device.cpu_speed_factor:g}, {device.cores} cores, "
            f"{device.idle_w:g}-{device.active_w:g} W; link {self.link_name}: up {link.uplink_mbps:g} "
            f"Mbit/s, down {link.downlink_mbps:g} Mbit/s, RTT {link.rtt_ms:g} ms",
            "",
            f"{'':4} | {'measured here':^{measured_width}} | {self.scaled + ' / estimated':^{scaled_width}}",
            f"{'cut':>4} | {header(measured_columns, 0)} | {header(scaled_columns, 0)}",
            f"{'':4} | {header(measured_columns, 1)} | {header(scaled_columns, 1)}",
        ]
        overlaps = overlapping_cuts(self.estimates)
        for m, e in self.cuts():
            mark = "*" if m.cut_layer == self.recommendation.cut_layer else " "
            # '~': this cut's spread overlaps another's, so the two were not told apart.
            spread = f"{e.step_s_min:.3f}-{e.step_s_max:.3f}{'~' if overlaps[m.cut_layer] else ' '}"
            server = f"{m.server_step_s * 1e3:.0f}{'' if m.server_source == 'measured' else ' fit'}"
            network = (e.upload_s + e.download_s + e.rtt_s) * 1e3
            measured = (
                f"{m.client_step_s * 1e3:>8.1f} {m.client_speed_factor:>6.2f} "
                f"{m.client_peak_rss_bytes / MIB:>9.0f} "
                f"{m.artifact_bytes / 1e6:>9.1f} {m.upload_bytes / 1e6:>8.3f} {m.download_bytes / 1e6:>9.3f} "
                f"{server:>11}"
            )
            scaled = (
                f"{e.client_s * 1e3:>8.1f} {network:>8.1f} {e.step_s:>7.3f} {spread:>14} {e.energy_j:>7.2f} "
                f"{'yes' if e.fits_memory else 'NO':>5}"
            )
            lines.append(f"{mark}{m.cut_layer:>3} | {measured} | {scaled}")
        energy = sweep.measurements[0].energy_method if sweep.measurements else "estimated"
        server_speed = sweep.measurements[0].server_speed_factor if sweep.measurements else math.nan
        lines += [
            "",
            "speed: this machine's speed over the reference machine's while the client's steps ran; the "
            "estimate brings the measured times to the idle reference machine with it, then to the device",
            "server: Tail.train_step on this machine ('fit': on the line through the measured whole and "
            f"empty tails), at speed {server_speed:.2f}"
            + ("" if self.server_speedup == 1 else f", divided by {self.server_speedup:g} (--server-speedup)")
            + " in the estimate; network: upload + download + RTT on the link",
            f"energy: estimated from the {device.name} profile's power model (this machine's energy: "
            f"{energy}); the radio is not counted",
            f"memory budget: {self.budget_mb:.0f} MiB ({self.budget_label}), compared with the peak RSS measured here",
            f"step: with the median of {config.repeats} timed client steps; spread: with the fastest and the "
            "slowest of them; '~': the spread overlaps another cut's (too noisy to separate)",
        ]
        choice = self.recommendation
        lines.append(
            f"recommended: cut {choice.cut_layer}: {choice.reason}"
            if choice.cut_layer is not None
            else f"recommended: none: {choice.reason}"
        )
        lines.append(
            f"sweep: {sweep.seconds['total']:.1f} s wall ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in sweep.seconds.items() if k != "total")
            + f"); {sweep.cpu_seconds.get('total', math.nan):.1f} CPU-s ("
            + ", ".join(f"{k} {v:.1f}" for k, v in sweep.cpu_seconds.items() if k != "total")
            + ")"
        )
        return "\n".join(lines)

    def write(self, out: Path) -> dict[str, Path]:
        """profile.csv, profile.json and profile.png under `out`; returns their paths."""
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "profile.csv", "json": out / "profile.json", "png": out / "profile.png"}
        rows = self.rows()
        with paths["csv"].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths["json"].write_text(json.dumps(self.to_json(), indent=2) + "\n")
        self.plot(paths["png"])
        return paths

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server or a device
        import matplotlib.pyplot as plt

        cuts = [m.cut_layer for m in self.sweep.measurements]
        chosen = self.recommendation.cut_layer
        figure, axes = plt.subplots(2, 2, figsize=(12, 8))
        (time_axis, memory_axis), (energy_axis, bytes_axis) = axes

        bottom = np.zeros(len(cuts))
        parts = [
            ("client, " + self.scaled, [e.client_s for e in self.estimates]),
            ("upload (link)", [e.upload_s for e in self.estimates]),
            ("download (link)", [e.download_s for e in self.estimates]),
            ("RTT (link)", [e.rtt_s for e in self.estimates]),
            (
                "server, scaled to the reference machine"
                + ("" if self.server_speedup == 1 else f" / {self.server_speedup:g}"),
                [e.server_s for e in self.estimates],
            ),
        ]
        for label, values in parts:
            time_axis.bar(cuts, values, bottom=bottom, label=label)
            bottom += np.array(values)
        time_axis.set_title(f"Estimated step time on {self.device.name} over {self.link_name}")
        time_axis.set_ylabel("seconds per step")
        time_axis.set_ylim(0, max(bottom) * 1.45)  # headroom for the legend
        time_axis.legend(fontsize=7, loc="upper left", ncol=2)

        peaks = [m.client_peak_rss_bytes / MIB for m in self.sweep.measurements]
        memory_axis.bar(cuts, peaks, color="tab:purple")
        budget = f"budget {self.budget_mb:.0f} MiB ({self.budget_label})"
        top = max(peaks) * 1.3
        if self.budget_mb <= 2 * max(peaks):
            memory_axis.axhline(self.budget_mb, color="tab:red", linestyle="--", label=budget)
            top = max(top, self.budget_mb * 1.15)
        else:  # a line at 8 GiB would flatten 300-700 MiB bars: say where it is instead
            memory_axis.plot([], [], color="tab:red", linestyle="--", label=budget + ", above the plot")
        memory_axis.set_ylim(0, top)
        memory_axis.set_title("Client peak RSS, measured here (torch-free process per cut)")
        memory_axis.set_ylabel("MiB")
        memory_axis.legend(fontsize=7, loc="upper left")

        energy_axis.bar(cuts, [e.energy_j for e in self.estimates], color="tab:orange")
        energy_axis.set_title(f"Energy per step, estimated for {self.device.name} (profile power model)")
        energy_axis.set_ylabel("joules per step")

        bytes_axis.bar(
            np.array(cuts) - 0.2,
            [m.upload_bytes / 1e6 for m in self.sweep.measurements],
            width=0.4,
            label="up: activations + mask + labels",
        )
        bytes_axis.bar(
            np.array(cuts) + 0.2,
            [m.download_bytes / 1e6 for m in self.sweep.measurements],
            width=0.4,
            label="down: activation gradients",
        )
        bytes_axis.set_title(f"Bytes per step on the wire ({self.sweep.config.wire}), measured here (encoded)")
        bytes_axis.set_ylabel("MB per step")
        bytes_axis.set_ylim(0, max(m.upload_bytes for m in self.sweep.measurements) / 1e6 * 1.3)
        bytes_axis.legend(fontsize=7, loc="upper left", ncol=2)

        for axis in axes.flat:
            axis.set_xlabel("cut layer (layers on the device)")
            axis.set_xticks(cuts)
            if chosen is not None:
                axis.axvspan(chosen - 0.5, chosen + 0.5, color="tab:green", alpha=0.12)
        title = (
            f"{self.sweep.config.model}: split points, batch {self.sweep.config.batch_size} x "
            f"{self.sweep.config.seq_len}"
        )
        if chosen is not None:
            title += f"; recommended cut {chosen} (shaded)"
        figure.suptitle(title, fontsize=10)
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
