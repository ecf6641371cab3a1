"""`edgesplit export`: cut a causal LM at a layer into the artifact directory described in artifacts.py.

    model (B, T) --[ head: embeddings + layers [0, cut) ]--> activations (B, T, H)      -> head.onnx (client)
                 --[ tail: layers [cut, L) + norm + LM head ]--> logits (B, T, V)        -> tail/ (server)

The manifest (schema 2) lists these as stages: `head` and its backward `head_grad` on the device, `tail` on
the server, each with its layers, files and named inputs and outputs (`_stages`). With `seq_buckets`, the
head and its gradient graph are traced once more for each shorter sequence length, as `head.t<T>` stages.

With several cuts (`cut_layers`, for a federation whose devices run different depths), each cut gets a
complete device artifact of its own in `cut<N>/` (its manifest, head graphs, adapters, tokenizer; no tail),
and the top level holds the one tail, from the smallest cut, and a manifest listing the cuts.

Everything is written into a temporary directory beside the output and renamed into place at the end, so an
interrupted or failed export never leaves a half-written artifact directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from edgesplit.client.artifacts import (
    ACTIVATION_GRADS,
    ACTIVATIONS,
    DEVICE,
    HEAD,
    HEAD_GRAD,
    LAYOUT_DEQUANTIZE,
    LAYOUT_FED,
    MANIFEST_NAME,
    MIN_SEQ_LEN,
    SCHEMA_VERSION,
    SERVER,
    TAIL,
    TOP,
    TOP_FILES,
    CutEntry,
    LoraSpec,
    Manifest,
    Stage,
    TensorSpec,
    bucket_graph_file,
    bucket_stage,
    cut_directory,
    head_matrices,
    sha256_file,
)
from edgesplit.client.fed import TABLE, WEIGHTS_FILE
from edgesplit.errors import ExportError
from edgesplit.export.models import DEFAULT_MODEL, LoadedModel, load_model, log
from edgesplit.export.onnx_files import data_file_name, external_files


@dataclass(frozen=True)
class ExportConfig:
    model: str = DEFAULT_MODEL
    cut_layer: int = 4
    # Several cuts (a mixed federation): one device artifact per cut in cut<N>/, one tail from the smallest.
    cut_layers: tuple[int, ...] | None = None
    out: Path = Path("artifacts")
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None  # None: the family's default
    quantize: str = "none"
    frozen_head: bool = False
    batch_size: int = 4
    max_seq_len: int = 128
    # Shorter sequence lengths the head is traced for as well (max_seq_len always is): the client runs each
    # batch at the smallest that holds it, so no compute goes on padding beyond it.
    seq_buckets: tuple[int, ...] = ()
    # One head graph pair whose sequence axis is symbolic (`seq`, 2..max_seq_len): the client runs each batch
    # at its longest row's length (export/symbolic.py). Not with seq_buckets or top_layers.
    dynamic_seq: bool = False
    # With dynamic_seq: each graph holds its frozen weights (faster steps, a copy per graph) instead of the
    # client holding them once and feeding both (export/fed.py, the default).
    weights_in_graphs: bool = False
    force: bool = False
    seed: int = 0
    full_model: bool = False  # every layer, the final norm and the LM head on the client (FedLLM, KD)
    write_tail: bool = True  # False: head files only, no tail/ (the split-point profiler's sweep)
    # A U-shaped split: the device also runs the last `top_layers` layers, the final norm, the LM head and the
    # loss (top.onnx); None: the plain split.
    top_layers: int | None = None

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "int8"):
            raise ExportError(f"--quantize must be 'none' or 'int8', got {self.quantize!r}")
        if self.lora_rank < 1:
            raise ExportError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if self.cut_layers is not None and (self.full_model or not self.cut_layers):
            raise ExportError("--cut-layers needs at least one cut, and cannot go with --full-model")
        if self.top_layers is not None and (self.full_model or self.cut_layers is not None or self.top_layers < 0):
            raise ExportError("--top-layers needs one --cut-layer, no --full-model, and a value >= 0")
        if self.top_layers is not None and set(self.seq_buckets) - {self.max_seq_len}:
            raise ExportError(
                "--seq-buckets does not go with --top-layers yet: the top stage is traced for --max-seq-len only"
            )
        if self.dynamic_seq and (set(self.seq_buckets) - {self.max_seq_len} or self.top_layers is not None):
            raise ExportError(
                "--dynamic-seq takes every length from 2 to --max-seq-len with one head: drop --seq-buckets, and "
                "--top-layers (the top stage is traced for --max-seq-len only)"
            )
        if self.weights_in_graphs and not self.dynamic_seq:
            raise ExportError("--weights-in-graphs goes with --dynamic-seq: other exports hold weights in their graphs")
        if self.batch_size < 1 or self.max_seq_len < 2:
            raise ExportError("--batch-size must be at least 1 and --max-seq-len at least 2")
        wrong = [seq_len for seq_len in self.seq_buckets if not 2 <= seq_len <= self.max_seq_len]
        if wrong:
            raise ExportError(
                f"--seq-buckets {wrong[0]} is out of range: each bucket must be from 2 to --max-seq-len "
                f"({self.max_seq_len})"
            )

    @property
    def fed(self) -> bool:
        """Whether the head's graphs take their frozen weights as inputs (export/fed.py, client/fed.py)."""
        return self.dynamic_seq and not self.weights_in_graphs

    @property
    def buckets(self) -> tuple[int, ...]:
        """Every sequence length the head is traced for, shortest first, max_seq_len last."""
        return (*sorted(set(self.seq_buckets) - {self.max_seq_len}), self.max_seq_len)


@dataclass
class ExportResult:
    manifest: Manifest
    out: Path
    seconds: dict[str, float] = field(default_factory=dict)
    quantize_report: Any = None


def _specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {1: "float32", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 3: "int8"}

    def spec(value: Any) -> TensorSpec:
        kind = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in kind.shape.dim)
        return TensorSpec(value.name, names.get(kind.elem_type, str(kind.elem_type)), dims)

    return tuple(spec(v) for v in model.graph.input), tuple(spec(v) for v in model.graph.output)


def _stages(
    head_dir: Path,
    scratch: Path,
    files: dict[str, str],
    prefix: str,
    cut_layer: int,
    num_layers: int,
    config: ExportConfig,
    hidden_size: int,
) -> tuple[Stage, ...]:
    """The manifest's stages for what was written into `scratch`: the head and its gradient graph (from
    `head_dir`, whose files are `prefix` + name in `files`), and the tail."""

    def graph_files(name: str) -> tuple[str, ...]:
        # Its own data file, then any it shares with the full-length graph (a shorter sequence bucket's).
        data = [data_file_name(name), *external_files(head_dir / name), WEIGHTS_FILE]
        return tuple(dict.fromkeys(prefix + file for file in (name, *data) if prefix + file in files))

    stages = []
    # The full length first (the `head` stage the rest of edgesplit reads), then each shorter bucket.
    for seq_len in (config.max_seq_len, *config.buckets[:-1]):
        for stage_name, graph in ((HEAD, "head.onnx"), (HEAD_GRAD, "head_grad.onnx")):
            file = bucket_graph_file(graph, seq_len, config.max_seq_len)
            if (head_dir / file).exists():
                inputs, outputs = _specs(head_dir / file)
                name = bucket_stage(stage_name, seq_len, config.max_seq_len)
                stages.append(Stage(name, DEVICE, 0, cut_layer, graph_files(file), inputs, outputs))
    if (scratch / "tail").is_dir():
        tokens = (config.batch_size, config.max_seq_len)
        activations = (*tokens, hidden_size)  # (B, T, H)
        tail_files = tuple(name for name in files if name.startswith("tail/"))
        inputs = (
            TensorSpec(ACTIVATIONS, "float32", activations),
            TensorSpec("attention_mask", "int64", tokens),
            TensorSpec("labels", "int64", tokens),
        )
        outputs = (TensorSpec("loss", "float32", ()), TensorSpec(ACTIVATION_GRADS, "float32", activations))
        stages.append(Stage(TAIL, SERVER, cut_layer, num_layers, tail_files, inputs, outputs))
    if (head_dir / "top.onnx").exists():
        top_inputs, top_outputs = _specs(head_dir / "top.onnx")
        top_files = (*graph_files("top.onnx"), *(prefix + name for name in TOP_FILES if prefix + name in files))
        first = num_layers - (config.top_layers or 0)
        stages.append(Stage(TOP, DEVICE, first, num_layers, top_files, top_inputs, top_outputs))
    return tuple(stages)


def _check_writable(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ExportError(f"{out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ExportError(f"cannot write into {parent}: {error}") from error


def _tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("edgesplit", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def export(config: ExportConfig, loaded: LoadedModel | None = None) -> ExportResult:
    """Run the whole export; `loaded` lets tests pass an in-memory model instead of a name."""
    from edgesplit.export.families import check_cut_layer, check_model, family_for, prepare_for_training

    out = Path(config.out)
    _check_writable(out, config.force)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if loaded is None:
        check_model(config.model)  # an architecture we cannot split is refused before the weights load
        loaded = load_model(config.model)
    seconds["load"] = time.perf_counter() - started
    model = loaded.model
    family = family_for(model)
    num_layers = family.num_layers(model)
    if config.full_model:
        cuts: tuple[int, ...] = (num_layers,)
    else:
        cuts = tuple(sorted({check_cut_layer(cut, num_layers) for cut in (config.cut_layers or (config.cut_layer,))}))
    prepare_for_training(model)
    model.set_attn_implementation("eager")

    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.resolve().parent))
    try:
        if config.cut_layers is None:  # one cut: the layout every single-cut export has always had
            report, head = _export_head(loaded, cuts[0], config, scratch, seconds)
            if config.write_tail and not config.full_model:  # a full-model export has no tail: all is on the client
                _write_tail(loaded, cuts[0], config, scratch)
            if config.top_layers is not None:
                from edgesplit.export.preflight import check_top_layers

                check_top_layers(config.top_layers, cuts[0], num_layers)
                _export_top(loaded, num_layers - config.top_layers, config, scratch, seconds)
            check = _self_check(loaded, head, config, scratch, scratch / "tail", seconds)
            manifest = _write_manifest(loaded, scratch, cuts[0], config, self_check=check)
        else:
            # One complete device artifact per cut, in its own directory; one tail, from the smallest cut,
            # which runs [cut, L) for a client at any of them (the server skips the layers it does not need).
            report = None
            entries = []
            first_check: dict[str, Any] | None = None
            for cut in cuts:
                device_dir = scratch / cut_directory(cut)
                device_dir.mkdir()
                part, head = _export_head(loaded, cut, config, device_dir, seconds)
                report = part if report is None else _merge(report, part)
                if cut == cuts[0] and config.write_tail:
                    _write_tail(loaded, cuts[0], config, scratch)
                # The smallest cut's head then the tail against the model's logits; a deeper cut's head against
                # the PyTorch head (its tail is the same tail run from its cut, checked by the tests).
                tail_dir = scratch / "tail" if cut == cuts[0] else device_dir / "tail"
                check = _self_check(loaded, head, config, device_dir, tail_dir, seconds)
                device_manifest = _write_manifest(loaded, device_dir, cut, config, self_check=check)
                entries.append(CutEntry(cut, cut_directory(cut), device_manifest.manifest_hash))
                first_check = first_check or check
            manifest = _write_manifest(loaded, scratch, cuts[0], config, tuple(entries), self_check=first_check)
        _swap_into_place(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    seconds["total"] = time.perf_counter() - started
    return ExportResult(manifest=manifest, out=out, seconds=seconds, quantize_report=report)


def _export_head(
    loaded: LoadedModel, cut_layer: int, config: ExportConfig, scratch: Path, seconds: dict[str, float]
) -> tuple[Any, Any]:
    """Write one cut's device files into `scratch`: head.onnx, head_grad.onnx (with their .data files),
    head_adapters.safetensors and tokenizer.json. Returns the int8 report (or None) and the PyTorch head
    the graphs were traced from (for the self-check)."""
    import onnx
    import torch
    from safetensors.numpy import save_file as save_numpy

    from edgesplit.export.families import family_for
    from edgesplit.export.fed import feed_frozen, order_dequantize, share_weights, table_tensors, take_out_embedding
    from edgesplit.export.lora import HeadWithLora
    from edgesplit.export.onnx_files import SharedData, save_with_aligned_data
    from edgesplit.export.quantize import quantize_model, store_saved_as_float16
    from edgesplit.export.trainable import export_graph, trace_head

    model = loaded.model
    family = family_for(model)
    num_layers = family.num_layers(model)
    targets = config.lora_targets or family.lora_targets
    backbone = copy.deepcopy(model) if config.full_model else family.build_head(model, cut_layer)
    head = HeadWithLora(backbone, family, config.lora_rank, config.lora_alpha, targets, config.full_model)
    if not head.shapes:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in family.layers(model)[0].named_modules() if n})
        raise ExportError(f"no LoRA target named {targets} in the model's layers; module names there: {available}")
    trainable = not config.frozen_head
    lora = head.initial_lora(config.seed) if trainable else {}

    report = None
    shared = SharedData()  # the full length's weights, which the shorter buckets' graphs point into
    dynamic = config.max_seq_len if config.dynamic_seq else None  # the longest length a symbolic axis takes
    # The graphs carry concrete sizes: one pair per sequence length; or one pair with a symbolic length.
    for seq_len in reversed(config.buckets):
        forward_file = bucket_graph_file("head.onnx", seq_len, config.max_seq_len)
        backward_file = bucket_graph_file("head_grad.onnx", seq_len, config.max_seq_len)
        tokens = f"2 to {seq_len} tokens (one symbolic length)" if dynamic else f"{seq_len} tokens"
        log(f"tracing the head (layers 0-{cut_layer - 1} of {num_layers}) for batch {config.batch_size} x {tokens}")
        t0 = time.perf_counter()
        with torch.no_grad() if not trainable else torch.enable_grad():
            traced = trace_head(head, lora, config.batch_size, seq_len, trainable=trainable, dynamic=bool(dynamic))
        seconds["trace"] = seconds.get("trace", 0.0) + time.perf_counter() - t0
        log(f"exporting {forward_file}" + ("" if not trainable else f" and {backward_file}"))
        t0 = time.perf_counter()
        with _quiet_exporter():
            forward_names = (traced.forward_inputs, traced.forward_outputs)
            export_graph(traced.forward, *forward_names, scratch / forward_file, max_seq_len=dynamic)
            if traced.backward is not None:
                backward_names = (traced.backward_inputs, traced.backward_outputs)
                export_graph(traced.backward, *backward_names, scratch / backward_file, max_seq_len=dynamic)
        seconds["export"] = seconds.get("export", 0.0) + time.perf_counter() - t0

        if config.quantize == "int8":
            log("quantising the head's frozen weights to int8 (weight-only, blocks of 32 along the input dimension)")
        t0 = time.perf_counter()
        names = [name for name in (forward_file, backward_file) if (scratch / name).exists()]
        graphs = {name: onnx.load(str(scratch / name)) for name in names}
        if config.fed:  # the frozen weights held once by the client and fed to both graphs (export/fed.py)
            table = take_out_embedding(graphs[forward_file])
            share_weights(graphs[forward_file], graphs.get(backward_file))
        if config.quantize == "int8":
            for graph in graphs.values():
                part = quantize_model(graph)
                if seq_len == config.max_seq_len:  # the same weights in every bucket: counted once
                    report = part if report is None else _merge(report, part)
            if backward_file in graphs:
                store_saved_as_float16(graphs[forward_file], graphs[backward_file])
        if config.fed:
            fed = feed_frozen(graphs[forward_file], graphs.get(backward_file))
            if config.quantize == "int8":
                for graph in graphs.values():
                    order_dequantize(graph)
            embedding = table_tensors(table, config.quantize)
            if report is not None:  # taken out before the quantiser saw it: counted here
                report.quantized.append(TABLE)
                report.bytes_before += table.nbytes
                report.bytes_after += sum(value.nbytes for value in embedding.values())
            save_numpy({**fed, **embedding}, str(scratch / WEIGHTS_FILE))
        for name, graph in graphs.items():
            save_with_aligned_data(graph, scratch / name, shared, record=seq_len == config.max_seq_len)
        step = "quantize" if config.quantize == "int8" else "save"
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - t0

    save_numpy(
        {k: v.detach().numpy().astype("float32") for k, v in lora.items()},
        str(scratch / "head_adapters.safetensors"),
    )
    loaded.tokenizer.backend_tokenizer.save(str(scratch / "tokenizer.json"))
    expected = head.shapes if trainable else {}
    made = head_matrices(_specs(scratch / "head.onnx")[0])
    if made != expected:  # the graph's inputs are the contract
        raise ExportError(f"head.onnx takes LoRA inputs {made}, the head made {expected}")
    return report, head


def _export_top(
    loaded: LoadedModel, first_layer: int, config: ExportConfig, scratch: Path, seconds: dict[str, float]
) -> None:
    """The device's top stage of a U-shaped split (export/top.py): top.onnx (+ .data), its initial LoRA
    matrices in top_adapters.safetensors, and the LM head's weight, transposed (H, V), in lm_head.npy (fed to
    the graph as an input, memory-mapped). Always fp32: --quantize applies to the head."""
    import numpy as np
    import onnx
    from safetensors.numpy import save_file as save_numpy

    from edgesplit.export.families import family_for
    from edgesplit.export.onnx_files import save_with_aligned_data
    from edgesplit.export.top import TopWithLora, export_top, lm_head_weight_t

    model = loaded.model
    family = family_for(model)
    if getattr(model.config, "final_logit_softcapping", None):
        raise ExportError(
            f"{family.name} caps its logits (final_logit_softcapping): the device's chunked loss does not, so "
            "--top-layers is not available for it yet; export a plain split"
        )
    targets = config.lora_targets or family.lora_targets
    tail = family.build_tail(family.tail_config(model, first_layer), family.tail_state_dict(model, first_layer))
    cast(Any, tail).set_attn_implementation("eager")
    top = TopWithLora(tail, family, first_layer, config.lora_rank, config.lora_alpha, targets)
    lora = top.initial_lora(config.seed + 1)  # the head's come from `seed`: not the same random A matrices
    layers = f"layers {first_layer}-{family.num_layers(model) - 1}, " if first_layer < family.num_layers(model) else ""
    log(f"tracing the device's top ({layers}final norm, LM head, loss)")
    t0 = time.perf_counter()
    with _quiet_exporter():
        export_top(top, lora, config.batch_size, config.max_seq_len, int(model.config.vocab_size), scratch / "top.onnx")
    save_with_aligned_data(onnx.load(str(scratch / "top.onnx")), scratch / "top.onnx")
    seconds["top"] = time.perf_counter() - t0
    save_numpy(
        {k: v.detach().numpy().astype("float32") for k, v in lora.items()}, str(scratch / "top_adapters.safetensors")
    )
    np.save(scratch / "lm_head.npy", lm_head_weight_t(tail).numpy().astype(np.float32))  # (H, V)


def _self_check(
    loaded: LoadedModel, head: Any, config: ExportConfig, scratch: Path, tail_dir: Path, seconds: dict[str, float]
) -> dict[str, Any]:
    """Run the written files, every sequence bucket's, against the model (export/selfcheck.py); ExportError
    above tolerance. The full length's errors, with each shorter bucket's under `buckets`; a dynamic-length
    head's one graph pair is checked at several lengths (`check_lengths`), listed under `lengths`."""
    from edgesplit.export.families import family_for
    from edgesplit.export.selfcheck import run_self_check

    model = loaded.model
    checks: dict[int, dict[str, Any]] = {}
    lengths = check_lengths(config.max_seq_len) if config.dynamic_seq else config.buckets
    for seq_len in reversed(lengths):  # the full length first
        files = seq_len if not config.dynamic_seq else config.max_seq_len  # a dynamic head: one pair of graphs
        check = run_self_check(
            scratch,
            model,
            family_for(model),
            head,
            config.batch_size,
            seq_len,
            config.quantize,
            tail_dir=tail_dir,
            graphs=(
                bucket_graph_file("head.onnx", files, config.max_seq_len),
                bucket_graph_file("head_grad.onnx", files, config.max_seq_len),
            ),
        )
        seconds["self_check"] = seconds.get("self_check", 0.0) + check.seconds
        log(check.summary() + ("" if seq_len == config.max_seq_len else f" at {seq_len} tokens"))
        checks[seq_len] = check.to_json()
    result = checks.pop(config.max_seq_len)
    if checks:
        key = "lengths" if config.dynamic_seq else "buckets"
        result[key] = {str(seq_len): check for seq_len, check in sorted(checks.items())}
    return result


def check_lengths(max_seq_len: int) -> tuple[int, ...]:
    """The lengths a dynamic-length head is checked at, shortest first: the shortest it takes, an odd one
    in between (no power of two, so no size the trace saw by chance), and max_seq_len."""
    middle = max(MIN_SEQ_LEN, max_seq_len // 2) | 1
    return tuple(sorted({MIN_SEQ_LEN, min(middle, max_seq_len), max_seq_len}))


def _write_tail(loaded: LoadedModel, cut_layer: int, config: ExportConfig, scratch: Path) -> None:
    """The server's tail/ for layers [cut_layer, L): config, weights, LoRA settings."""
    from safetensors.torch import save_file as save_torch

    from edgesplit.export.families import family_for

    model = loaded.model
    family = family_for(model)
    targets = config.lora_targets or family.lora_targets
    (scratch / "tail").mkdir()
    family.tail_config(model, cut_layer).to_json_file(str(scratch / "tail" / "config.json"))
    save_torch(family.tail_state_dict(model, cut_layer), str(scratch / "tail" / "model.safetensors"))
    lora_settings = {"rank": config.lora_rank, "alpha": config.lora_alpha, "targets": list(targets)}
    (scratch / "tail" / "lora.json").write_text(json.dumps(lora_settings, indent=2) + "\n")


def _write_manifest(
    loaded: LoadedModel,
    scratch: Path,
    cut_layer: int,
    config: ExportConfig,
    cuts: tuple[CutEntry, ...] = (),
    self_check: dict[str, Any] | None = None,
) -> Manifest:
    """manifest.json for what is in `scratch`. With `cuts` (a mixed-cut export's top level), the head stages
    are the smallest cut's, read from its directory, and every file below, each cut's included, is listed."""
    from edgesplit.export.families import family_for

    model = loaded.model
    family = family_for(model)
    num_layers = family.num_layers(model)
    targets = config.lora_targets or family.lora_targets
    files = {str(p.relative_to(scratch)): sha256_file(p) for p in sorted(scratch.rglob("*")) if p.is_file()}
    head_dir = scratch / cuts[0].directory if cuts else scratch
    prefix = f"{cuts[0].directory}/" if cuts else ""
    stages = _stages(head_dir, scratch, files, prefix, cut_layer, num_layers, config, int(model.config.hidden_size))
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_source=loaded.source,
        model_sha256=loaded.sha256,
        family=family.name,
        architecture=type(model).__name__,
        num_layers=num_layers,
        hidden_size=int(model.config.hidden_size),
        vocab_size=int(model.config.vocab_size),
        batch_size=config.batch_size,
        max_seq_len=config.max_seq_len,
        lora=LoraSpec(config.lora_rank, config.lora_alpha, tuple(targets), head_matrices(stages[0].inputs)),
        quantize=config.quantize,
        stages=stages,
        files=files,
        tools=_tool_versions(),
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0),
        cuts=cuts,
        self_check=self_check,
        int8_layout=_int8_layout(config),
        dynamic_seq=config.dynamic_seq,
        fed_weights=prefix + WEIGHTS_FILE if config.fed else None,
    )
    (scratch / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


def _int8_layout(config: ExportConfig) -> str | None:
    """How an int8 head holds its weights: fed to both graphs (a dynamic-length head), else in each graph."""
    if config.quantize != "int8":
        return None
    return LAYOUT_FED if config.fed else LAYOUT_DEQUANTIZE


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx warns about things that do not concern an FX graph of aten ops (training mode, torchvision)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.onnx._internal.exporter._registration")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _merge(first: Any, second: Any) -> Any:
    first.quantized += second.quantized
    first.skipped += second.skipped
    first.bytes_before += second.bytes_before
    first.bytes_after += second.bytes_after
    return first


def _swap_into_place(scratch: Path, out: Path) -> None:
    """Rename the finished directory to `out`; an existing `out` (--force) is moved aside, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(old)
    scratch.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
