"""The client head in ONNX Runtime: forward to the cut, and the LoRA gradients back from it. numpy only.

    forward:   input_ids (B, T), attention_mask (B, T), LoRA matrices -> activations (B, T, H), saved...
    backward:  saved..., activation_grads (B, T, H)                  -> grad.<adapter name> for each matrix

The LoRA matrices are named `layers.<layer>.<module path>.lora_A` / `.lora_B` (edgesplit/lora_names.py): the
graphs' input names, the keys of head_adapters.safetensors and of every adapter update.

The graphs are traced for the manifest's batch_size and for each of its sequence buckets (max_seq_len, and
the shorter ones an export made with --seq-buckets): a batch is (batch_size, T) for one of them, padded and
then cut to the shortest that holds it (data.fit_to_bucket). Each bucket's sessions load on its first batch
and are kept; each pair holds its own copy of the weights as ONNX Runtime prepacks them (no Python API shares
prepacked weights between sessions): ~62 MB a bucket for SmolLM2's int8 head at cut 4 (docs/benchmarks.md).
A dynamic-length head (export --dynamic-seq) has one pair of graphs for every length from 2 to max_seq_len:
the client cuts each batch to its longest row and runs the one session pair. Its graphs hold no frozen weight:
both take them as inputs, fed from one array each that this process holds (head_weights.safetensors, int8
for an int8 export, dequantised inside the graph just before each product), and the forward takes the
batch's embedding rows, read from that file token by token (edgesplit/client/fed.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

from edgesplit.client.artifacts import LAYOUT_DEQUANTIZE, LAYOUT_FED, Manifest, load_manifest, verify_files
from edgesplit.client.cpu import CpuFeatures, Route, choose_route, detect
from edgesplit.client.fed import EMBEDDINGS_INPUT, FedWeights
from edgesplit.errors import ArtifactError, EdgesplitError, TrainingError
from edgesplit.lora_names import GRADIENT_PREFIX

Arrays = dict[str, np.ndarray]


@dataclass
class ForwardResult:
    activations: np.ndarray  # (B, T, H) float32
    saved: Arrays  # what the backward graph needs from this forward, by name


@dataclass
class _Graphs:
    """One sequence bucket's sessions: the forward, and the gradient graph (None for a frozen head)."""

    forward: ort.InferenceSession
    backward: ort.InferenceSession | None
    output_names: list[str]
    backward_inputs: list[str]
    forward_fed: Arrays  # the held weights each graph takes as inputs (a dynamic-length head's; client/fed.py)
    backward_fed: Arrays


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for both head sessions: one CPU arena that they share, no memory pattern or reuse, no spinning.

    Measured on SmolLM2 cut at layer 4, batch 4 x 128, int8 (see bench/head_step.py): with the arena off,
    every tensor is malloc'd and glibc keeps much of what is freed, so the resident set crept up step after
    step (253 MB after the first step, 272 MB after 30). One arena shared by the forward and the backward,
    grown by exactly what is asked (not the default doubling), stays at ~245 MB: the backward reuses the
    blocks the forward freed. The memory pattern (one block planned and allocated per run) is off: without
    it a step took ~10% less CPU time and 40-80 MB less memory. Memory reuse (the planner handing a freed
    buffer to a later tensor of the same size, holding it meanwhile) is off too: the arena already recycles
    freed blocks across sizes, and without the planner's holds the int8 step's peak fell from 216 to 191 MB
    and fp32's from 320 to 297 MB, at the same speed. Idle pool threads sleep instead of spinning:
    on a quiet 2-core machine a step took 15-25% less wall time and 20-30% less CPU time (spinning threads
    also burn a device's energy budget).
    """
    _register_shared_arena()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    options.enable_mem_reuse = False
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


# Short names for `--providers`; a full ONNX Runtime provider name is accepted as well.
PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",  # Jetson: NVIDIA's onnxruntime-gpu build for JetPack, not PyPI's
    "tensorrt": "TensorrtExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",  # builds with XNNPACK (Arm); PyPI's wheels have none
}


def resolve_providers(names: Sequence[str]) -> list[str]:
    """ONNX Runtime provider names, in order of preference, for short or full names; CPU is always last.

    A provider that this ONNX Runtime build does not offer is an error that names what it does offer, rather
    than a silent fall back to the CPU.
    """
    available = ort.get_available_providers()
    resolved: list[str] = []
    for name in names:
        full = PROVIDER_NAMES.get(name.strip().lower(), name.strip())
        if full not in available:
            raise EdgesplitError(
                f"execution provider {name!r} ({full}) is not in this onnxruntime {ort.__version__} build, "
                f"which offers {', '.join(available)}. A Jetson's CUDA and TensorRT providers come with NVIDIA's "
                "onnxruntime-gpu build for JetPack, not PyPI's onnxruntime (see docs/devices.md)"
            )
        if full not in resolved:
            resolved.append(full)
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")  # for the nodes another provider does not take
    return resolved


_shared_arena_registered = False


def shrinking_run_options() -> ort.RunOptions:
    """Run options that hand the CPU arena's free regions back after each run: for a dynamic-length head, but
    for an int8 head whose weights are held once.

    The shared arena grows by exactly what is asked and never frees a region, so batches of changing
    lengths fragment it: a request longer than any freed block takes a new region, and the old ones stay.
    Measured on SmolLM2's int8 head at cut 4 (E2E's 12 batches, 56-97 tokens, one thread): peak 305 MB in the
    data's order, 383 MB with the lengths rising, 253 MB falling; with the arena shrunk after each run,
    265 and 277 MB, at the same CPU time a pass (3.2-3.5 s). Measured again with the weights in the graphs:
    307 and 391 MB unshrunk, 270 and 272 shrunk.

    An int8 head whose weights are held once and fed (int8_layout "fed", the default for --dynamic-seq) is not
    shrunk: its arena did not creep (random order, 30 passes of the 12 batches: peak 161.1 MB), its peak was
    lower unshrunk in every order tried (161.1, 157.6 and 160.2 MB random, rising and grouped by length,
    against 173.7, 177.5 and 171.6 shrunk), and a step took up to 2% less CPU time: shrunk, four of the
    forward's 28 dequantisations took 2.3-3.0 ms each run where the others took 0.2-0.4 ms (not page faults:
    with glibc keeping its freed memory there were none, and the times stayed). Each run's dequantised
    weights, of the same sizes at every length, seem to keep the regions in use. The fp32 head
    held once did creep unshrunk (283.5 MB against 217.5 shrunk, bench/head_step.py --data e2e), and is shrunk.
    """
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _register_shared_arena() -> None:
    """Register, once per process, the CPU arena that sessions with `session.use_env_allocators` share."""
    global _shared_arena_registered
    if _shared_arena_registered:
        return
    memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # max_mem 0: no limit; arena_extend_strategy 1: kSameAsRequested; -1: defaults for the chunk sizes.
    ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, 1, -1, -1))
    _shared_arena_registered = True


# Session options per route for such a head (ONNX Runtime's names): the QDQ fusion into MatMulNBits with
# int8 dot products, or no fusion, so that constant folding dequantises each weight once at load.
ROUTE_SESSION_CONFIG: dict[Route, dict[str, str]] = {
    Route.INT8_DOT: {"session.qdq_matmulnbits_accuracy_level": "4"},
    Route.FP32_DEQUANTISED: {"session.disable_quant_qdq": "1"},
}


def head_route(quantize: str, cpu: CpuFeatures, int8_layout: str | None = None) -> tuple[str, str]:
    """What the head's frozen-weight products run as here, and a note when this CPU would suit another form.

    An fp32 head runs in float32. An int8 head exported as blocked DequantizeLinear + MatMul (`int8_layout`
    "dequantize-linear") takes the route cpu.py chooses: int8 dot products where the CPU has them, else
    float32 from weights dequantised at load, so that it is never slower than the fp32 head. An older int8
    head holds MatMulNBits nodes, which ONNX Runtime cannot dequantise at load: int8 dot products always, and
    on a CPU without them a note saying to export again.
    """
    if quantize != "int8":
        return "fp32", ""
    if int8_layout == LAYOUT_FED:
        return Route.INT8_HELD.value, ""
    route = choose_route(cpu)
    if int8_layout == LAYOUT_DEQUANTIZE or route is Route.INT8_DOT:  # the CPU's route, or one it suits
        return route.value, ""
    features = ", ".join(cpu.names()) or "none known"
    return Route.INT8_DOT.value, (
        f"this CPU ({cpu.arch}; {features}) has no int8 dot products (VNNI, AVX-VNNI, arm64 dot product or i8mm),"
        " where this int8 head (MatMulNBits, from an older export) runs slower than an fp32 one: export it again "
        "with this version, whose int8 head is dequantised at load on such a CPU"
    )


def _graph_file(files: Sequence[str]) -> str:
    """The ONNX graph among a stage's files (the others are its external data)."""
    graph = next((file for file in files if file.endswith(".onnx")), None)
    if graph is None:
        raise ArtifactError(f"a head stage lists no .onnx file, only {list(files)}: export the artifacts again")
    return graph


class Head:
    """Both head graphs of one artifact directory, ready to run."""

    def __init__(
        self,
        artifact_dir: str | Path,
        threads: int | None = None,
        verify: bool = True,
        providers: Sequence[str] = (),
        cpu: CpuFeatures | None = None,
        int8_route: Route | None = None,
    ) -> None:
        """`providers`: ONNX Runtime execution providers by preference (see `resolve_providers`); CPU if empty.
        `cpu`: the features to choose the int8 route by (this host's by default); `int8_route` forces a route
        on an int8 head that can take either (benchmarks compare them on one host)."""
        self.root = Path(artifact_dir)
        self.manifest: Manifest = load_manifest(self.root, verify=False)
        if verify:  # the device needs (and may hold) only its own files: the head and the tokenizer, no tail/
            verify_files(self.root, self.manifest, only=("head", "tokenizer"))
        self.cpu: CpuFeatures = detect() if cpu is None else cpu
        self.route, self.route_note = head_route(self.manifest.quantize, self.cpu, self.manifest.int8_layout)
        if int8_route is not None and self.manifest.int8_layout == LAYOUT_DEQUANTIZE:
            self.route = int8_route.value
        self._options = session_options(threads)
        if self.manifest.int8_layout == LAYOUT_DEQUANTIZE:
            for key, value in ROUTE_SESSION_CONFIG[Route(self.route)].items():
                self._options.add_session_config_entry(key, value)
        self._providers = resolve_providers(providers)
        # Shrunk after each run: a dynamic-length head, but an int8 one with its weights held once
        # (shrinking_run_options).
        shrink = self.manifest.dynamic_seq and self.manifest.int8_layout != LAYOUT_FED
        self._run_options = shrinking_run_options() if shrink else None
        self.fed: FedWeights | None = None
        if self.manifest.fed_weights is not None:
            self.fed = FedWeights(self.root / self.manifest.fed_weights, self.manifest.vocab_size)
        self._graphs: dict[int, _Graphs] = {}
        full = self._graphs_for(self.manifest.max_seq_len)  # loaded now: a bad artifact fails at start
        self.forward_session = full.forward
        self.backward_session = full.backward
        self.providers: list[str] = self.forward_session.get_providers()  # what the session really uses
        self.output_names = full.output_names
        self.backward_inputs = full.backward_inputs

    def _graphs_for(self, seq_len: int) -> _Graphs:
        """The sessions of the bucket of `seq_len` tokens, loaded on first use and kept."""
        manifest = self.manifest
        if seq_len not in manifest.seq_lengths:
            raise TrainingError(f"the head takes batches of {_lengths(manifest)} tokens, got {seq_len} tokens")
        key = manifest.max_seq_len if manifest.dynamic_seq else seq_len  # one session pair for every length
        graphs = self._graphs.get(key)
        if graphs is not None:
            return graphs
        forward_file = _graph_file(manifest.head_stage(seq_len).files)
        backward_file = None if manifest.frozen_head else _graph_file(manifest.grad_stage(seq_len).files)
        try:
            forward = self._session(forward_file)
            backward = None if backward_file is None else self._session(backward_file)
        except Exception as error:  # ONNX Runtime raises its own exception types for a corrupt graph
            raise ArtifactError(f"ONNX Runtime cannot load the head in {self.root}: {error}") from error
        backward_inputs = [i.name for i in backward.get_inputs()] if backward else []
        fed = self.fed
        graphs = _Graphs(
            forward=forward,
            backward=backward,
            output_names=[o.name for o in forward.get_outputs()],
            backward_inputs=backward_inputs,
            forward_fed=fed.inputs_for([i.name for i in forward.get_inputs()]) if fed else {},
            backward_fed=fed.inputs_for(backward_inputs) if fed else {},
        )
        self._graphs[key] = graphs
        return graphs

    def _session(self, file: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(self.root / file), self._options, providers=self._providers)

    @property
    def trainable(self) -> bool:
        return self.backward_session is not None

    def initial_adapters(self) -> Arrays:
        adapters = load_file(str(self.root / "head_adapters.safetensors"))
        expected = set(self.manifest.lora.matrices)
        if set(adapters) != expected:
            raise ArtifactError(f"head_adapters.safetensors holds {sorted(adapters)}, the manifest {sorted(expected)}")
        return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in adapters.items()}

    def check_adapters(self, adapters: Arrays) -> None:
        """The adapters fit the graph: the same names and shapes, finite float32."""
        for name, shape in self.manifest.lora.matrices.items():
            value = adapters.get(name)
            if value is None or tuple(value.shape) != tuple(shape):
                got = None if value is None else tuple(value.shape)
                raise TrainingError(f"adapter {name} has shape {got}, the head expects {tuple(shape)}")
            if not np.all(np.isfinite(value)):
                raise TrainingError(f"adapter {name} contains NaN or Inf")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, adapters: Arrays) -> ForwardResult:
        """input_ids and attention_mask (B, T) for T one of the manifest's sequence lengths."""
        if (
            input_ids.ndim != 2
            or input_ids.shape[0] != self.manifest.batch_size
            or attention_mask.shape != input_ids.shape
        ):
            raise TrainingError(
                f"the head takes batches of {_lengths(self.manifest)} tokens, got input_ids {input_ids.shape} and "
                f"attention_mask {attention_mask.shape}"
            )
        graphs = self._graphs_for(int(input_ids.shape[1]))
        feed = {
            "input_ids": input_ids.astype(np.int64, copy=False),
            "attention_mask": attention_mask.astype(np.int64, copy=False),
        }
        for name in self.manifest.lora.matrices:
            feed[name] = adapters[name]
        if self.fed is not None:
            feed[EMBEDDINGS_INPUT] = self.fed.embed(input_ids)
        outputs = graphs.forward.run(None, {**feed, **graphs.forward_fed}, self._run_options)
        named = dict(zip(graphs.output_names, outputs, strict=True))
        activations = named.pop("activations")
        # The backward may also read forward inputs (the mask, LoRA matrices) under their own names.
        saved = {
            name: named[name] if name in named else feed[name]
            for name in graphs.backward_inputs
            if name != "activation_grads" and name not in graphs.backward_fed
        }
        return ForwardResult(activations=activations, saved=saved)

    def backward(self, forward: ForwardResult, activation_grads: np.ndarray) -> Arrays:
        """LoRA gradients of sum(activations * activation_grads), keyed by adapter name."""
        if self.backward_session is None:
            raise TrainingError("this head was exported with --frozen-head: it has no gradient graph")
        if activation_grads.shape != forward.activations.shape:
            raise TrainingError(
                f"activation_grads has shape {activation_grads.shape}, activations {forward.activations.shape}"
            )
        if not np.all(np.isfinite(activation_grads)):
            raise TrainingError("activation_grads from the server contain NaN or Inf; the step is skipped")
        graphs = self._graphs_for(int(forward.activations.shape[1]))
        session = graphs.backward
        assert session is not None  # a trainable head has a gradient graph in every bucket (the manifest checks)
        feed = {**forward.saved, **graphs.backward_fed}
        feed["activation_grads"] = np.ascontiguousarray(activation_grads, dtype=np.float32)
        outputs = session.run(None, feed, self._run_options)
        names = [o.name for o in session.get_outputs()]
        return {name.removeprefix(GRADIENT_PREFIX): value for name, value in zip(names, outputs, strict=True)}


def _lengths(manifest: Manifest) -> str:
    """The batch shapes a head takes, in words: '4 x 2..128' (dynamic length) or '4 x one of [64, 128]'."""
    if manifest.dynamic_seq:
        return f"{manifest.batch_size} x {manifest.seq_lengths[0]}..{manifest.max_seq_len}"
    return f"{manifest.batch_size} x one of {list(manifest.seq_buckets)}"
