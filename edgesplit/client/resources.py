"""What a training step costs the device in memory and time, measured in-process.

    with MemorySampler(interval_ms=20) as memory:         # samples this process's RSS in a background thread
        with memory.phase("head_forward"):                # peak RSS seen while inside, per phase
            ...
    memory.report()                                       # baseline, peak, steady, OS max RSS, phase peaks

    timer = PhaseTimer()
    with timer.phase("encode"):
        ...
    timer.step_done()                                     # {"encode": 0.012, ...} for this step, then reset

RSS is what the device has to hold: on a 4 GB Raspberry Pi it, not the Python heap, decides between training
and the OOM killer. A sampler can miss a spike shorter than its interval, so the report also carries the
kernel's own high-water mark (`getrusage` max RSS), which misses nothing but cannot be split into phases.
"""

from __future__ import annotations

import resource
import statistics
import sys
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psutil

Clock = Callable[[], float]


def process_rss_bytes() -> int:
    """This process's resident set size now, in bytes."""
    return int(psutil.Process().memory_info().rss)


def os_max_rss_bytes() -> int:
    """The kernel's high-water mark of this process's RSS, in bytes.

    On Linux this is VmHWM from /proc/self/status: ru_maxrss can carry the high-water mark of the parent
    that forked this process (a client started by a large process would report the parent's peak).
    Elsewhere, ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024


@dataclass(frozen=True)
class MemoryReport:
    """Bytes throughout. `steady` is the median of the samples' second half: where a long run settles."""

    baseline_bytes: int  # first sample
    peak_bytes: int
    steady_bytes: int
    os_max_rss_bytes: int
    phase_peak_bytes: dict[str, int] = field(default_factory=dict, hash=False)
    sample_count: int = 0
    interval_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "steady_bytes": self.steady_bytes,
            "os_max_rss_bytes": self.os_max_rss_bytes,
            "phase_peak_bytes": dict(self.phase_peak_bytes),
            "sample_count": self.sample_count,
            "interval_ms": self.interval_ms,
        }


class Ticker:
    """Calls `tick` every `interval_s` seconds in a daemon thread, between `start()` and `stop()`.

    The thread waits on an event, so `stop()` returns at once rather than after the rest of an interval. A
    tick runs to its end: `stop()` joins the thread after it."""

    def __init__(self, tick: Callable[[], object], interval_s: float, name: str) -> None:
        self._tick = tick
        self._interval_s = interval_s
        self._name = name
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop_event.set()
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            self._tick()


class MemorySampler:
    """Samples this process's RSS every `interval_ms` in a daemon thread; `phase(name)` records phase peaks.

    Samples are kept as 8-byte integers; past `max_samples` every other one is dropped and the sampler keeps
    one in two from then on (and so on), so a day-long run holds a bounded, evenly spread history. The peaks
    are tracked on every sample, dropped or not. `rss_bytes` is injectable for tests.
    """

    def __init__(
        self,
        interval_ms: float = 20.0,
        *,
        rss_bytes: Callable[[], int] = process_rss_bytes,
        max_samples: int = 100_000,
    ) -> None:
        if not interval_ms > 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be at least 2, got {max_samples}")
        self.interval_ms = interval_ms
        self._rss_bytes = rss_bytes
        self._max_samples = max_samples
        self._lock = threading.Lock()
        self._samples = array("q")
        self._keep_every = 1  # store one sample in this many (doubles each time the history is halved)
        self._seen = 0
        self._baseline: int | None = None
        self._peak = 0
        self._active: dict[str, int] = {}  # phase name -> how many times it is entered right now (nesting)
        self._phase_peaks: dict[str, int] = {}
        self._ticker = Ticker(self.sample, interval_ms / 1000, "edgesplit-memory-sampler")

    def start(self) -> None:
        if self._ticker.running:
            return
        self.sample()
        self._ticker.start()

    def stop(self) -> None:
        if self._ticker.running:
            self._ticker.stop()
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def sample(self) -> int:
        """Take one sample now (the thread calls this; so do phase boundaries) and return it."""
        rss = self._rss_bytes()
        with self._lock:
            if self._baseline is None:
                self._baseline = rss
            self._peak = max(self._peak, rss)
            for name in self._active:
                self._phase_peaks[name] = max(self._phase_peaks.get(name, 0), rss)
            if self._seen % self._keep_every == 0:
                self._samples.append(rss)
                if len(self._samples) > self._max_samples:
                    self._samples = self._samples[::2]
                    self._keep_every *= 2
            self._seen += 1
        return rss

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak RSS seen while inside; phases may nest; a phase entered again keeps its maximum."""
        with self._lock:
            self._active[name] = self._active.get(name, 0) + 1
        self.sample()
        try:
            yield
        finally:
            self.sample()
            with self._lock:
                self._active[name] -= 1
                if not self._active[name]:
                    del self._active[name]

    @property
    def samples(self) -> list[int]:
        with self._lock:
            return self._samples.tolist()

    @property
    def peak_rss_bytes(self) -> int:
        with self._lock:
            return self._peak

    @property
    def steady_rss_bytes(self) -> int:
        """Median of the second half of the kept samples (0 before any sample)."""
        with self._lock:
            kept = self._samples.tolist()
        if not kept:
            return 0
        return int(statistics.median(kept[len(kept) // 2 :]))

    @property
    def baseline_rss_bytes(self) -> int:
        with self._lock:
            return self._baseline or 0

    @property
    def phase_peak_bytes(self) -> dict[str, int]:
        with self._lock:
            return dict(self._phase_peaks)

    def report(self) -> MemoryReport:
        return MemoryReport(
            baseline_bytes=self.baseline_rss_bytes,
            peak_bytes=self.peak_rss_bytes,
            steady_bytes=self.steady_rss_bytes,
            os_max_rss_bytes=os_max_rss_bytes(),
            phase_peak_bytes=self.phase_peak_bytes,
            sample_count=self._seen,
            interval_ms=self.interval_ms,
        )


class PhaseTimer:
    """Wall time per phase per step: `with timer.phase(name):` adds to the step, `step_done()` closes it.

    A phase entered twice in one step adds up; nested phases are each timed in full. `totals` sums over all
    finished steps. Timing uses `time.perf_counter` unless a clock is injected.
    """

    def __init__(self, clock: Clock = time.perf_counter) -> None:
        self._clock = clock
        self._current: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self.steps = 0

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self._clock()
        try:
            yield
        finally:
            self._current[name] = self._current.get(name, 0.0) + (self._clock() - started)

    @property
    def current(self) -> dict[str, float]:
        """The open step's phase seconds so far."""
        return dict(self._current)

    def step_done(self) -> dict[str, float]:
        """This step's seconds per phase; the timer then starts a new step."""
        finished, self._current = self._current, {}
        for name, seconds in finished.items():
            self.totals[name] = self.totals.get(name, 0.0) + seconds
        self.steps += 1
        return finished
