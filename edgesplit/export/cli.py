"""`edgesplit export`: cut a model into the device's part (ONNX head, layers before the cut) and the server's
part (PyTorch tail, the rest), written with their manifest into one artifact directory.

    edgesplit export --cut-layer 4 [--model smollm2-135m] [--out artifacts] [--quantize int8]
    edgesplit export --cut-layers 2,4,8 --out artifacts       (one head per cut in cut2/ cut4/ cut8/, one tail)
    edgesplit export --cut-layer 4 --seq-buckets 64,96 (the head also traced for 64 and 96 tokens: no compute
                                                       on padding past a batch's longest example)
    edgesplit export --cut-layer 4 --dynamic-seq      (one head for every length 2..--max-seq-len: each batch
                                                       runs at its longest example's length)
    edgesplit export --cut-layer 4 --top-layers 2 --out artifacts  (U-shaped: the last 2 layers and the loss on
                                                                  the device too; the labels never leave it)
    edgesplit export --full-model --out artifacts-full        (the whole model on the device, for FedLLM and KD)

--model and --cut-layer are checked before the model loads (a load takes tens of seconds): an unknown name is
refused with the closest known one, and a cut past the model's depth as soon as the depth can be read (a local
directory's config.json, a .gguf file's header, the default model's 30 layers; a hub id's once it is loaded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgesplit.errors import ExportError
from edgesplit.export.models import DEFAULT_MODEL
from edgesplit.export.preflight import check_cut_layers, check_model_name, check_top_layers, known_depth


def parse_cut_layer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def parse_cut_layers(text: str) -> tuple[int, ...]:
    """ "2,4,8" -> (2, 4, 8): distinct, sorted."""
    try:
        cuts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 2,4,8, got {text!r}") from None
    if not cuts:
        raise argparse.ArgumentTypeError(f"names no layer: {text!r}")
    return tuple(sorted(cuts))


def parse_seq_buckets(text: str) -> tuple[int, ...]:
    """ "64,96" -> (64, 96): distinct, sorted."""
    try:
        buckets = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated token counts such as 64,96, got {text!r}") from None
    if not buckets:
        raise argparse.ArgumentTypeError(f"names no length: {text!r}")
    return tuple(sorted(buckets))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, local model directory, .gguf file, or {DEFAULT_MODEL!r} (default)",
    )
    parser.add_argument(
        "--cut-layer",
        type=parse_cut_layer,
        help="layers [0, cut) run on the device, the rest on the server (required unless --full-model)",
    )
    parser.add_argument(
        "--cut-layers",
        type=parse_cut_layers,
        help="several cuts for a federation of mixed devices, e.g. 2,4,8: a complete device artifact per cut in "
        "cut<N>/ and one tail, from the smallest cut, for the server (docs/artifacts.md)",
    )
    parser.add_argument(
        "--full-model",
        action="store_true",
        help="the whole model on the device, trainable, outputting logits (for FedLLM and KD-FedLLM)",
    )
    parser.add_argument(
        "--top-layers",
        type=int,
        default=None,
        help="a U-shaped split: the device also runs the last K layers, the final norm, the LM head and the "
        "loss, so the labels never leave it; the server runs the middle (K >= 0; docs/architecture.md)",
    )
    parser.add_argument("--out", type=Path, default=Path("artifacts"), help="artifact directory (default artifacts/)")
    parser.add_argument(
        "--lora-rank", type=int, default=8, help="rank of the LoRA matrices, on both sides of the cut (default 8)"
    )
    parser.add_argument(
        "--lora-alpha",
        type=float,
        default=16.0,
        help="LoRA scaling numerator: updates are scaled by alpha / rank (default 16)",
    )
    parser.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated module names or paths inside a layer, matched as PEFT matches target_modules: "
        "c_proj takes GPT-2's attn.c_proj and mlp.c_proj, mlp.c_proj only the MLP's (default: the family's, "
        "q_proj,v_proj for Llama)",
    )
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: weight-only, the head's frozen weights (matmuls in blocks of 32, embedding rows)",
    )
    parser.add_argument("--frozen-head", action="store_true", help="no client adapters: the client only runs forward")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="batch size the head's graphs are traced for: clients train with it (default 4)",
    )
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=128,
        help="tokens per example the head's graphs are traced for: clients pad or truncate to it (default 128)",
    )
    parser.add_argument(
        "--seq-buckets",
        type=parse_seq_buckets,
        help="shorter sequence lengths to trace the head for as well, e.g. 64,96: the client runs each batch at "
        "the shortest that holds its longest example instead of padding it to --max-seq-len (docs/export.md)",
    )
    parser.add_argument(
        "--dynamic-seq",
        action="store_true",
        help="one head graph and one gradient graph whose sequence axis takes any length from 2 to --max-seq-len: "
        "the client runs each batch at its longest example's length, with one set of weights (docs/export.md); "
        "not with --seq-buckets or --top-layers",
    )
    parser.add_argument(
        "--weights-in-graphs",
        action="store_true",
        help="with --dynamic-seq: each graph holds its own copy of the frozen weights, as other exports do, "
        "instead of the client holding them once and feeding both: about 9%% faster steps, about 120 MB more "
        "peak memory for SmolLM2's int8 head at cut 4 (docs/export.md)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial LoRA matrices (default 0)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [flag for flag, value in (("--cut-layer", args.cut_layer), ("--cut-layers", args.cut_layers)) if value]
    if args.full_model and args.cut_layers:
        parser.error("--cut-layers and --full-model exclude each other")
    if len(chosen) > 1:
        parser.error("give --cut-layer (one cut) or --cut-layers (several), not both")
    if args.cut_layer is None and args.cut_layers is None and not args.full_model:
        parser.error("--cut-layer is required (or --cut-layers, or --full-model)")
    cuts = args.cut_layers or ((args.cut_layer,) if args.cut_layer is not None else ())
    flag = "--cut-layers" if args.cut_layers else "--cut-layer"
    if not args.full_model and any(cut < 1 for cut in cuts):
        raise ExportError(
            f"{flag} {min(cuts)} is out of range: a cut must be at least 1 (layers [0, cut) run on the "
            "device; --full-model puts the whole model there)"
        )
    if args.top_layers is not None and (args.full_model or args.cut_layers):
        parser.error("--top-layers goes with one --cut-layer (not --cut-layers or --full-model)")
    if args.top_layers is not None and set(args.seq_buckets or ()) - {args.max_seq_len}:
        parser.error("--seq-buckets does not go with --top-layers yet: the top stage is traced for --max-seq-len only")
    if args.dynamic_seq and (set(args.seq_buckets or ()) - {args.max_seq_len} or args.top_layers is not None):
        parser.error(
            "--dynamic-seq takes every length from 2 to --max-seq-len with one head: drop --seq-buckets, and "
            "--top-layers (its top stage is traced for --max-seq-len only)"
        )
    if args.weights_in_graphs and not args.dynamic_seq:
        parser.error("--weights-in-graphs goes with --dynamic-seq: other exports always hold their weights in graphs")
    if args.top_layers is not None and args.top_layers < 0:
        check_top_layers(args.top_layers, args.cut_layer, args.cut_layer + 1)  # refuses a negative K
    # Before the model loads, which takes tens of seconds: a typo or a cut past the model's end is refused now.
    check_model_name(args.model)
    depth = known_depth(args.model)
    if depth is not None and not args.full_model:
        check_cut_layers(cuts, depth, flag=flag)
        if args.top_layers is not None:
            check_top_layers(args.top_layers, args.cut_layer, depth)
    from edgesplit.export.exporter import ExportConfig, export

    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()) if args.lora_targets else None
    config = ExportConfig(
        model=args.model,
        cut_layer=args.cut_layer or (args.cut_layers[0] if args.cut_layers else 0),
        cut_layers=args.cut_layers,
        out=args.out,
        full_model=args.full_model,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=targets,
        quantize=args.quantize,
        frozen_head=args.frozen_head,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        seq_buckets=args.seq_buckets or (),
        dynamic_seq=args.dynamic_seq,
        weights_in_graphs=args.weights_in_graphs,
        force=args.force,
        seed=args.seed,
        top_layers=args.top_layers,
    )
    result = export(config)
    manifest = result.manifest
    sizes = {name: (result.out / name).stat().st_size for name in manifest.files}
    print(
        f"wrote {result.out}/ ({sum(sizes.values()) / 1e6:.1f} MB): {manifest.family} cut after layer "
        f"{manifest.cut_layer} of {manifest.num_layers}, hidden {manifest.hidden_size}, "
        f"{len(manifest.lora.matrices)} client LoRA matrices, quantize={manifest.quantize}"
    )
    for cut in manifest.cuts:
        print(f"  cut {cut.cut_layer:<3} device artifact in {cut.directory}/ (manifest {cut.manifest_hash})")
    for stage in manifest.stages:
        print(f"  stage {stage.name:<10} on the {stage.runs_on:<6} layers [{stage.first_layer}, {stage.end_layer})")
    for name, size in sorted(sizes.items()):
        print(f"  {name:<28} {size / 1e6:9.2f} MB")
    if result.quantize_report is not None:
        report = result.quantize_report
        print(
            f"  int8: {len(report.quantized)} weight matrices, {report.bytes_before / 1e6:.1f} MB -> "
            f"{report.bytes_after / 1e6:.1f} MB"
        )
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"  time: {timings}")
    return 0
