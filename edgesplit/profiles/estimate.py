"""The estimate of one cut's training step on a device over a link, from what the sweep measured here:

    step_s   = client_s * client_speed / device.cpu_speed_factor    (the client, scaled to the device)
             + upload_bytes * 8 / uplink_bps + download_bytes * 8 / downlink_bps + rtt_s
             + server_s * server_speed / server_speedup              (scaled to the reference machine)
    energy_j = idle_w * step_s + (active_w - idle_w) * device_client_s       (EstimatedEnergy's model, every
                                                                               core busy for the client)

with a spread from the fastest and slowest of the repeated client steps (see splitpoint.py for the sweep).
"""

from __future__ import annotations

from edgesplit.client.energy import EstimatedEnergy
from edgesplit.devices.profiles import DeviceProfile, LinkProfile
from edgesplit.profiles.records import MIB, CutEstimate, CutMeasurement


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
