"""The split-point profiler's records: the sweep's settings, one cut's measurements and estimate, the sweep's
result, and the error a sweep raises. Plain data, imported by the sweep (splitpoint.py), its measurement
(measure.py), the estimate (estimate.py), the recommendation (recommendation.py) and the report
(profile_report.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgesplit.client.protocol import Wire
from edgesplit.errors import DataError

DEFAULT_MODEL = "smollm2-135m"  # edgesplit.export.models.DEFAULT_MODEL, spelled out so importing this needs no export
DEFAULT_MAX_CUT = 8
MIB = 2**20


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
