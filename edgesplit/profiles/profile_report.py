"""The split-point profiler's report: a finished sweep with its device, link, memory budget, estimates and
recommended cut (ProfileReport), as CSV rows, JSON, a text table and a plot.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgesplit.devices.profiles import DeviceProfile, LinkProfile
from edgesplit.profiles.estimate import estimate
from edgesplit.profiles.recommendation import Recommendation, overlapping_cuts, recommend
from edgesplit.profiles.records import MIB, CutEstimate, CutMeasurement, ProfilingError, SweepResult
from edgesplit.profiles.worker import Benchmark, cpu_name, usable_cores


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
