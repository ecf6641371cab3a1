"""`edgesplit client`: train this device's head against a server. Needs only the edge dependencies."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgesplit.client.client import ClientConfig, main_summary, run_client
from edgesplit.errors import EdgesplitError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgesplit client", description=__doc__)
    parser.add_argument("--server", required=True, help="ws://HOST:PORT (or wss:// with TLS)")
    parser.add_argument("--artifacts", type=Path, required=True, help="the artifact directory from the export")
    parser.add_argument("--data", type=Path, required=True, help="JSONL: prompt/completion, context/completion or text")
    parser.add_argument("--client-id", required=True, help="this device's name: letters, digits, . _ -")
    parser.add_argument("--token-file", type=Path, help="file holding this client's token")
    parser.add_argument("--batch-size", type=int, help="must equal the export's (the head is traced for it)")
    parser.add_argument("--max-seq-len", type=int, help="must equal the export's")
    parser.add_argument("--metrics-out", type=Path, help="JSON Lines file for per-step metrics")
    parser.add_argument("--seed", type=int, default=0, help="added to the server's seed for this client's data order")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: all cores)")
    parser.add_argument(
        "--providers",
        default="cpu",
        help="ONNX Runtime execution providers by preference, comma-separated: cpu (default), "
        "cuda, tensorrt, xnnpack or a full provider name; CPU always comes last",
    )
    parser.add_argument("--device-profile", help="profile for the energy estimate where no sensor exists")
    parser.add_argument("--ca-file", type=Path, help="CA certificate that signed the server's TLS certificate")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds to keep retrying while the server is not reachable, at the start and "
        "after each lost connection (the client then rejoins where the server says)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as error:
            raise EdgesplitError(f"cannot read --token-file {args.token_file}: {error}") from error
    config = ClientConfig(
        server=args.server,
        artifacts=args.artifacts,
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
    )
    from edgesplit.client.artifacts import load_manifest

    manifest = load_manifest(args.artifacts, verify=False)
    for flag, value, expected in (
        ("--batch-size", args.batch_size, manifest.batch_size),
        ("--max-seq-len", args.max_seq_len, manifest.max_seq_len),
    ):
        if value is not None and value != expected:
            raise EdgesplitError(
                f"{flag} {value} does not match the artifacts ({expected}): the head is traced "
                f"for {expected}; export again with {flag} {value} to change it"
            )
    summary = run_client(config)
    print(f"[{args.client_id}] {main_summary(summary)}")
    return 0
