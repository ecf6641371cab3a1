"""`bench/head_step.py --data e2e`: what a user gets on real batches, not packed text.

Real E2E examples, tokenized as the client tokenizes them (prompt, completion, EOS; right-padded to the
export's 128 tokens), in batches of 4 drawn at random. Each runtime trains the head on every batch, in its
own process (memory counts all it needs), and reports real tokens per second: the batch's attended tokens,
not its padding, over the step's wall time.

    ort_fp32, ort_int8   the edge client's Head on artifacts exported with --dynamic-seq (one graph pair, any
                         length; with --seq-buckets, heads traced for SEQ_BUCKETS and 128): each batch cut to
                         the shortest length that holds its longest example (data.fit_to_bucket), as the
                         client does
    ort_int8_weights_in_graphs   (dynamic) the int8 head exported --weights-in-graphs: each graph holds its
                         weights, on this CPU's int8 route, against ort_int8's weights held once and fed to both
                         graphs (export/fed.py)
    ort_int8_dequantised (buckets) the int8 artifacts on the route a CPU without int8 dot products takes (weights
                         dequantised at load, float32 products), forced here to compare the routes on one host
    ort_int8_full_length the same int8 artifacts run at the full 128 tokens: what cutting the padding saves
    ort_int8_grouped     ort_int8 on batches grouped by length, as `edgesplit client --group-by-length` draws
                         them (data.iterate_batches): 12 batches at random from one group of 50 batches' examples
    torch                PyTorch + peft, each batch padded to its own longest example only (the usual dynamic
                         padding of a PyTorch training loop)
    torch_grouped        the same on the grouped batches: `vs_torch.ort_int8_grouped` compares with `torch` (what
                         a user gets against a PyTorch loop as usually run), `same_batches_tokens_per_cpu_s_ratio`
                         with this one

A repeat is one pass over all the batches (the first pass, the warm-up, also loads every bucket's sessions);
its tokens/s is the pass's real tokens over its wall time; the median over repeats is reported, and the same
per second of the process's CPU time (`real_tokens_per_cpu_s_median`, `vs_torch.*.tokens_per_cpu_s_ratio`):
on a shared machine the wall clock measures the neighbours; with `--threads 1` the CPU time does not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

E2E_BATCHES_FILE = "e2e_batches.npz"
E2E_GROUPED_FILE = "e2e_batches_grouped.npz"  # the same shapes, batches grouped by length
SEQ_BUCKETS = (64, 80, 96, 112)  # with 128: E2E's batches of 4 have their longest example at 62-92 tokens (5-95%)
TOKENS_PER_S_BAR = 1.5  # ORT int8 at least this many times PyTorch's real tokens/s
BATCHES = 12


def write_batches(
    tokenizer_dir: Path, train: Path, out: Path, batch_size: int, max_seq_len: int, seed: int
) -> dict[str, Any]:
    """BATCHES batches of random E2E examples, encoded as the client encodes them."""
    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.data import encode_examples, load_tokenizer, read_jsonl

    manifest = load_manifest(tokenizer_dir, verify=False)
    examples = read_jsonl(train)
    rng = np.random.default_rng(seed)
    chosen = [examples[i] for i in rng.choice(len(examples), size=BATCHES * batch_size, replace=False)]
    encoded = encode_examples(
        load_tokenizer(tokenizer_dir), chosen, max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
    )
    shape = (BATCHES, batch_size, max_seq_len)
    np.savez(
        out,
        input_ids=encoded.input_ids.reshape(shape),
        attention_mask=encoded.attention_mask.reshape(shape),
    )
    lengths = encoded.attention_mask.sum(axis=1)
    write_grouped_batches(tokenizer_dir, examples, out.parent / E2E_GROUPED_FILE, batch_size, max_seq_len, seed)
    return {"examples": len(chosen), "median_tokens": float(np.median(lengths)), "truncated": encoded.num_truncated}


def write_grouped_batches(
    tokenizer_dir: Path, examples: list[Any], out: Path, batch_size: int, max_seq_len: int, seed: int
) -> None:
    """BATCHES batches as --group-by-length draws them: one length group of random examples (LENGTH_GROUP_BATCHES
    batches' worth) sorted by length in bands of LENGTH_GROUP_BAND tokens and cut into batches, the batches
    shuffled; the first BATCHES of them."""
    from edgesplit.client.artifacts import load_manifest
    from edgesplit.client.data import LENGTH_GROUP_BATCHES, encode_examples, iterate_batches, load_tokenizer

    manifest = load_manifest(tokenizer_dir, verify=False)
    rng = np.random.default_rng(seed + 1)
    pool = [examples[i] for i in rng.choice(len(examples), size=LENGTH_GROUP_BATCHES * batch_size, replace=False)]
    encoded = encode_examples(
        load_tokenizer(tokenizer_dir), pool, max_seq_len, manifest.eos_token_id, manifest.pad_token_id or 0
    )
    drawn = iterate_batches(encoded, batch_size, seed, group_by_length=True)
    batches = [next(drawn) for _ in range(BATCHES)]
    np.savez(
        out,
        input_ids=np.stack([b.input_ids for b in batches]),
        attention_mask=np.stack([b.attention_mask for b in batches]),
    )


def load_batches(work_dir: Path, grouped: bool = False) -> tuple[np.ndarray, np.ndarray]:
    with np.load(work_dir / (E2E_GROUPED_FILE if grouped else E2E_BATCHES_FILE)) as batches:
        return batches["input_ids"], batches["attention_mask"]


def _grads(shape: tuple[int, ...]) -> np.ndarray:
    return (np.random.default_rng(1).standard_normal(shape) * 1e-3).astype(np.float32)


def _passes(warmup: int, repeats: int, one_pass: Any) -> list[tuple[float, float]]:
    for _ in range(warmup):
        one_pass()
    return [one_pass() for _ in range(repeats)]


def _figures(passes: list[tuple[float, float]], real_tokens: int, computed_tokens: int) -> dict[str, Any]:
    rates = [real_tokens / seconds for seconds, _ in passes]
    cpu_rates = [real_tokens / cpu for _, cpu in passes]
    return {
        "real_tokens_per_s_median": round(statistics.median(rates), 1),
        # Per second of this process's CPU time: what a busy machine's wall clock does not show.
        "real_tokens_per_cpu_s_median": round(statistics.median(cpu_rates), 1),
        "real_tokens_per_s_samples": [round(rate, 1) for rate in rates],
        "pass_s_samples": [round(seconds, 3) for seconds, _ in passes],
        "pass_cpu_s_samples": [round(cpu, 3) for _, cpu in passes],
        "real_tokens_per_pass": real_tokens,
        "computed_tokens_per_pass": computed_tokens,
        "real_share_of_computed": round(real_tokens / computed_tokens, 3),
    }


def ort_worker(args: argparse.Namespace) -> dict[str, Any]:
    """The client's head, numpy and ONNX Runtime only; `--full-length` runs every batch at max_seq_len."""
    from head_step_parts import memory_figures, peak_rss_mb

    from edgesplit.client.cpu import Route
    from edgesplit.client.data import Batch, fit_to_bucket
    from edgesplit.client.head import Head

    started = time.perf_counter()
    route = Route(args.int8_route) if args.int8_route else None
    head = Head(args.artifacts, threads=args.threads, int8_route=route)
    load_seconds = time.perf_counter() - started
    rss_after_load = peak_rss_mb()
    adapters = head.initial_adapters()
    input_ids, attention_mask = load_batches(args.artifacts.parent, args.grouped)
    lengths = (head.manifest.max_seq_len,) if args.full_length else head.manifest.seq_lengths
    batches = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        batch = fit_to_bucket(Batch(ids, mask, ids, np.arange(len(ids))), lengths)
        grads = _grads((*batch.input_ids.shape, head.manifest.hidden_size))
        batches.append((batch.input_ids, batch.attention_mask, grads))

    def one_pass() -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        for ids, mask, grads in batches:
            head.backward(head.forward(ids, mask, adapters), grads)
        return time.perf_counter() - t0, time.process_time() - c0

    passes = _passes(args.warmup, args.repeats, one_pass)
    assert "torch" not in sys.modules, "the ONNX Runtime worker imported torch"
    return {
        **_figures(passes, int(attention_mask.sum()), sum(ids.size for ids, _, _ in batches)),
        **memory_figures(rss_after_load),
        "load_s": round(load_seconds, 2),
        "route": head.route,
        "dynamic_seq": head.manifest.dynamic_seq and not args.full_length,
        "seq_lengths": [lengths[0], lengths[-1]] if head.manifest.dynamic_seq else list(lengths),
        "batches_per_length": {
            str(n): sum(ids.shape[1] == n for ids, _, _ in batches)
            for n in sorted({ids.shape[1] for ids, _, _ in batches})
        },
    }


def torch_worker(args: argparse.Namespace) -> dict[str, Any]:
    """PyTorch + peft, each batch padded to its own longest example."""
    import torch
    from head_step_parts import build_torch_head, memory_figures

    model, lora_parameters, load_seconds, rss_after_load = build_torch_head(args)
    input_ids, attention_mask = load_batches(args.artifacts.parent, args.grouped)
    batches = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        longest = int(np.flatnonzero(mask.any(axis=0))[-1]) + 1
        hidden = model.config.hidden_size
        batches.append(
            (
                torch.from_numpy(np.ascontiguousarray(ids[:, :longest])),
                torch.from_numpy(np.ascontiguousarray(mask[:, :longest])),
                torch.from_numpy(_grads((ids.shape[0], longest, hidden))),
            )
        )

    def one_pass() -> tuple[float, float]:
        c0, t0 = time.process_time(), time.perf_counter()
        for ids, mask, grads in batches:
            for parameter in lora_parameters.values():
                parameter.grad = None
            activations = model(input_ids=ids, attention_mask=mask).last_hidden_state
            (activations * grads).sum().backward()
        return time.perf_counter() - t0, time.process_time() - c0

    passes = _passes(args.warmup, args.repeats, one_pass)
    return {
        **_figures(passes, int(attention_mask.sum()), sum(ids.numel() for ids, _, _ in batches)),
        **memory_figures(rss_after_load),
        "load_s": round(load_seconds, 2),
        "threads": torch.get_num_threads(),
        "attention": args.attention,
    }


def compare(runs: dict[str, dict[str, Any]], busy: bool) -> dict[str, Any]:
    """vs_torch.<runtime>: tokens/s and peak memory against PyTorch's, and the bars."""
    from head_step_parts import MEMORY_BAR

    torch_run = runs["torch"]
    comparison: dict[str, Any] = {}
    for name, run in runs.items():
        if name == "torch":
            continue
        speed = run["real_tokens_per_s_median"] / torch_run["real_tokens_per_s_median"]
        memory = torch_run["peak_rss_mb"] / run["peak_rss_mb"]
        cpu_speed = run["real_tokens_per_cpu_s_median"] / torch_run["real_tokens_per_cpu_s_median"]
        same: dict[str, float] = {}
        if name.endswith("_grouped") and name != "torch_grouped" and "torch_grouped" in runs:
            # The same grouped batches in PyTorch: the runtimes alone, without what grouping saves.
            same_cpu = run["real_tokens_per_cpu_s_median"] / runs["torch_grouped"]["real_tokens_per_cpu_s_median"]
            same = {"same_batches_tokens_per_cpu_s_ratio": round(same_cpu, 2)}
        comparison[name] = {
            **same,
            "tokens_per_s_ratio": round(speed, 2),
            "tokens_per_cpu_s_ratio": round(cpu_speed, 2),
            "memory_ratio_torch_over_ort": round(memory, 2),
            f"tokens_per_s_bar_{TOKENS_PER_S_BAR:g}x_met": bool(speed >= TOKENS_PER_S_BAR),
            f"memory_bar_{MEMORY_BAR:g}x_met": bool(memory >= MEMORY_BAR),
            "speed_bar_reliable": not busy,
        }
    return comparison
