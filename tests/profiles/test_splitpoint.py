"""The split-point profiler on a tiny Llama (3 layers, so cuts 1 and 2): a measured row per cut, exact wire
bytes, the estimate's formula, the memory budget, the written report, and --save-profile."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from edgesplit.client.protocol import Wire
from edgesplit.devices.profiles import LinkProfile, load_profile
from edgesplit.profiles import cli
from edgesplit.profiles.splitpoint import (
    CutMeasurement,
    ProfileReport,
    ProfilingError,
    SweepConfig,
    SweepResult,
    estimate,
    export_cuts,
    parse_cut_layers,
    recommend,
    sweep,
    wire_bytes,
)
from edgesplit.profiles.worker import REFERENCE_GFLOPS, Benchmark, usable_cores

B, T, H = 2, 16, 32  # the tiny Llama's hidden size is 32 (tests/tiny_models.py)
MIB = 2**20
REFERENCE = Benchmark(gflops=REFERENCE_GFLOPS, rounds_gflops=[REFERENCE_GFLOPS])  # "this is the reference"


@pytest.fixture(scope="module")
def swept(tiny_model_dirs: dict[str, Path]) -> SweepResult:
    config = SweepConfig(
        model=str(tiny_model_dirs["llama"]),
        cut_layers=None,
        batch_size=B,
        seq_len=T,
        lora_rank=4,
        lora_alpha=8.0,
        repeats=2,
        # One process: for a tiny model, two export processes importing PyTorch cost more than they save.
        # The parallel export (the command's default) is tested on the real model, below, when slow tests run.
        export_jobs=1,
    )
    return sweep(config, log=lambda message: None)


def test_the_sweep_measures_a_row_per_cut_in_a_torch_free_client(swept: SweepResult) -> None:
    assert swept.num_layers == 3 and swept.hidden_size == H
    # The default cut layers: every cut the model has, up to 8.
    assert [m.cut_layer for m in swept.measurements] == [1, 2]
    for m in swept.measurements:
        assert m.client_step_s > 0 and m.client_forward_s > 0 and m.client_backward_s > 0
        assert m.client_step_s >= m.client_forward_s and m.client_cpu_s > 0
        # Every timed step is kept, for the spread of the estimate: the median is one of them (2 -> their mean).
        assert len(m.client_step_samples_s) == 2
        assert min(m.client_step_samples_s) <= m.client_step_s <= max(m.client_step_samples_s)
        # The machine's speed, read between the steps (one round before each and one after the last).
        assert m.client_speed_factor > 0 and len(m.worker["speed_rounds_gflops"]) == 2 + 1
        assert m.server_speed_factor > 0
        assert m.artifact_bytes > 0 and m.export_s > 0 and m.server_step_s > 0
        assert m.worker["torch_imported"] is False
        # The worker's own peak: its parent (this PyTorch process) is far bigger, and must not leak into it.
        assert 0 < m.worker["baseline_rss_bytes"] < m.client_peak_rss_bytes < 300 * MIB
        assert m.energy_method in ("measured", "estimated")
    one, two = swept.measurements
    assert two.artifact_bytes > one.artifact_bytes  # one more layer on the device
    assert (one.server_source, two.server_source) == ("measured", "fitted")
    assert swept.seconds["total"] >= swept.seconds["export"] + swept.seconds["client"] > 0
    assert swept.cpu_seconds["total"] >= swept.cpu_seconds["load+export"] > 0  # the export processes counted


def test_cut_layers_beyond_the_model_are_refused(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    config = SweepConfig(model=str(tiny_model_dirs["llama"]), cut_layers=(1, 3), export_jobs=1)
    with pytest.raises(ProfilingError, match="a cut layer must be 1 to 2"):
        export_cuts(config, tmp_path)


def test_bytes_per_step_are_the_analytic_sizes(swept: SweepResult) -> None:
    for m in swept.measurements:
        assert m.upload_payload_bytes == B * T * H * 4 + 2 * B * T * 8  # fp32 activations + int64 mask, labels
        assert m.download_payload_bytes == B * T * H * 4  # fp32 activation gradients
        # The frame adds its 8-byte header and a JSON description of the tensors, nothing more.
        assert 0 < m.upload_bytes - m.upload_payload_bytes < 1024
        assert 0 < m.download_bytes - m.download_payload_bytes < 1024
    fp16 = wire_bytes(B, T, H, Wire.FP16)
    assert fp16.upload_payload == B * T * H * 2 + 2 * B * T * 8 and fp16.download_payload == B * T * H * 2
    int8 = wire_bytes(B, T, H, Wire.INT8)  # one byte per value plus one float32 scale per token
    assert int8.download_payload == B * T * H + B * T * 4


def test_the_link_model_knows_int4() -> None:
    """Half a byte per value plus one float32 scale per token, in both directions; the profile's link time
    (estimate.py) follows from these bytes."""
    int4 = wire_bytes(B, T, H, Wire.INT4)
    assert int4.download_payload == (B * T * H + 1) // 2 + B * T * 4
    assert int4.upload_payload == int4.download_payload + 2 * B * T * 8  # the mask and labels travel raw
    assert 0 < int4.upload - int4.upload_payload < 1024


def measurement(cut: int, step_s: float, peak_mib: float, server_s: float = 0.5, speed: float = 1.0) -> CutMeasurement:
    return CutMeasurement(
        cut_layer=cut,
        client_step_s=step_s,
        client_forward_s=step_s / 3,
        client_backward_s=step_s / 2,
        client_cpu_s=step_s,
        client_speed_factor=speed,
        client_peak_rss_bytes=int(peak_mib * MIB),
        artifact_bytes=1,
        upload_bytes=1_000_000,
        download_bytes=2_000_000,
        upload_payload_bytes=1,
        download_payload_bytes=1,
        server_step_s=server_s,
        server_source="measured",
        server_speed_factor=speed,
        export_s=1.0,
        energy_method="estimated",
        measured_joules_per_step=None,
    )


def test_the_estimate_scales_the_client_and_adds_the_link_and_the_server() -> None:
    device = load_profile("raspberry-pi-5")  # cpu_speed_factor 0.5, 4 cores, 3 W idle, 8 W active
    link = LinkProfile(uplink_mbps=8.0, downlink_mbps=16.0, rtt_ms=50.0)
    # Measured while this machine ran at half the reference machine's speed: as fast as the device.
    half_speed = measurement(1, 0.2, 100, server_s=0.5, speed=0.5)
    result = estimate(half_speed, device, link, budget_mb=512)
    assert result.client_s == pytest.approx(0.2)
    assert result.upload_s == pytest.approx(1.0)  # 1 MB at 8 Mbit/s
    assert result.download_s == pytest.approx(1.0)  # 2 MB at 16 Mbit/s
    assert result.rtt_s == pytest.approx(0.05)
    assert result.server_s == pytest.approx(0.5 * 0.5)  # the server's time at the reference machine's speed
    assert result.step_s == pytest.approx(0.2 + 1.0 + 1.0 + 0.05 + 0.25)
    assert result.client_cpu_s == pytest.approx(0.2 * 4)  # every core of the device busy for the client time
    assert result.energy_j == pytest.approx(3.0 * result.step_s + result.client_cpu_s * (8.0 - 3.0) / 4)
    assert result.fits_memory
    assert not estimate(measurement(1, 0.2, 600), device, link, budget_mb=512).fits_memory
    gpu_server = estimate(half_speed, device, link, budget_mb=512, server_speedup=10)
    assert gpu_server.server_s == pytest.approx(0.025)
    assert gpu_server.step_s == pytest.approx(result.step_s - 0.225)


def test_the_recommendation_respects_the_memory_budget() -> None:
    device, link = load_profile("raspberry-pi-5"), LinkProfile(20.0, 100.0, 30.0)
    rows = [
        measurement(1, 0.1, 100, server_s=3.0),
        measurement(2, 0.2, 300, server_s=2.0),
        measurement(3, 0.3, 600, server_s=1.0),
    ]

    def choose(budget_mb: float) -> int | None:
        estimates = [estimate(m, device, link, budget_mb) for m in rows]
        return recommend(rows, estimates, budget_mb, "budget").cut_layer

    assert choose(10_000) == 3  # fastest overall
    assert choose(512) == 2  # cut 3 is faster but does not fit
    assert choose(200) == 1
    assert choose(50) is None
    estimates = [estimate(m, device, link, 50) for m in rows]
    assert "no cut fits" in recommend(rows, estimates, 50, "budget").reason
    # Within the tie tolerance, the cut with fewer layers on the device wins.
    tied = [measurement(1, 0.10, 100, server_s=1.0), measurement(2, 0.11, 100, server_s=1.0)]
    tied_estimates = [estimate(m, device, link, 512) for m in tied]
    choice = recommend(tied, tied_estimates, 512, "budget")
    assert choice.cut_layer == 1 and "fewest layers" in choice.reason


def test_the_report_says_what_is_measured_and_what_is_scaled(swept: SweepResult, tmp_path: Path) -> None:
    device = load_profile("raspberry-pi-5")
    peaks = [m.client_peak_rss_bytes / MIB for m in swept.measurements]
    report = ProfileReport.build(swept, device, "wifi", device.link("wifi"), REFERENCE, max(peaks) + 1)
    assert report.recommendation.cut_layer in (1, 2)
    assert (
        ProfileReport.build(
            swept, device, "wifi", device.link("wifi"), REFERENCE, min(peaks) - 1
        ).recommendation.cut_layer
        is None
    )

    paths = report.write(tmp_path / "profile")
    with paths["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["cut_layer"]) for row in rows] == [1, 2]
    assert "client_step_ms_measured_here" in rows[0] and "client_step_ms_scaled_to_device" in rows[0]
    assert sum(row["recommended"] == "True" for row in rows) == 1
    written = json.loads(paths["json"].read_text())
    assert written["device"]["name"] == "raspberry-pi-5"
    assert written["recommendation"]["cut_layer"] == report.recommendation.cut_layer
    assert [cut["measured_here"]["cut_layer"] for cut in written["cuts"]] == [1, 2]
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.table()
    assert "measured here" in table and "scaled to raspberry-pi-5" in table and "recommended: cut" in table


def test_save_profile_round_trips_and_loads_as_a_device(tmp_path: Path) -> None:
    path = tmp_path / "My Device.toml"
    assert cli.main(["--save-profile", str(path), "--skip-sweep", "--device", "raspberry-pi-5"]) == 0
    saved = load_profile(path)
    base = load_profile("raspberry-pi-5")
    assert saved.name == "my-device"
    assert saved.cores == usable_cores() and saved.memory_mb == psutil.virtual_memory().total // MIB
    assert saved.cpu_speed_factor > 0 and "measured" in saved.cpu_speed_source
    assert (saved.idle_w, saved.active_w, saved.links) == (base.idle_w, base.active_w, base.links)
    assert saved.energy_reader in ("rapl", "ina3221", "pi-pmic", "nvml", "estimate")

    unknown = tmp_path / "bare.toml"
    assert cli.main(["--save-profile", str(unknown), "--skip-sweep"]) == 0
    assert load_profile(unknown).idle_w_source.startswith("unknown")


def test_the_cli_prints_the_table_and_writes_the_report(
    swept: SweepResult,
    tiny_model_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import edgesplit.profiles.splitpoint

    asked: list[SweepConfig] = []

    def fake_sweep(config: SweepConfig) -> SweepResult:  # the real one ran once, in the fixture
        asked.append(config)
        return dataclasses.replace(swept, config=config)

    monkeypatch.setattr(edgesplit.profiles.splitpoint, "sweep", fake_sweep)
    device = tmp_path / "device.toml"
    assert cli.main(["--save-profile", str(device), "--skip-sweep", "--device", "raspberry-pi-4"]) == 0
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "--model",
                str(tiny_model_dirs["llama"]),  # a name that is no model is refused before the sweep
                "--device",
                str(device),
                "--cut-layers",
                "1-2",
                "--batch-size",
                str(B),
                "--seq-len",
                str(T),
                "--uplink-mbps",
                "5",
                "--max-memory-mb",
                "100000",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert asked[0].cut_layers == (1, 2) and asked[0].batch_size == B
    printed = capsys.readouterr().out
    assert "scaled to device" in printed and "recommended: cut" in printed and "up 5 Mbit/s" in printed
    assert {p.name for p in out.iterdir()} == {"profile.csv", "profile.json", "profile.png"}


def test_parse_cut_layers() -> None:
    assert parse_cut_layers("1-8") == tuple(range(1, 9))
    assert parse_cut_layers("4, 1,2-3,4") == (1, 2, 3, 4)
    for bad in ("", "a", "3-1", "1-"):
        with pytest.raises(ProfilingError):
            parse_cut_layers(bad)


def test_the_device_side_never_imports_torch() -> None:
    code = (
        "import sys, edgesplit.profiles.worker, edgesplit.devices.profiles, edgesplit.client.head;"
        " print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_benchmark_reports_a_positive_speed() -> None:
    from edgesplit.profiles.worker import cpu_benchmark

    result = cpu_benchmark(rounds=2, per_round=1)
    assert result.gflops > 0 and result.speed_factor == pytest.approx(result.gflops / REFERENCE_GFLOPS)
    assert np.isclose(np.median(result.rounds_gflops), result.gflops, rtol=0.01)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EDGESPLIT_SLOW") != "1", reason="uses the real default model: EDGESPLIT_SLOW=1")
def test_the_default_model_sweeps_in_two_export_processes() -> None:
    result = sweep(SweepConfig(cut_layers=(1, 2), export_jobs=2, repeats=2), log=lambda message: None)
    assert (result.family, result.num_layers, result.hidden_size) == ("llama", 30, 576)
    one, two = result.measurements
    assert one.upload_payload_bytes == 4 * 128 * 576 * 4 + 2 * 4 * 128 * 8
    assert 100e6 < one.artifact_bytes < two.artifact_bytes  # the embedding table alone is 113 MB
    assert 0 < one.client_peak_rss_bytes < two.client_peak_rss_bytes
    assert one.server_step_s > two.server_step_s > 0  # one tail layer fewer


def test_the_link_model_knows_int4k() -> None:
    """Per real token a float16 scale, 8 outliers (uint16 index, float16 value) and half a byte per value; per
    position a bitmap bit; padding rows not sent. The sweep assumes every position a token."""
    row = 2 + 8 * 4 + (H + 1) // 2
    every = wire_bytes(B, T, H, Wire.INT4K)
    assert every.download_payload == (B * T + 7) // 8 + B * T * row
    assert every.upload_payload == every.download_payload + 2 * B * T * 8
    assert 0 < every.upload - every.upload_payload < 1024
    half = wire_bytes(B, T, H, Wire.INT4K, real_tokens=0.5)
    assert half.download_payload == (B * T + 7) // 8 + round(B * T * 0.5) * row
    assert 0 < half.upload - half.upload_payload < 1024
    assert wire_bytes(B, T, H, Wire.INT4, real_tokens=0.5) == wire_bytes(B, T, H, Wire.INT4)  # int4 sends every row
    with pytest.raises(ProfilingError, match="between 0 and 1"):
        wire_bytes(B, T, H, Wire.INT4K, real_tokens=1.5)
