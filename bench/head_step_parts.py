"""What bench/head_step.py and bench/head_step_e2e.py share: the PyTorch + peft reference head and a
worker's memory figures. Apart from both, so that neither imports the other for them."""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from typing import Any

MEMORY_BAR = 3.0  # the ONNX Runtime head's peak RSS at least this many times lower than PyTorch's


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def high_water_mb() -> float:
    """VmHWM: this process's own peak RSS, which unlike ru_maxrss owes nothing to the parent's."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_figures(rss_after_load: float) -> dict[str, float]:
    """A worker's memory after its steps: peaks (ru_maxrss and VmHWM), after loading, and now."""
    return {
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "vm_hwm_mb": round(high_water_mb(), 1),
        "peak_rss_after_load_mb": round(rss_after_load, 1),
        "rss_after_steps_mb": round(current_rss_mb(), 1),
    }


def build_torch_head(args: argparse.Namespace) -> tuple[Any, dict[str, Any], float, float]:
    """The head in PyTorch from its config and weights, LoRA through peft with the ONNX head's initial adapters:
    (model, its LoRA parameters by name, load seconds, peak RSS after loading)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file
    from transformers import AutoModel

    from edgesplit.lora_names import from_peft_key

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lora_settings = json.loads((args.head_dir / "lora.json").read_text())
    model = AutoModel.from_pretrained(args.head_dir, dtype=torch.float32, attn_implementation=args.attention)
    model.norm = torch.nn.Identity()  # the head ends at the cut: no final norm
    model.eval()  # no dropout, as in the ONNX head
    config = LoraConfig(
        r=lora_settings["rank"],
        lora_alpha=lora_settings["alpha"],
        target_modules=lora_settings["targets"],
        lora_dropout=0.0,
    )
    model = get_peft_model(model, config)
    # The ONNX head's initial adapters, so that both sides compute the very same function.
    initial = load_file(str(args.artifacts / "head_adapters.safetensors"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            adapter = from_peft_key(name, "layers")  # the backbone alone: its layers are at `layers`
            if adapter is not None:
                parameter.copy_(torch.from_numpy(initial[str(adapter)]))
    load_seconds = time.perf_counter() - started
    lora_parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return model, lora_parameters, load_seconds, peak_rss_mb()
