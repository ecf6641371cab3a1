"""`edgesplit profile`: what each cut layer costs, measured here and scaled to a device, and which to pick.

    edgesplit profile --model smollm2-135m --device raspberry-pi-5 [--cut-layers 1-8] [--batch-size 4]
                      [--seq-len 128] [--quantize int8] [--uplink-mbps 20 --downlink-mbps 50 --rtt-ms 30]
                      [--max-memory-mb 512] [--out runs/profile] [--save-profile my-device.toml]
    edgesplit profile --save-profile my-device.toml --skip-sweep     (on the device itself; needs no PyTorch)
    edgesplit profile --model smollm2-135m --devices raspberry-pi-4,raspberry-pi-5,jetson-orin-nano
                      (one sweep; a cut per device, and the --cut-layers of one export for all of them)

See docs/profiling.md for the method and what is measured versus scaled.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from edgesplit.client.tensors import Wire
from edgesplit.devices.profiles import DeviceProfile, LinkProfile, ProfileError, load_profile, save_profile


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="hub id, local model directory, .gguf file, or 'smollm2-135m' (default)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="built-in profile name or a profile .toml (default: this machine, measured now)",
    )
    parser.add_argument(
        "--devices",
        default=None,
        help="several device profiles, comma-separated, for one mixed federation: the sweep runs once, each "
        "device gets its recommended cut, and the `edgesplit export --cut-layers` that serves them all is "
        "printed and written to OUT/devices.json",
    )
    parser.add_argument("--cut-layers", default=None, help="layers and ranges, e.g. 1-8 or 1,2,4 (default 1-8)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per training step (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="the head's frozen weights as exported: int8 is weight-only (default none)",
    )
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the client's LoRA matrices (default 8)")
    parser.add_argument(
        "--wire",
        choices=tuple(wire.value for wire in Wire),
        default="fp32",
        help="how activations and their gradients travel (default fp32; int4k assumes every token real)",
    )
    parser.add_argument("--link", default=None, help="the device profile's link (default wifi, else its first)")
    parser.add_argument("--uplink-mbps", type=float, default=None, help="overrides the link's uplink")
    parser.add_argument("--downlink-mbps", type=float, default=None, help="overrides the link's downlink")
    parser.add_argument("--rtt-ms", type=float, default=None, help="overrides the link's round-trip time")
    parser.add_argument(
        "--max-memory-mb",
        type=float,
        default=None,
        help="client memory budget in MiB (default: the device's RAM)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed client steps per cut: the median, and the min-max spread that tells whether two cuts "
        "were separated (default 3)",
    )
    parser.add_argument(
        "--server-every-cut",
        action="store_true",
        help="time the server's tail at every cut instead of fitting a line through two",
    )
    parser.add_argument(
        "--server-speedup",
        type=float,
        default=1.0,
        help="the real server is this many times faster than this machine (default 1: this machine)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="processes exporting cuts in parallel, each loading the model (2)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/profile"), help="where CSV, JSON and PNG go")
    parser.add_argument(
        "--save-profile",
        type=Path,
        default=None,
        help="write this machine as a device profile TOML (loadable with --device PATH)",
    )
    parser.add_argument("--skip-sweep", action="store_true", help="with --save-profile: only write the profile")
    return parser


def profile_name(path: Path) -> str:
    """A profile name (lower-case slug) from the file name: "My Device.toml" -> "my-device"."""
    return re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._") or "my-device"


def choose_link(
    device: DeviceProfile,
    name: str | None,
    uplink: float | None,
    downlink: float | None,
    rtt_ms: float | None,
) -> tuple[str, LinkProfile]:
    name = name or ("wifi" if "wifi" in device.links else next(iter(device.links)))
    base = device.link(name)
    overrides = {
        k: v for k, v in {"uplink_mbps": uplink, "downlink_mbps": downlink, "rtt_ms": rtt_ms}.items() if v is not None
    }
    if not overrides:
        return name, base
    flags = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in overrides.items())
    merged = {
        "uplink_mbps": base.uplink_mbps,
        "downlink_mbps": base.downlink_mbps,
        "rtt_ms": base.rtt_ms,
        **overrides,
    }
    return f"{name} + flags", LinkProfile(**merged, source=f"{flags}; the rest from the {device.name} {name} link")


def check_model_and_cuts(model: str, cut_layers: tuple[int, ...] | None) -> None:
    """Refuse an unknown --model, or cut layers past its depth where the depth can be read without loading it,
    before the benchmark and the exports: a sweep loads the model in each export process."""
    from edgesplit.export.preflight import check_cut_layers, check_model_name, known_depth

    check_model_name(model)
    depth = known_depth(model)
    if cut_layers is not None and depth is not None:
        check_cut_layers(cut_layers, depth, flag="--cut-layers")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.devices is not None and (args.device is not None or args.save_profile is not None):
        parser.error("--devices profiles several devices at once: leave out --device and --save-profile")
    if args.skip_sweep and args.save_profile is None:
        raise ProfileError("--skip-sweep only makes sense with --save-profile")
    from edgesplit.profiles.worker import cpu_benchmark, machine_profile

    cut_layers: tuple[int, ...] | None = None
    if not args.skip_sweep:  # the sweep's arguments, checked before the benchmark and the model load
        from edgesplit.profiles.splitpoint import parse_cut_layers

        cut_layers = parse_cut_layers(args.cut_layers) if args.cut_layers else None
        check_model_and_cuts(args.model, cut_layers)
    device = load_profile(args.device) if args.device else None
    devices = [load_profile(name.strip()) for name in args.devices.split(",") if name.strip()] if args.devices else []
    if args.devices is not None and not devices:
        parser.error(f"--devices names no profile: {args.devices!r}")
    here = cpu_benchmark()  # before the model loads: nothing else of ours is running
    if args.save_profile is not None:
        measured = machine_profile(profile_name(args.save_profile), here, base=device)
        save_profile(measured, args.save_profile)
        print(
            f"wrote {args.save_profile}: {measured.name}, {measured.cores} cores, {measured.memory_mb} MiB, "
            f"cpu_speed_factor {measured.cpu_speed_factor:g} (measured), "
            f"energy reader {measured.energy_reader}, "
            f"power figures {'from ' + device.name if device else 'unknown (placeholders)'}"
        )
        device = device or measured
    if args.skip_sweep:
        return 0
    device = device or (devices[0] if devices else machine_profile("this-machine", here))

    from edgesplit.profiles.splitpoint import ProfileReport, SweepConfig, sweep

    config = SweepConfig(
        model=args.model,
        cut_layers=cut_layers,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        quantize=args.quantize,
        lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank,
        wire=args.wire,
        repeats=args.repeats,
        server_every_cut=args.server_every_cut,
        export_jobs=args.jobs,
    )
    result = sweep(config)
    if devices:
        return _federation(args, result, devices, here)
    link_name, link = choose_link(device, args.link, args.uplink_mbps, args.downlink_mbps, args.rtt_ms)
    report = ProfileReport.build(result, device, link_name, link, here, args.max_memory_mb, args.server_speedup)
    print(report.table())
    paths = report.write(args.out)
    print("wrote " + ", ".join(str(path) for path in paths.values()))
    return 0


def _federation(args: argparse.Namespace, result: Any, devices: list[DeviceProfile], here: Any) -> int:
    """--devices: one sweep's measurements, scaled to each device over its own link; a cut for each, and the
    one export that holds them all."""
    import json

    from edgesplit.profiles.recommendation import FederationPlan
    from edgesplit.profiles.splitpoint import ProfileReport

    recommendations = {}
    for device in devices:
        link_name, link = choose_link(device, args.link, args.uplink_mbps, args.downlink_mbps, args.rtt_ms)
        report = ProfileReport.build(result, device, link_name, link, here, args.max_memory_mb, args.server_speedup)
        print(report.table())
        paths = report.write(args.out / device.name)
        print("wrote " + ", ".join(str(path) for path in paths.values()))
        recommendations[device.name] = report.recommendation
    plan = FederationPlan(recommendations)
    print("\none federation of mixed devices:")
    for name, recommendation in plan.by_device.items():
        cut = "none fits" if recommendation.cut_layer is None else f"cut {recommendation.cut_layer}"
        print(f"  {name}: {cut} ({recommendation.reason})")
    command = plan.export_command(args.model)
    print(f"export: {command}" if command else "export: no device has a cut that fits; nothing to export")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "devices.json").write_text(json.dumps(plan.to_json(args.model), indent=2) + "\n")
    print(f"wrote {args.out / 'devices.json'}")
    return 0 if command else 1
