"""`edgesplit client`: train this device's head against a server. Needs only the edge dependencies."""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Callable
from pathlib import Path

from edgesplit.client.checks import SERVER_FORM, check_client_id, check_manifest_shapes, check_server_url
from edgesplit.client.client import ClientConfig, main_summary, run_client
from edgesplit.client.defences import ActivationDefence
from edgesplit.errors import EdgesplitError

_WIDTH = 100
DESCRIPTION = textwrap.fill(
    "Train this device's part of the model (the head) against an `edgesplit serve` server. Needs only the "
    "device install: ONNX Runtime and numpy, no PyTorch. The device needs only its own files of the export: "
    "manifest.json, tokenizer.json, head_adapters.safetensors and the head*.onnx files with their .data "
    "files; the server's tail/ may stay on the server.",
    _WIDTH,
)
EPILOG = "\n".join(
    [
        "example:",
        "  edgesplit client --server ws://192.168.1.20:8765 --artifacts artifacts --data train.jsonl \\",
        "      --client-id pi-kitchen",
        "",
        textwrap.fill(
            "exit status: 0 when the server's run is over; 1 on an error that a later try may not meet "
            "(unreachable, refused, dropped, bad data or artifacts); 2 on a usage error or a missing dependency.",
            _WIDTH,
        ),
    ]
)


def _number(kind: Callable[[str], float], minimum: float, what: str) -> Callable[[str], float]:
    """An argparse type: `kind` of the text, at least `minimum`, or a usage error that says so."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


def _finite(text: str) -> float:
    """An argparse type: a finite number (its range is the caller's to check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def activation_defence(args: argparse.Namespace) -> ActivationDefence | None:
    """The defence that --activation-noise and --activation-clip ask for, or None; EdgesplitError if they are
    out of range, or if --activation-clip comes alone (clipping keeps each vector's direction, which is what
    an inversion reads: alone it hides nothing)."""
    if args.activation_noise is None:
        if args.activation_clip is not None:
            raise EdgesplitError(
                "--activation-clip needs --activation-noise: clipping alone keeps each token's direction, which "
                "is what an inversion reads; add --activation-noise SIGMA (e.g. 0.3)"
            )
        return None
    return ActivationDefence(args.activation_noise, args.activation_clip)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit client",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", required=True, help=f"the server's address: {SERVER_FORM}")
    parser.add_argument(
        "--artifacts",
        type=Path,
        required=True,
        help="the export's directory, or a copy holding only the device's files (see above)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help='training data, JSON Lines: one {"prompt": ..., "completion": ...}, {"context": ..., '
        '"completion": ...} or {"text": ...} object a line; checked before connecting',
    )
    parser.add_argument(
        "--client-id",
        required=True,
        help="this device's name, unique among the server's clients: 1 to 64 of A-Z a-z 0-9 . _ - (no spaces)",
    )
    parser.add_argument("--token-file", type=Path, help="file holding this client's token, if the server asks for one")
    positive = _number(int, 1, "a whole number of at least 1")
    parser.add_argument(
        "--batch-size",
        type=positive,
        metavar="N",
        help="optional, and rarely needed: the client reads the batch size from the export's manifest (the "
        "head is traced for it). Given, it is a check: the client stops at once if the artifacts were "
        "exported with another (a positive whole number)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=positive,
        metavar="N",
        help="optional, and rarely needed: the tokens per example, read from the manifest like --batch-size; "
        "given, the client stops at once if the export's differs (a positive whole number)",
    )
    parser.add_argument("--metrics-out", type=Path, help="JSON Lines file to append per-step and per-round metrics to")
    parser.add_argument(
        "--seed", type=int, default=0, help="added to the server's seed for this client's data order (default 0)"
    )
    parser.add_argument(
        "--group-by-length",
        action="store_true",
        help="draw each batch from examples of like length (still a random mix, each example once an epoch): "
        "with a head exported --dynamic-seq or --seq-buckets, far less padding is computed (on E2E, 98%% of "
        "the computed tokens real instead of 81%%)",
    )
    parser.add_argument(
        "--threads",
        type=_number(int, 0, "a whole number of at least 0"),
        default=0,
        help="ONNX Runtime threads (default 0: all cores)",
    )
    parser.add_argument(
        "--providers",
        default="cpu",
        help="ONNX Runtime execution providers by preference, comma-separated: cpu (default), "
        "cuda, tensorrt, xnnpack or a full provider name; CPU always comes last",
    )
    parser.add_argument(
        "--device-profile",
        help="device profile for the energy estimate where no power sensor can be read, such as raspberry-pi-5; "
        "with a mixed-cut export and no --cut-layer, it also chooses the cut (see --max-memory-mb)",
    )
    parser.add_argument(
        "--cut-layer",
        type=positive,
        metavar="N",
        help="with a mixed-cut export (edgesplit export --cut-layers): run the head of cut N, from the "
        "export's cut<N>/ directory",
    )
    parser.add_argument(
        "--max-memory-mb",
        type=_number(float, 1.0, "a number of MiB of at least 1"),
        help="with a mixed-cut export and --device-profile: the memory budget the chosen cut must fit "
        "(default: the profile's memory)",
    )
    parser.add_argument(
        "--activation-noise",
        type=_finite,
        metavar="SIGMA",
        help="split training: add Gaussian noise to the activations sent up, its norm SIGMA times each token's "
        "(above 0, at most 10; e.g. 0.3). It makes inverting them harder and training noisier; it is not "
        "differential privacy (docs/security.md)",
    )
    parser.add_argument(
        "--activation-clip",
        type=_finite,
        metavar="C",
        help="with --activation-noise: first clip each token's hidden vector to norm C (above 0)",
    )
    parser.add_argument("--ca-file", type=Path, help="CA certificate that signed the server's TLS certificate (wss://)")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines")
    parser.add_argument(
        "--connect-timeout",
        type=_number(float, 1e-9, "a number of seconds above 0"),
        default=60.0,
        help="seconds to keep retrying while the server is not reachable, at the start and "
        "after each lost connection (the client then rejoins where the server says; default 60)",
    )
    return parser


def _device_artifacts(args: argparse.Namespace) -> Path:
    """The directory of this device's head: the export itself, or, for a mixed-cut export, the cut that
    --cut-layer names or that --device-profile with --max-memory-mb chooses (printed, with why)."""
    from edgesplit.client.artifacts import device_artifacts, load_manifest

    manifest = load_manifest(args.artifacts, verify=False)
    if args.cut_layer is not None or not manifest.cuts:
        if args.max_memory_mb is not None and not manifest.cuts:
            raise EdgesplitError(
                f"--max-memory-mb chooses among the cuts of a mixed-cut export; {args.artifacts} has one cut, "
                f"{manifest.cut_layer}"
            )
        return device_artifacts(args.artifacts, args.cut_layer)
    if args.device_profile is None:
        return device_artifacts(args.artifacts, None)  # refused, naming the cuts and the flags that choose
    from edgesplit.client.cut_choice import choose_cut
    from edgesplit.devices.profiles import load_profile

    choice = choose_cut(args.artifacts, manifest, load_profile(args.device_profile), args.max_memory_mb)
    print(f"[{args.client_id}] {choice.reason}", flush=True)
    return device_artifacts(args.artifacts, choice.cut_layer)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # What the command line alone can show wrong is refused first, as a usage error (exit 2, which a service
    # manager should not retry): before the head loads or anything connects.
    try:
        check_server_url(args.server)
        check_client_id(args.client_id)
        defence = activation_defence(args)
    except EdgesplitError as error:
        parser.error(str(error))
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as error:
            raise EdgesplitError(f"cannot read --token-file {args.token_file}: {error}") from error
    artifacts = _device_artifacts(args)
    config = ClientConfig(
        server=args.server,
        artifacts=artifacts,
        data=args.data,
        client_id=args.client_id,
        token=token,
        metrics_out=args.metrics_out,
        seed=args.seed,
        threads=args.threads,
        device_profile=args.device_profile,
        providers=tuple(name for name in args.providers.split(",") if name.strip()),
        ca_file=args.ca_file,
        quiet=args.quiet,
        connect_timeout_s=args.connect_timeout,
        activation_defence=defence,
        group_by_length=args.group_by_length,
    )
    from edgesplit.client.artifacts import load_manifest

    manifest = load_manifest(artifacts, verify=False)
    check_manifest_shapes(manifest, artifacts / "manifest.json")
    for flag, value, expected in (
        ("--batch-size", args.batch_size, manifest.batch_size),
        ("--max-seq-len", args.max_seq_len, manifest.max_seq_len),
    ):
        if value is not None and value != expected:
            raise EdgesplitError(
                f"{flag} {value} does not match the artifacts ({expected}): the head is traced "
                f"for {expected}; leave {flag} out to use the export's, or export again with {flag} {value}"
            )
    if args.group_by_length and len(manifest.seq_lengths) == 1:
        print(
            f"[{args.client_id}] note: --group-by-length saves nothing with these artifacts: the head is traced for "
            f"{manifest.max_seq_len} tokens only (export with --dynamic-seq or --seq-buckets to cut the padding)",
            flush=True,
        )
    summary = run_client(config)
    print(f"[{args.client_id}] {main_summary(summary)}")
    return 0
