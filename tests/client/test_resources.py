"""MemorySampler and PhaseTimer: real allocations for the sampler, injected RSS and clocks for arithmetic."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgesplit.client.resources import MemorySampler, PhaseTimer, os_max_rss_bytes, process_rss_bytes

MIB = 1 << 20


def test_sampler_sees_a_100_mb_allocation_as_a_peak_in_its_phase() -> None:
    with MemorySampler(interval_ms=5) as memory:
        with memory.phase("warmup"):
            time.sleep(0.05)
        with memory.phase("head_forward"):
            activations = np.ones(100 * MIB // 8)  # 100 MiB of float64, every page touched
            time.sleep(0.1)
            del activations  # freed inside the phase: only the thread's samples can have seen it
            time.sleep(0.05)
        with memory.phase("after"):
            time.sleep(0.05)
    report = memory.report()
    peaks = report.phase_peak_bytes
    assert peaks["head_forward"] - report.baseline_bytes > 80 * MIB
    assert peaks["head_forward"] - peaks["warmup"] > 80 * MIB
    assert peaks["head_forward"] - peaks["after"] > 80 * MIB, "large arrays go back to the OS when freed"
    assert report.peak_bytes >= peaks["head_forward"]
    assert report.os_max_rss_bytes >= report.peak_bytes - MIB  # the kernel's high-water mark misses nothing
    assert report.sample_count > 20
    assert set(report.to_json()) >= {"peak_bytes", "steady_bytes", "os_max_rss_bytes", "phase_peak_bytes"}


def test_steady_is_the_median_of_the_second_half_and_phases_nest() -> None:
    readings = iter([100, 500, 120, 130, 900, 140, 150, 160])
    memory = MemorySampler(rss_bytes=lambda: next(readings))
    memory.sample()  # 100
    with memory.phase("step"):  # enter: 500
        with memory.phase("encode"):  # enter: 120
            memory.sample()  # 130
        # encode exit: 900
        memory.sample()  # 140
    # step exit: 150
    memory.sample()  # 160
    assert memory.samples == [100, 500, 120, 130, 900, 140, 150, 160]
    assert memory.baseline_rss_bytes == 100
    assert memory.peak_rss_bytes == 900
    assert memory.steady_rss_bytes == 155  # median of [900, 140, 150, 160]: (150 + 160) / 2
    assert memory.phase_peak_bytes == {"step": 900, "encode": 900}


def test_a_phase_entered_again_keeps_its_maximum() -> None:
    readings = iter([10, 70, 20, 30])
    memory = MemorySampler(rss_bytes=lambda: next(readings))
    for _ in range(2):
        with memory.phase("tail_wait"):
            pass
    assert memory.phase_peak_bytes == {"tail_wait": 70}


def test_history_is_thinned_past_max_samples_but_the_peak_is_kept() -> None:
    readings = iter(range(1, 1001))
    memory = MemorySampler(rss_bytes=lambda: next(readings), max_samples=100)
    for _ in range(1000):
        memory.sample()
    kept = memory.samples
    assert 50 <= len(kept) <= 100
    assert kept == sorted(kept) and kept[0] == 1
    assert memory.peak_rss_bytes == 1000
    assert memory.report().sample_count == 1000


def test_rss_readers_are_plausible() -> None:
    rss = process_rss_bytes()
    assert 10 * MIB < rss < 8 * 1024 * MIB
    assert os_max_rss_bytes() >= rss - MIB


def test_timer_accumulates_per_phase_per_step() -> None:
    now = [0.0]
    timer = PhaseTimer(clock=lambda: now[0])
    with timer.phase("encode"):
        now[0] += 0.5
    with timer.phase("head_forward"):
        now[0] += 1.0
    with timer.phase("encode"):  # a second entry in the same step adds up
        now[0] += 0.25
    assert timer.current == {"encode": 0.75, "head_forward": 1.0}
    assert timer.step_done() == {"encode": 0.75, "head_forward": 1.0}
    assert timer.current == {}

    with pytest.raises(RuntimeError), timer.phase("send"):
        now[0] += 2.0
        raise RuntimeError("link dropped")
    assert timer.step_done() == {"send": 2.0}, "a phase that raised still counts its time"
    assert timer.steps == 2
    assert timer.totals == {"encode": 0.75, "head_forward": 1.0, "send": 2.0}


def test_timer_with_the_real_clock() -> None:
    timer = PhaseTimer()
    with timer.phase("sleep"):
        time.sleep(0.02)
    assert 0.015 < timer.step_done()["sleep"] < 1.0


def test_ticker_ticks_until_stopped_and_stops_at_once() -> None:
    import threading
    import time

    from edgesplit.client.resources import Ticker

    ticked = threading.Event()
    count = [0]

    def tick() -> None:
        count[0] += 1
        ticked.set()

    ticker = Ticker(tick, 0.01, "test-ticker")
    ticker.start()
    ticker.start()  # a second start is a no-op, not a second thread
    assert ticked.wait(5) and ticker.running
    assert sum(t.name == "test-ticker" for t in threading.enumerate()) == 1
    slow = Ticker(tick, 3600.0, "slow-ticker")
    slow.start()
    started = time.monotonic()
    slow.stop()  # waits on an event, not for the rest of its hour
    assert time.monotonic() - started < 5 and not slow.running
    ticker.stop()
    after = count[0]
    time.sleep(0.05)
    assert count[0] == after and not ticker.running
