"""Split-point profiling: what each candidate cut layer costs, measured on this machine, scaled to a device.

For each cut layer k the sweep exports the head (layers [0, k)) once into a temporary directory and measures,
here:
    client step      head forward + gradient graph + AdamW in ONNX Runtime, median of `repeats` steps, in a
                     fresh torch-free process per cut (edgesplit/profiles/worker.py), which also gives
    client peak RSS  the kernel's high-water mark of that process: what the device has to hold for the cut
    artifact bytes   head.onnx + head_grad.onnx
    wire bytes       one Activations frame up and one Gradients frame down, encoded for real
    server step      Tail.train_step (tail forward, loss, backward, AdamW) in this process; see measure_server
Then, for a device profile and a link, the estimate of one training step on that device (estimate.py):

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

This module runs the sweep. The rest lives beside it in edgesplit/profiles/: the records (SweepConfig,
CutMeasurement, CutEstimate, SweepResult...) in records.py, the measurements (exports, the client worker,
wire bytes, the server's tail) in measure.py, the estimate in estimate.py, the recommended cut in
recommendation.py and the written report (ProfileReport) in profile_report.py. Their public names are
importable from here too.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgesplit.client.fed import WEIGHTS_FILE
from edgesplit.client.protocol import Wire
from edgesplit.profiles.estimate import estimate
from edgesplit.profiles.measure import (
    Log,
    ModelInfo,
    _log,
    export_cuts,
    measure_server,
    run_worker,
    wire_bytes,
)
from edgesplit.profiles.profile_report import ProfileReport
from edgesplit.profiles.recommendation import Recommendation, overlapping_cuts, recommend
from edgesplit.profiles.records import (
    DEFAULT_MAX_CUT,
    DEFAULT_MODEL,
    MIB,
    CutEstimate,
    CutMeasurement,
    ProfilingError,
    SweepConfig,
    SweepResult,
    WireBytes,
)
from edgesplit.profiles.worker import usable_cores

# Every name this module held before its records, measurement, estimate and report moved out: importers keep
# importing them from here.
__all__ = [
    "DEFAULT_MAX_CUT",
    "DEFAULT_MODEL",
    "MIB",
    "CutEstimate",
    "CutMeasurement",
    "Log",
    "ModelInfo",
    "ProfileReport",
    "ProfilingError",
    "Recommendation",
    "SweepConfig",
    "SweepResult",
    "WireBytes",
    "estimate",
    "export_cuts",
    "measure_server",
    "overlapping_cuts",
    "parse_cut_layers",
    "recommend",
    "run_worker",
    "sweep",
    "wire_bytes",
]


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


def _artifact_bytes(directory: Path) -> int:
    """The head's graphs and their external weight files (head.onnx.data, head_grad.onnx.data), and the weights
    a dynamic-length head's graphs take as inputs (head_weights.safetensors, client/fed.py)."""
    names = ("head.onnx", "head_grad.onnx", "head.onnx.data", "head_grad.onnx.data", WEIGHTS_FILE)
    return sum((directory / name).stat().st_size for name in names if (directory / name).exists())


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
