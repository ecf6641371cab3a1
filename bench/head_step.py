"""One client training step of the head, ONNX Runtime (fp32 and int8 artifacts) against PyTorch + PEFT.

    python bench/head_step.py [--cut-layer 4] [--warmup 1] [--repeats 5] [--threads N] [--work-dir DIR]
                               [--reexport] [--attention sdpa|eager] [--data packed|e2e]

--data e2e measures real E2E batches instead (bench/head_step_e2e.py): real tokens per second and peak
memory, ONNX Runtime with a dynamic-length head (export --dynamic-seq; `--seq-buckets` for the bucketed
heads of export --seq-buckets) against PyTorch padding each batch to its longest example.

A step is what the edge client does per batch: the head's forward to the cut (activations (B, T, H) and the
tensors saved for backward), then the LoRA gradients of sum(activations * activation_grads) given
activation_grads (B, T, H) from the server. PyTorch does the same with the same head (embeddings + the first
`cut_layer` layers, frozen base, LoRA through peft on the same targets with the same initial matrices).

Each side runs in its own fresh process (`--worker ort|torch`), so that its peak resident memory
(ru_maxrss) counts everything it needs: the PyTorch worker pays for importing torch, transformers and peft,
the ONNX Runtime worker never imports torch (asserted). The PyTorch worker builds the head from the head's
config and weights, saved once beside the artifacts by the export step (`--worker export`, also a process of
its own), not from the whole model; it uses transformers' default attention (sdpa; `--attention eager` for
the kernel the ONNX graph was traced from). Both train on the same batch of E2E text, tokenized once.

Prints one JSON object: the step's median and samples (ms, forward and backward too), peak RSS (MB), the
torch/ORT ratios and whether the issue's bars (ORT >= 2x faster, >= 3x less peak memory) are met, the int8
error against fp32 and fp32 against PyTorch on that batch, artifact sizes and the machine. The machine is
small and shared: `machine.busy` says other processes held at least half the cores when the run began,
which slows every timing and PyTorch's (spinning OpenMP threads) far more than ONNX Runtime's; the speed
ratio of a busy run overstates ORT's lead (`vs_torch.*.speed_bar_reliable` is false then). `--threads 1`
gives both runtimes one thread each: their CPU times (`step_cpu`) then barely depend on the load and compare
the work itself. Memory does not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import head_step_e2e
import numpy as np
from common import machine
from head_step_parts import MEMORY_BAR, build_torch_head, memory_figures, peak_rss_mb

_E2E = Path("shared") / "data" / "e2e" / "train.jsonl"
# The project's shared data beside the checkout (or beside a folder holding checkouts).
E2E_TRAIN = next(
    (parent / _E2E for parent in Path(__file__).resolve().parents[1:] if (parent / _E2E).is_file()),
    Path(__file__).resolve().parents[2] / _E2E,
)
SPEED_BAR = 2.0  # ORT step at least this many times faster than PyTorch
SEED = 0
BATCH_FILE = "batch.npz"
EXPORT_SECONDS_FILE = "export_seconds.json"
IN_GRAPHS = "int8-in-graphs"  # --data e2e, dynamic: the int8 head exported --weights-in-graphs


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / max(float(np.linalg.norm(expected)), 1e-12))


def text_batch(tokenizer_file: Path, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, T) token ids of real text, packed end to end so that every position is a real token."""
    from tokenizers import Tokenizer

    rng = np.random.default_rng(SEED)
    if E2E_TRAIN.is_file():  # examples drawn at random: the file lists each context's references in a row
        lines = E2E_TRAIN.read_text().splitlines()
        examples = [json.loads(lines[i]) for i in rng.choice(len(lines), size=min(64, len(lines)), replace=False)]
        texts = [f"{example['context']}\n{example['completion']}" for example in examples]
    else:  # the E2E set lives beside the project, not in it: fall back to made-up restaurant sentences
        names, areas = ["Alimentum", "The Eagle", "Zizzi", "Cotto"], ["city centre", "riverside"]
        texts = [f"{rng.choice(names)} is a family friendly place in the {rng.choice(areas)} ." for _ in range(400)]
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    stream = [token for text in texts for token in tokenizer.encode(text, add_special_tokens=False).ids]
    needed = batch_size * seq_len
    if len(stream) < needed:
        stream = (stream * (needed // max(len(stream), 1) + 1))[:needed]
    input_ids = np.asarray(stream[:needed], dtype=np.int64).reshape(batch_size, seq_len)
    return input_ids, np.ones_like(input_ids)


def load_batch(work_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The batch both workers train on, tokenized once by the export step: no worker pays for a tokenizer."""
    with np.load(work_dir / BATCH_FILE) as batch:
        return batch["input_ids"], batch["attention_mask"]


def activation_grads(shape: tuple[int, ...]) -> np.ndarray:
    return (np.random.default_rng(SEED + 1).standard_normal(shape) * 1e-3).astype(np.float32)


def timed(warmup: int, repeats: int, step: Any) -> list[dict[str, float]]:
    for _ in range(warmup):
        step()
    return [step() for _ in range(repeats)]


def summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        out[f"{key}_median_ms"] = round(statistics.median(values), 2)
        out[f"{key}_samples_ms"] = [round(v, 2) for v in values]
    return out


# ----------------------------------------------------------------------------------------------- workers


def step_times(c0: float, t0: float, t1: float, c2: float, t2: float) -> dict[str, float]:
    """One step's ms from process_time (c) and perf_counter (t) at its start (0), mid-point (1) and end (2)."""
    return {"step": (t2 - t0) * 1e3, "forward": (t1 - t0) * 1e3, "backward": (t2 - t1) * 1e3,
            "step_cpu": (c2 - c0) * 1e3}  # fmt: skip


def ort_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The edge client's step in ONNX Runtime, numpy only."""
    import onnxruntime as ort

    from edgesplit.client.head import Head

    started = time.perf_counter()
    head = Head(args.artifacts, threads=args.threads)
    load_seconds = time.perf_counter() - started
    rss_after_load = peak_rss_mb()
    manifest = head.manifest
    input_ids, attention_mask = load_batch(args.artifacts.parent)
    adapters = head.initial_adapters()
    grads_in = activation_grads(manifest.activations_shape)
    result: dict[str, Any] = {}

    def step() -> dict[str, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        forward = head.forward(input_ids, attention_mask, adapters)
        t1 = time.perf_counter()
        result["grads"] = head.backward(forward, grads_in)
        c2, t2 = time.process_time(), time.perf_counter()
        result["activations"] = forward.activations
        return step_times(c0, t0, t1, c2, t2)

    samples = timed(args.warmup, args.repeats, step)
    assert "torch" not in sys.modules, "the ONNX Runtime worker imported torch"
    np.savez(args.save, activations=result["activations"], **{f"grad.{k}": v for k, v in result["grads"].items()})
    saved = head.backward_inputs
    return {
        **summary(samples),
        **memory_figures(rss_after_load),
        "load_s": round(load_seconds, 2),
        "backward_inputs": len(saved),
        "torch_imported": "torch" in sys.modules,
        "onnxruntime": ort.__version__,
    }


def torch_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The same step in PyTorch: the head built from its config and weights, LoRA through peft."""
    import torch

    from edgesplit.client.artifacts import load_manifest
    from edgesplit.lora_names import from_peft_key, gradient_name

    model, lora_parameters, load_seconds, rss_after_load = build_torch_head(args)
    manifest = load_manifest(args.artifacts, verify=False)
    input_ids, attention_mask = (torch.from_numpy(a) for a in load_batch(args.artifacts.parent))
    grads_in = torch.from_numpy(activation_grads(manifest.activations_shape))
    result: dict[str, Any] = {}

    def step() -> dict[str, float]:
        for parameter in lora_parameters.values():
            parameter.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        activations = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        t1 = time.perf_counter()
        (activations * grads_in).sum().backward()
        c2, t2 = time.process_time(), time.perf_counter()
        result["activations"] = activations.detach()
        return step_times(c0, t0, t1, c2, t2)

    samples = timed(args.warmup, args.repeats, step)
    grads = {}
    for name, parameter in lora_parameters.items():
        grads[gradient_name(str(from_peft_key(name, "layers")))] = parameter.grad.numpy()
    np.savez(args.save, activations=result["activations"].numpy(), **grads)
    return {
        **summary(samples),
        **memory_figures(rss_after_load),
        "load_s": round(load_seconds, 2),
        "threads": torch.get_num_threads(),
        "attention": args.attention,
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------ orchestration


def prepare(work_dir: Path, cut_layer: int, reexport: bool, data: str = "packed", seq_buckets: bool = False) -> None:
    """Export the artifacts and the head's weights unless already there, in a process of their own.

    Not in this one: on Linux a child process starts with its parent's ru_maxrss, so the workers' peak
    memory would read as that of a parent that has loaded the whole model.
    """
    wanted = [
        work_dir / "fp32" / "manifest.json",
        work_dir / "int8" / "manifest.json",
        work_dir / "head" / "lora.json",
        work_dir / (BATCH_FILE if data == "packed" else head_step_e2e.E2E_BATCHES_FILE),
    ]
    if data == "e2e" and not seq_buckets:
        wanted.append(work_dir / IN_GRAPHS / "manifest.json")
    exported = all(path.exists() for path in wanted) and not reexport
    if exported and (data != "e2e" or (work_dir / head_step_e2e.E2E_GROUPED_FILE).exists()):
        return
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "export"]
    command += ["--artifacts", str(work_dir), "--cut-layer", str(cut_layer), "--data", data]
    command += ["--seq-buckets"] if seq_buckets else []
    # Artifacts of an earlier run, without the grouped batches: write the batches only.
    command += ["--batches-only"] if exported else []
    if subprocess.run(command, stdout=sys.stderr).returncode != 0:
        raise SystemExit("exporting the head failed (see above)")


def write_e2e_batches(work_dir: Path) -> None:
    """The random and the length-grouped E2E batches (4 x 128), tokenized with the exported tokenizer."""
    head_step_e2e.write_batches(work_dir / "fp32", E2E_TRAIN, work_dir / head_step_e2e.E2E_BATCHES_FILE, 4, 128, SEED)


def export_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The fp32 and int8 artifacts, and the head's own weights and config for the PyTorch worker."""
    import torch

    from edgesplit.export.exporter import ExportConfig, export
    from edgesplit.export.families import family_for, prepare_for_training
    from edgesplit.export.models import DEFAULT_MODEL, load_model

    work_dir, cut_layer = args.artifacts, args.cut_layer
    if args.batches_only:
        write_e2e_batches(work_dir)
        return {"batches": str(work_dir)}
    loaded = load_model(DEFAULT_MODEL)
    settings = dict(
        model=DEFAULT_MODEL,
        cut_layer=cut_layer,
        batch_size=4,
        max_seq_len=128,
        lora_rank=8,
        lora_alpha=16.0,
        lora_targets=("q_proj", "v_proj"),
        force=True,
    )
    buckets = head_step_e2e.SEQ_BUCKETS if args.data == "e2e" and args.seq_buckets else ()
    dynamic = args.data == "e2e" and not args.seq_buckets
    seconds: dict[str, Any] = {}
    variants = [("fp32", "none", False), ("int8", "int8", False)]
    variants += [(IN_GRAPHS, "int8", True)] if dynamic else []  # the dynamic head's other layout, to compare
    for variant, quantize, in_graphs in variants:
        config = ExportConfig(
            out=work_dir / variant,
            quantize=quantize,
            seq_buckets=buckets,
            dynamic_seq=dynamic,
            weights_in_graphs=in_graphs,
            **settings,
        )
        result = export(config, loaded=loaded)
        seconds[variant] = {key: round(value, 1) for key, value in result.seconds.items()}
        print(f"exported {variant} in {result.seconds['total']:.1f} s", file=sys.stderr)
    record = {"seq_buckets": list(buckets), "dynamic_seq": dynamic, **seconds}
    (work_dir / EXPORT_SECONDS_FILE).write_text(json.dumps(record) + "\n")
    model = loaded.model
    prepare_for_training(model)
    family = family_for(model)
    head = family.build_head(model, cut_layer)
    head.config.tie_word_embeddings = False  # a bare backbone: nothing to tie
    with torch.no_grad():
        head.save_pretrained(work_dir / "head")
    lora = {
        "rank": settings["lora_rank"],
        "alpha": settings["lora_alpha"],
        "targets": list(settings["lora_targets"]),
    }
    (work_dir / "head" / "lora.json").write_text(json.dumps(lora) + "\n")
    if args.data == "e2e":
        write_e2e_batches(work_dir)
    else:
        tokens = text_batch(work_dir / "fp32" / "tokenizer.json", settings["batch_size"], settings["max_seq_len"])
        np.savez(work_dir / BATCH_FILE, input_ids=tokens[0], attention_mask=tokens[1])
    return {"exported": str(work_dir)}


def run_worker(
    kind: str, args: argparse.Namespace, artifacts: Path, save: Path, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--artifacts",
        str(artifacts),
        "--head-dir",
        str(args.work_dir / "head"),
        "--save",
        str(save),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--attention",
        args.attention,
        "--data",
        args.data,
        *extra,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker on {artifacts} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def files_mb(directory: Path, names: tuple[str, ...]) -> dict[str, float]:
    return {
        p.name: round(p.stat().st_size / 2**20, 2)
        for p in sorted(directory.iterdir())
        if p.is_file() and (p.name in names or p.suffix == ".data")
    }


# ------------------------------------------------------------------------------------------ roofline


def matmul_flops(directory: Path) -> dict[str, float]:
    """GFLOP of one step's matrix products, read from the fp32 graphs (2*M*K*N per MatMul after shape inference).

    `frozen`: products with a frozen weight (the base model's projections, forward and input gradients), the
    bulk of the step and the same work in every runtime; `other`: attention scores, LoRA, their gradients.
    """
    import onnx

    totals = {"frozen": 0.0, "other": 0.0}
    for name in ("head.onnx", "head_grad.onnx"):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(directory / name), load_external_data=False))
        graph = model.graph
        shapes = {
            v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output, *graph.value_info]
        }
        shapes |= {t.name: list(t.dims) for t in graph.initializer}
        constants = {t.name for t in graph.initializer}
        for node in graph.node:
            if node.op_type != "MatMul":
                continue
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            if not a or not b or 0 in a or 0 in b:
                raise RuntimeError(f"no static shape for {node.name} in {name}")
            rows = float(np.prod(a[:-1]))  # batch dims fold into the rows (B broadcasts over them)
            totals["frozen" if node.input[1] in constants else "other"] += 2 * rows * a[-1] * b[-1] / 1e9
    return {key: round(value, 2) for key, value in totals.items()}


def gemm_rates(threads: int | None, repeats: int = 20) -> dict[str, float]:
    """GFLOP/s of ONNX Runtime's fp32 MatMul and 8-bit MatMulNBits on the head's largest products here.

    The shapes are SmolLM2's MLP at batch 4 x 128 (M=512, K=576, N=1536 and back), the products that
    dominate the step. The fp32 rate bounds what any fp32 runtime can do on this CPU; PyTorch's oneDNN/MKL
    GEMM is at the same level (see docs/benchmarks.md).
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgesplit.client.head import session_options
    from edgesplit.export.quantize import BLOCK_SIZE, quantize_blocks

    rng = np.random.default_rng(SEED)
    rates: dict[str, list[float]] = {"fp32_matmul": [], "int8_matmulnbits": []}
    for k, n in ((576, 1536), (1536, 576)):
        weights = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
        x = rng.standard_normal((512, k)).astype(np.float32)
        codes, scales = quantize_blocks(weights)
        forms = {
            "fp32_matmul": ([helper.make_node("MatMul", ["x", "w"], ["y"])], [numpy_helper.from_array(weights, "w")]),
            "int8_matmulnbits": (
                [
                    helper.make_node(
                        "MatMulNBits",
                        ["x", "q", "s"],
                        ["y"],
                        domain="com.microsoft",
                        K=k,
                        N=n,
                        bits=8,
                        block_size=BLOCK_SIZE,
                        accuracy_level=4,
                    )
                ],
                [numpy_helper.from_array(codes, "q"), numpy_helper.from_array(scales, "s")],
            ),
        }
        for form, (nodes, initializers) in forms.items():
            graph = helper.make_graph(
                nodes,
                form,
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, k])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512, n])],
                initializers,
            )
            model = helper.make_model(
                graph,
                ir_version=10,
                opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
            )
            session = ort.InferenceSession(model.SerializeToString(), session_options(threads))
            for _ in range(3):
                session.run(None, {"x": x})
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                session.run(None, {"x": x})
                seconds.append(time.perf_counter() - started)
            rates[form].append(2 * 512 * k * n / statistics.median(seconds) / 1e9)
    return {form: round(statistics.median(values), 1) for form, values in rates.items()}


def roofline(directory: Path, threads: int | None, torch_step_ms: float) -> dict[str, Any]:
    """How fast the step could be if its frozen-weight products ran at the measured GEMM rates and all else took
    no time: the floor each form of the head cannot go under, and the most it could gain over PyTorch."""
    flops = matmul_flops(directory)
    rates = gemm_rates(threads)
    floors = {form: round(flops["frozen"] / rate * 1e3, 1) for form, rate in rates.items()}
    return {
        "matmul_gflop": flops,
        "gemm_gflops": rates,
        "frozen_matmul_floor_ms": floors,
        "most_speedup_over_torch": {form: round(torch_step_ms / floor, 2) for form, floor in floors.items()},
    }


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    args.work_dir.mkdir(parents=True, exist_ok=True)
    prepare(args.work_dir, args.cut_layer, args.reexport)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, dict[str, Any]] = {}
    outputs: dict[str, Any] = {}
    for name, kind, variant in (
        ("ort_fp32", "ort", "fp32"),
        ("ort_int8", "ort", "int8"),
        ("torch", "torch", "fp32"),
    ):
        save = args.work_dir / f"{name}.npz"
        runs[name] = run_worker(kind, args, args.work_dir / variant, save)
        outputs[name] = dict(np.load(save))

    def errors(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> dict[str, float]:
        grads = [relative_error(actual[k], expected[k]) for k in expected if k.startswith("grad.")]
        return {
            "activations_rel_err": relative_error(actual["activations"], expected["activations"]),
            "grads_max_rel_err": max(grads),
        }

    torch_run = runs["torch"]
    busy = load_before[0] > 0.5 * (os.cpu_count() or 1)
    comparison: dict[str, Any] = {}
    for name in ("ort_fp32", "ort_int8"):
        speedup = torch_run["step_median_ms"] / runs[name]["step_median_ms"]
        memory = torch_run["peak_rss_mb"] / runs[name]["peak_rss_mb"]
        cpu = torch_run["step_cpu_median_ms"] / runs[name]["step_cpu_median_ms"]
        comparison[name] = {
            "time_ratio_torch_over_ort": round(speedup, 2),
            "memory_ratio_torch_over_ort": round(memory, 2),
            "cpu_time_ratio_torch_over_ort": round(cpu, 2),
            f"speed_bar_{SPEED_BAR:g}x_met": bool(speedup >= SPEED_BAR),
            "speed_bar_reliable": not busy,  # see machine.busy
            f"memory_bar_{MEMORY_BAR:g}x_met": bool(memory >= MEMORY_BAR),
        }
    return {
        "setup": {
            "model": "smollm2-135m",
            "cut_layer": args.cut_layer,
            "batch": [4, 128],
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_targets": ["q_proj", "v_proj"],
            "warmup": args.warmup,
            "threads": args.threads or "runtime default",
            "repeats": args.repeats,
            "tokens": "E2E train.jsonl, packed" if E2E_TRAIN.is_file() else "generated sentences, packed",
            "work_dir": str(args.work_dir),
        },
        "machine": {
            **machine(),
            "load_average_before": load_before,
            # Other processes were using at least half the cores: timings are slowed, PyTorch's most.
            "busy": busy,
        },
        **runs,
        "vs_torch": comparison,
        "accuracy": {
            "int8_vs_fp32": errors(outputs["ort_int8"], outputs["ort_fp32"]),
            "ort_fp32_vs_torch": errors(outputs["ort_fp32"], outputs["torch"]),
        },
        "roofline": roofline(args.work_dir / "fp32", args.threads, torch_run["step_median_ms"]),
        "artifact_mb": {
            variant: files_mb(args.work_dir / variant, ("head.onnx", "head_grad.onnx")) for variant in ("fp32", "int8")
        }
        | {"torch_head": files_mb(args.work_dir / "head", ("model.safetensors",))},
    }


def orchestrate_e2e(args: argparse.Namespace) -> dict[str, Any]:
    """--data e2e: real batches, real tokens/s and peak memory per runtime, each in its own process."""
    if not E2E_TRAIN.is_file():
        raise SystemExit(f"--data e2e needs the E2E training set at {E2E_TRAIN}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    prepare(args.work_dir, args.cut_layer, args.reexport, "e2e", args.seq_buckets)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, dict[str, Any]] = {}
    # A dynamic head holds its weights once and feeds both graphs (export/fed.py); `ort_int8_weights_in_graphs`
    # is the same head exported --weights-in-graphs, on this CPU's route. Buckets: the int8 routes compared.
    other: tuple[str, str, tuple[str, ...]] = (
        ("ort_int8_dequantised", "int8", ("--int8-route", "fp32-dequantised"))
        if args.seq_buckets
        else ("ort_int8_weights_in_graphs", IN_GRAPHS, ())
    )
    for name, kind, variant, extra in (
        ("ort_fp32", "ort", "fp32", ()),
        ("ort_int8", "ort", "int8", ()),
        (other[0], "ort", other[1], other[2]),
        ("ort_int8_full_length", "ort", "int8", ("--full-length",)),
        ("ort_int8_grouped", "ort", "int8", ("--grouped",)),
        ("torch", "torch", "fp32", ()),
        ("torch_grouped", "torch", "fp32", ("--grouped",)),
    ):
        runs[name] = run_worker(kind, args, args.work_dir / variant, args.work_dir / f"{name}.npz", extra)
    busy = load_before[0] > 0.5 * (os.cpu_count() or 1)
    return {
        "setup": {
            "model": "smollm2-135m",
            "cut_layer": args.cut_layer,
            "batch_size": 4,
            "max_seq_len": 128,
            "batches": head_step_e2e.BATCHES,
            "data": f"E2E {E2E_TRAIN.name}, random examples, right-padded (not packed); *_grouped: batches grouped "
            "by length (client --group-by-length)",
            "head": "buckets (export --seq-buckets)" if args.seq_buckets else "dynamic length (export --dynamic-seq)",
            "warmup_passes": args.warmup,
            "repeats": args.repeats,
            "threads": args.threads or "runtime default",
            "work_dir": str(args.work_dir),
        },
        "export_seconds": json.loads((args.work_dir / EXPORT_SECONDS_FILE).read_text()),
        "machine": {**machine(), "load_average_before": load_before, "busy": busy},
        **runs,
        "vs_torch": head_step_e2e.compare(runs, busy),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cut-layer", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "edgesplit-bench-head-step",
        help="where the artifacts go; reused when present (cut layer included in the name)",
    )
    parser.add_argument("--reexport", action="store_true", help="export again even if --work-dir has artifacts")
    parser.add_argument("--attention", default="sdpa", help="PyTorch attention implementation (sdpa or eager)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of both runtimes (default: theirs). With 1 and a busy machine, compare the "
        "step_cpu figures: CPU time without spinning threads barely depends on the load",
    )
    parser.add_argument(
        "--data",
        choices=("packed", "e2e"),
        default="packed",
        help="packed: one batch of E2E text packed end to end (every position a token); e2e: real right-padded "
        "E2E batches, real tokens/s of a dynamic-length head against PyTorch's dynamic padding",
    )
    parser.add_argument(
        "--seq-buckets",
        action="store_true",
        help=f"--data e2e: heads traced for {list(head_step_e2e.SEQ_BUCKETS)} and 128 tokens (export --seq-buckets) "
        "instead of one dynamic-length head (export --dynamic-seq)",
    )
    parser.add_argument("--full-length", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--grouped", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--int8-route", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=("ort", "torch", "export"), help=argparse.SUPPRESS)
    parser.add_argument("--artifacts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--head-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    e2e = args.data == "e2e"
    if args.worker is None:
        kind = ("-e2e" + ("" if args.seq_buckets else "-dynamic")) if e2e else ""
        args.work_dir = args.work_dir / f"cut{args.cut_layer}{kind}"
        report = orchestrate_e2e(args) if e2e else orchestrate(args)
    elif e2e and args.worker != "export":
        worker = {"ort": head_step_e2e.ort_worker, "torch": head_step_e2e.torch_worker}[args.worker]
        report = worker(args)
    else:
        report = {"ort": ort_worker, "torch": torch_worker, "export": export_worker}[args.worker](args)
    print(json.dumps(report, indent=None if args.worker else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
