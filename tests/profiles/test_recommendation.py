"""The recommended cut and its reason, on made-up sweep results: the printed reason must be true to the rule
(fewest device layers within 5% of the lowest estimate), and cuts the repeats could not separate are named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from edgesplit.devices.profiles import LinkProfile, load_profile
from edgesplit.errors import DataError
from edgesplit.profiles.recommendation import Recommendation, overlapping_cuts, recommend
from edgesplit.profiles.splitpoint import (
    CutEstimate,
    CutMeasurement,
    ProfileReport,
    SweepConfig,
    SweepResult,
    estimate,
)
from edgesplit.profiles.worker import REFERENCE_GFLOPS, Benchmark

MIB = 2**20


def measured(
    cut: int, samples: tuple[float, ...], peak_mib: float = 100, median_s: float | None = None
) -> CutMeasurement:
    """A cut whose client steps took `samples` seconds (median_s when no samples are kept)."""
    ordered = sorted(samples)
    return CutMeasurement(
        cut_layer=cut,
        client_step_s=ordered[len(ordered) // 2] if ordered else (median_s or 0.1),
        client_forward_s=0.01,
        client_backward_s=0.01,
        client_cpu_s=0.01,
        client_speed_factor=1.0,
        client_peak_rss_bytes=int(peak_mib * MIB),
        artifact_bytes=1,
        upload_bytes=1000,
        download_bytes=1000,
        upload_payload_bytes=1,
        download_payload_bytes=1,
        server_step_s=1.0,
        server_source="measured",
        server_speed_factor=1.0,
        export_s=1.0,
        energy_method="estimated",
        measured_joules_per_step=None,
        client_step_samples_s=samples,
    )


def estimated(cut: int, step_s: float, low: float | None = None, high: float | None = None) -> CutEstimate:
    return CutEstimate(
        cut_layer=cut,
        client_s=step_s / 2,
        upload_s=0.0,
        download_s=0.0,
        rtt_s=0.0,
        server_s=step_s / 2,
        step_s=step_s,
        step_s_min=step_s if low is None else low,
        step_s_max=step_s if high is None else high,
        client_cpu_s=step_s / 2,
        energy_j=1.0,
        fits_memory=True,
    )


def choose(estimates: list[CutEstimate]) -> Recommendation:
    peaks = [measured(e.cut_layer, (0.1,)) for e in estimates]
    return recommend(peaks, estimates, 512, "budget")


def test_the_reason_names_the_best_cut_and_why_a_slower_one_is_chosen() -> None:
    # The newcomer's sweep: cut 4 is the fastest, cut 2 is within 5% of it with fewer layers on the device.
    choice = choose([estimated(1, 4.90), estimated(2, 4.56), estimated(3, 4.60), estimated(4, 4.44)])
    assert choice.cut_layer == 2
    assert (choice.best_cut_layer, choice.best_step_s) == (4, 4.44)
    assert choice.within_tolerance == (2, 3, 4)  # 4.90 is more than 5% above 4.44
    assert choice.reason.startswith("4.56 s, 2.7% above the lowest estimated step time (cut 4, 4.44 s)")
    assert "of cuts 2, 3 and 4 within 5% of it, cut 2 keeps the fewest layers on the device" in choice.reason
    assert "rule: the fewest layers on the device among the cuts within 5% of the lowest estimated" in choice.reason
    assert "lowest estimated step time (4.56" not in choice.reason  # what the old text claimed


def test_when_the_fastest_cut_is_chosen_the_reason_says_so() -> None:
    choice = choose([estimated(1, 3.0), estimated(2, 3.1), estimated(3, 2.0)])
    assert choice.cut_layer == 3 and choice.best_cut_layer == 3 and choice.within_tolerance == (3,)
    assert choice.reason.startswith("the lowest estimated step time, 2.00 s; 3 of 3 cuts fit the budget")
    tied = choose([estimated(1, 2.0), estimated(2, 2.05)])
    assert tied.cut_layer == 1
    assert tied.reason.startswith("the lowest estimated step time, 2.00 s (cut 2 within 5% of it, with more layers")


def test_cuts_whose_spreads_overlap_are_too_noisy_to_separate() -> None:
    noisy = choose([estimated(2, 4.56, 4.40, 4.70), estimated(4, 4.44, 4.38, 4.52), estimated(6, 9.0, 8.9, 9.1)])
    assert noisy.too_noisy_to_separate == ((2, 4),)
    assert "too noisy to separate: cuts 2 and 4" in noisy.reason
    assert "cut 2 4.40-4.70 s, cut 4 4.38-4.52 s overlap" in noisy.reason
    clean = choose([estimated(2, 4.56, 4.55, 4.57), estimated(4, 4.44, 4.43, 4.45)])
    assert clean.too_noisy_to_separate == () and "too noisy" not in clean.reason
    spreads = [estimated(1, 1.0, 0.9, 1.1), estimated(2, 1.05, 1.0, 1.2), estimated(3, 2.0, 1.9, 2.1)]
    assert overlapping_cuts(spreads) == {1: (2,), 2: (1,), 3: ()}


def test_no_fitting_cut_is_a_recommendation_of_none() -> None:
    too_big = [measured(1, (0.1,), peak_mib=600), measured(2, (0.1,), peak_mib=700)]
    estimates = [CutEstimate(**{**estimated(m.cut_layer, 1.0).__dict__, "fits_memory": False}) for m in too_big]
    choice = recommend(too_big, estimates, 512, "budget")
    assert choice.cut_layer is None and "smallest measured peak RSS is 600 MiB at cut 1" in choice.reason
    with pytest.raises(DataError, match="must be one of"):
        Recommendation(3, "made up", within_tolerance=(1, 2))


def test_the_estimates_spread_comes_from_the_fastest_and_slowest_client_step() -> None:
    device = load_profile("raspberry-pi-5")  # cpu_speed_factor 0.5: a client second here is two there
    link = LinkProfile(uplink_mbps=8.0, downlink_mbps=16.0, rtt_ms=50.0)
    result = estimate(measured(1, (0.1, 0.2, 0.4)), device, link, budget_mb=512)
    assert result.client_s == pytest.approx(0.4)
    assert result.step_s_min == pytest.approx(result.step_s - (0.2 - 0.1) * 2)
    assert result.step_s_max == pytest.approx(result.step_s + (0.4 - 0.2) * 2)
    single = estimate(measured(1, (), median_s=0.2), device, link, budget_mb=512)  # no samples kept: no spread
    assert single.step_s_min == single.step_s == single.step_s_max


def test_the_report_carries_the_spread_and_marks_the_noisy_cuts(tmp_path: Path) -> None:
    device = load_profile("raspberry-pi-5")
    link = LinkProfile(uplink_mbps=1000.0, downlink_mbps=1000.0, rtt_ms=1.0)
    sweep = SweepResult(
        config=SweepConfig(cut_layers=(1, 2, 3), repeats=3),
        model_source="made-up",
        family="llama",
        num_layers=30,
        hidden_size=576,
        # Cuts 1 and 2 overlap; cut 3 is far slower and its steps agree.
        measurements=[measured(1, (1.0, 1.1, 1.3)), measured(2, (0.9, 1.05, 1.2)), measured(3, (3.0, 3.0, 3.01))],
        seconds={"load": 1.0, "export": 1.0, "client": 1.0, "server": 1.0, "total": 4.0},
        cpu_seconds={"total": 4.0},
    )
    reference = Benchmark(gflops=REFERENCE_GFLOPS, rounds_gflops=[REFERENCE_GFLOPS])
    report = ProfileReport.build(sweep, device, "fast", link, reference, max_memory_mb=512)
    assert report.recommendation.cut_layer == 1 and report.recommendation.best_cut_layer == 2
    assert report.recommendation.too_noisy_to_separate == ((1, 2),)

    paths = report.write(tmp_path)
    with paths["csv"].open() as handle:
        rows = {int(row["cut_layer"]): row for row in csv.DictReader(handle)}
    assert (rows[2]["client_step_ms_min_measured_here"], rows[2]["client_step_ms_max_measured_here"]) == (
        "900.0",
        "1200.0",
    )
    assert float(rows[2]["step_s_min_estimated_on_device"]) < float(rows[2]["step_s_estimated_on_device"])
    assert [rows[cut]["spread_overlaps_cuts"] for cut in (1, 2, 3)] == ["2", "1", ""]
    written = json.loads(paths["json"].read_text())
    assert [cut["spread_overlaps_cuts"] for cut in written["cuts"]] == [[2], [1], []]
    assert written["cuts"][0]["measured_here"]["client_step_samples_s"] == [1.0, 1.1, 1.3]
    assert written["recommendation"]["too_noisy_to_separate"] == [[1, 2]]
    assert written["recommendation"]["rule"].startswith("the fewest layers on the device")

    table = report.table()
    lines = {line.split("|")[0].strip(" *"): line for line in table.splitlines() if "|" in line}
    assert lines["1"].rstrip().endswith("yes") and "~" in lines["1"] and "~" in lines["2"] and "~" not in lines["3"]
    assert "'~': the spread overlaps another cut's (too noisy to separate)" in table
    assert "recommended: cut 1: " in table and "too noisy to separate: cuts 1 and 2" in table
