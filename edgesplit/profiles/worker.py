"""The device side of profiling, without PyTorch: a CPU speed benchmark, this machine as a device profile, and
one head artifact's client step measured in a fresh process.

    python -m edgesplit.profiles.worker head ARTIFACT_DIR [--repeats 3] [--warmup 1]   -> one JSON object on stdout
    python -m edgesplit.profiles.worker benchmark                                       -> one JSON object on stdout

The split-point profiler (splitpoint.py) runs `head` once per cut in its own process, so that the peak RSS it
reports is what a client needs for that cut: the interpreter, numpy, ONNX Runtime, both head graphs and a
step's tensors, and nothing of the PyTorch process that exported them. The process refuses to report if torch
got imported, since a client never has it. The same file runs on a Raspberry Pi or a Jetson
(`edgesplit profile --save-profile me.toml --skip-sweep`) to measure the device itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.devices.profiles import DeviceProfile, load_profile

# The CPU speed benchmark: one fp32 matmul shaped like a SmolLM2 MLP up-projection over a 4 x 128 batch,
# (B*T, H) @ (H, I), on every core numpy's BLAS uses. It is the dominant kind of work in a head step.
BENCH_SHAPE = (512, 576, 1536)
BENCH_FLOP = 2 * BENCH_SHAPE[0] * BENCH_SHAPE[1] * BENCH_SHAPE[2]
# The reference machine of DeviceProfile.cpu_speed_factor (the project's 2-vCPU x86-64 AMD EPYC with
# AVX-512, numpy 2 with OpenBLAS 0.3.31) ran `cpu_benchmark()` at this many GFLOP/s: REFERENCE_RUNS below,
# 2026-11-25, under `chrt -f 50` (real-time priority). That machine is shared: at normal priority the same
# benchmark read 10-40 GFLOP/s while other jobs ran, so its idle speed was only measurable with them held off.
REFERENCE_RUNS = (176.1, 173.0, 180.9, 204.8, 178.1)
REFERENCE_GFLOPS = float(np.median(REFERENCE_RUNS))
REFERENCE_MACHINE = "the project's 2-vCPU x86-64 AMD EPYC reference machine (AVX-512)"


@dataclass(frozen=True)
class Benchmark:
    gflops: float  # median round, this machine
    rounds_gflops: list[float]
    reference_gflops: float = REFERENCE_GFLOPS

    @property
    def speed_factor(self) -> float:
        """This machine's cpu_speed_factor: its benchmark speed over the reference machine's."""
        return self.gflops / self.reference_gflops

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "speed_factor": self.speed_factor, "shape": list(BENCH_SHAPE)}


def benchmark_round(per_round: int = 3) -> float:
    """GFLOP/s of one round of the benchmark matmul. The operands (8 MB) live for the round only, so that a
    worker measuring a client's memory carries none of them into the client's steps."""
    m, k, n = BENCH_SHAPE
    left = np.full((m, k), 0.5, dtype=np.float32)  # the values do not matter to a matmul's speed
    right = np.full((k, n), 0.5, dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)
    np.matmul(left, right, out=out)  # untimed: page faults of fresh arrays, BLAS threads waking up
    started = time.perf_counter()
    for _ in range(per_round):
        np.matmul(left, right, out=out)
    return per_round * BENCH_FLOP / (time.perf_counter() - started) / 1e9


def cpu_benchmark(rounds: int = 10, per_round: int = 5) -> Benchmark:
    """Median GFLOP/s of `rounds` rounds of the benchmark matmul. The median, as for the step times it scales:
    on a machine shared with other jobs both are slowed alike, and the ratio stays about right."""
    speeds = [benchmark_round(per_round) for _ in range(rounds)]
    return Benchmark(gflops=float(np.median(speeds)), rounds_gflops=[round(s, 2) for s in speeds])


# --------------------------------------------------------------------------------------- this machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def machine_profile(name: str, benchmark: Benchmark, base: DeviceProfile | None = None) -> DeviceProfile:
    """This machine as a device profile: cores, memory, CPU and speed factor measured here; the energy reader
    detected here; power figures and links copied from `base` (the device it is), or else from a built-in
    profile as a placeholder whose sources say they are unknown (no sensor here can measure them)."""
    import psutil

    from edgesplit.client.energy import detect_energy_reader, guess_profile_name

    reader = detect_energy_reader(base)
    source_profile = base
    if source_profile is None:
        source_profile = load_profile(guess_profile_name() or "x86-laptop")
        power_note = (
            f"unknown: placeholder copied from the built-in {source_profile.name} profile, "
            "not measured on this machine; replace it with a measured figure"
        )
    else:
        power_note = f"from the {source_profile.name} profile"
    today = date.today().isoformat()
    return DeviceProfile(
        name=name,
        description=f"measured by `edgesplit profile --save-profile` on {platform.node() or '?'}, {today}",
        memory_mb=int(psutil.virtual_memory().total // 2**20),
        cores=usable_cores(),
        cpu=f"{cpu_name()} ({platform.machine()})",
        cpu_speed_factor=round(benchmark.speed_factor, 4),
        cpu_speed_source=(
            f"measured {today}: fp32 matmul ({BENCH_SHAPE[0]}, {BENCH_SHAPE[1]}) @ "
            f"({BENCH_SHAPE[1]}, {BENCH_SHAPE[2]}) "
            f"(numpy, median of {len(benchmark.rounds_gflops)} rounds) ran at {benchmark.gflops:.1f} "
            "GFLOP/s, "
            f"against {benchmark.reference_gflops:.1f} on {REFERENCE_MACHINE}"
        ),
        idle_w=source_profile.idle_w,
        idle_w_source=f"{power_note}: {source_profile.idle_w_source}",
        active_w=source_profile.active_w,
        active_w_source=f"{power_note}: {source_profile.active_w_source}",
        energy_reader=reader.kind,
        links=dict(source_profile.links),
    )


# ------------------------------------------------------------------------------------------ head step


def peak_rss_bytes() -> int:
    """The kernel's high-water mark of this process's RSS. On Linux that is VmHWM, not getrusage's ru_maxrss:
    ru_maxrss survives fork + exec, so a worker started by a 2 GB PyTorch process would report 2 GB."""
    from edgesplit.client.resources import os_max_rss_bytes

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return os_max_rss_bytes()  # macOS: no /proc; its ru_maxrss is the best there is


@dataclass
class HeadMeasurement:
    """One cut's client step, measured in this process. Seconds are medians over the timed steps."""

    step_s: float  # forward + gradient graph + AdamW update
    forward_s: float
    backward_s: float
    optimizer_s: float
    cpu_s: float  # process CPU time per step, all threads
    step_samples_s: list[float]
    load_s: float  # ONNX Runtime sessions created (graph optimisation included)
    baseline_rss_bytes: int  # after the imports, before the head is loaded
    peak_rss_bytes: int  # the kernel's high-water mark of this process (VmHWM): misses no spike
    phase_peak_bytes: dict[str, int]
    energy_method: str  # "measured" when this machine has a sensor, else "estimated"
    energy_source: str
    measured_joules_per_step: float | None  # only when measured
    # This machine's speed while the steps ran (benchmark rounds between them) over the reference machine's:
    # the steps' times scale to the idle reference machine as step_s * speed_factor.
    speed_factor: float = 1.0
    speed_rounds_gflops: list[float] = field(default_factory=list)
    torch_imported: bool = False


def measure_head(artifact_dir: str | Path, repeats: int = 3, warmup: int = 1) -> HeadMeasurement:
    """Load the head of `artifact_dir` and time `warmup + repeats` client steps on random tokens."""
    from edgesplit.client.energy import MEASURED, detect_energy_reader
    from edgesplit.client.head import Head
    from edgesplit.client.optim import AdamW
    from edgesplit.client.resources import MemorySampler, process_rss_bytes

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    baseline = process_rss_bytes()
    reader = detect_energy_reader()
    with MemorySampler(interval_ms=5) as memory:
        started = time.perf_counter()
        with memory.phase("load"):
            head = Head(artifact_dir, verify=False)  # just exported by the caller: no need to hash it again
            adapters = head.initial_adapters()
            optimizer = AdamW(adapters) if head.trainable else None
        load_s = time.perf_counter() - started
        manifest = head.manifest
        rng = np.random.default_rng(0)
        shape = (manifest.batch_size, manifest.max_seq_len)
        input_ids = rng.integers(0, manifest.vocab_size, size=shape, dtype=np.int64)
        attention_mask = np.ones(shape, dtype=np.int64)
        # What the server sends down: small, like real activation gradients of a mean loss.
        activation_grads = (rng.standard_normal(manifest.activations_shape) * 1e-4).astype(np.float32)

        phases: dict[str, list[float]] = {
            "step": [],
            "forward": [],
            "backward": [],
            "optimizer": [],
            "cpu": [],
        }
        joules = 0.0
        speeds: list[float] = []
        reader.start()
        for index in range(warmup + repeats):
            timed = index >= warmup
            if timed:  # one benchmark round before each timed step (and one after the last): the speed now
                speeds.append(benchmark_round())
            joules_before = reader.read_joules()
            wall0, cpu0 = time.perf_counter(), time.process_time()
            with memory.phase("forward"):
                forward = head.forward(input_ids, attention_mask, adapters)
            wall1 = time.perf_counter()
            if optimizer is not None:
                with memory.phase("backward"):
                    grads = head.backward(forward, activation_grads)
                wall2 = time.perf_counter()
                optimizer.step(grads)
            else:
                wall2 = wall1
            del forward
            wall3, cpu3 = time.perf_counter(), time.process_time()
            if timed:
                joules += reader.read_joules() - joules_before
                phases["step"].append(wall3 - wall0)
                phases["forward"].append(wall1 - wall0)
                phases["backward"].append(wall2 - wall1)
                phases["optimizer"].append(wall3 - wall2)
                phases["cpu"].append(cpu3 - cpu0)
        speeds.append(benchmark_round())
        reader.stop()

    measured = reader.method == MEASURED
    step_samples = [round(s, 6) for s in phases["step"]]  # as reported; the median of these lies among them
    return HeadMeasurement(
        step_s=statistics.median(step_samples),
        forward_s=statistics.median(phases["forward"]),
        backward_s=statistics.median(phases["backward"]),
        optimizer_s=statistics.median(phases["optimizer"]),
        cpu_s=statistics.median(phases["cpu"]),
        step_samples_s=step_samples,
        load_s=load_s,
        baseline_rss_bytes=baseline,
        peak_rss_bytes=max(peak_rss_bytes(), memory.peak_rss_bytes),
        phase_peak_bytes=memory.phase_peak_bytes,
        energy_method=reader.method,
        energy_source=reader.source,
        measured_joules_per_step=joules / repeats if measured else None,
        speed_factor=float(np.median(speeds)) / REFERENCE_GFLOPS,
        speed_rounds_gflops=[round(speed, 2) for speed in speeds],
        torch_imported="torch" in sys.modules,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgesplit.profiles.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    head = commands.add_parser("head", help="time one head artifact's client step, print JSON")
    head.add_argument("artifact_dir", type=Path)
    head.add_argument("--repeats", type=int, default=3)
    head.add_argument("--warmup", type=int, default=1)
    commands.add_parser("benchmark", help="run the CPU speed benchmark, print JSON")
    args = parser.parse_args(argv)

    if args.command == "benchmark":
        print(json.dumps(cpu_benchmark().to_json()))
        return 0
    result = measure_head(args.artifact_dir, args.repeats, args.warmup)
    if result.torch_imported:  # the figures would include PyTorch's memory, which no client has
        print("edgesplit.profiles.worker: torch was imported; the client measurement is void", file=sys.stderr)
        return 3
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
