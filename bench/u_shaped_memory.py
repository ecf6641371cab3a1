"""The device's peak memory in a U-shaped split against the plain split, on the same export. JSON.

    python bench/u_shaped_memory.py [--artifacts DIR] [--work-dir /var/tmp/edgesplit-ushape] [--cut-layer 4]
                                    [--top-layers 2] [--steps 4]

One U-shaped export of the default model (SmolLM2-135M, `edgesplit export --cut-layer 4 --top-layers 2`, made
once in the work dir unless --artifacts names one) holds both devices' graphs: its head.onnx and head_grad.onnx
are a plain split's. Each mode runs in its own fresh process, without torch, for --steps steps of batch 4 x 128
after one warm-up step, and reports the kernel's high-water mark of its resident set (ru_maxrss, which no
sampler can miss) and its median step time:

- split:    the plain split's device step: head forward, then its backward from a random activation gradient;
- u_shaped: the U-shaped device step: head forward, top.onnx (the last layers, the norm, the LM head and the
            chunked loss, forward and backward) on activations standing in for the middle's output, head
            backward;
- top:      top.onnx alone, on random activations (no head loaded).

With each, how much of the two files that hold the vocabulary table is resident after the steps (from
/proc/self/smaps): head.onnx.data (the head's embedding table, of which a step reads the batch's rows) and
lm_head.npy (the LM head's weight, transposed, read whole by every step of the top). No server and no
network: what is measured is the device's compute and its memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from common import EDGESPLIT, machine

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np
from edgesplit.client.head import Head
mode, root, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert "torch" not in sys.modules
head = Head(root, threads=None, verify=False) if mode != "top" else None
from edgesplit.client.artifacts import load_manifest
m = load_manifest(root, verify=False)
adapters = head.initial_adapters() if head is not None else {}
top = None
if mode in ("u_shaped", "top"):
    from edgesplit.client.top import Top
    top = Top(root, verify=False)
    top_adapters = top.initial_adapters()
rng = np.random.default_rng(0)
ids = rng.integers(0, m.vocab_size, (m.batch_size, m.max_seq_len)).astype(np.int64)
mask = np.ones_like(ids)
labels = rng.integers(0, m.vocab_size, ids.shape).astype(np.int64)
times = []
for step in range(steps + 1):
    started = time.perf_counter()
    if head is None:  # the top alone, on activations of the usual scale
        upper = rng.standard_normal((m.batch_size, m.max_seq_len, m.hidden_size)).astype(np.float32)
        top.step(upper, mask, labels, top_adapters)
        if step:
            times.append(time.perf_counter() - started)
        continue
    forward = head.forward(ids, mask, adapters)
    if top is None:
        grads = rng.standard_normal(forward.activations.shape).astype(np.float32) * 1e-3
    else:
        result = top.step(forward.activations, mask, labels, top_adapters)
        grads = result.activation_grads
    head.backward(forward, grads)
    if step:
        times.append(time.perf_counter() - started)
resident = {}
with open("/proc/self/smaps") as smaps:
    current = None
    for line in smaps:
        parts = line.split()
        if len(parts) >= 5 and "-" in parts[0] and ":" in parts[3]:  # a mapping's header line
            current = parts[5].rsplit("/", 1)[-1] if len(parts) >= 6 else None
        elif parts and parts[0] == "Rss:" and current in ("head.onnx.data", "lm_head.npy"):
            resident[current] = resident.get(current, 0) + int(parts[1]) / 1024
print(json.dumps({
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "step_seconds_median": statistics.median(times),
    "resident_mib": {name: round(value, 1) for name, value in resident.items()},
    "torch_imported": "torch" in sys.modules,
}))
"""


def export(out: Path, cut_layer: int, top_layers: int) -> None:
    command = [*EDGESPLIT, "export", "--cut-layer", str(cut_layer), "--top-layers", str(top_layers)]
    subprocess.run([*command, "--out", str(out), "--force"], check=True, cwd=REPO)


def run_mode(mode: str, artifacts: Path, steps: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(artifacts), str(steps)],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, help="a U-shaped export to measure (default: made in --work-dir)")
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/edgesplit-ushape"))
    parser.add_argument("--cut-layer", type=int, default=4)
    parser.add_argument("--top-layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    artifacts = args.artifacts or args.work_dir / f"smollm2-cut{args.cut_layer}-top{args.top_layers}"
    if not (artifacts / "manifest.json").exists():
        export(artifacts, args.cut_layer, args.top_layers)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    top = next(stage for stage in manifest["stages"] if stage["name"] == "top")
    report = {
        "bench": "u_shaped_memory",
        "artifacts": str(artifacts),
        "cut_layer": next(s for s in manifest["stages"] if s["name"] == "head")["layers"][1],
        "top_layers": top["layers"],
        "shapes": manifest["shapes"],
        "vocab_size": manifest["model"]["vocab_size"],
        "steps": args.steps,
        "modes": {mode: run_mode(mode, artifacts, args.steps) for mode in ("split", "u_shaped", "top")},
        "machine": machine(),
    }
    modes = report["modes"]
    report["u_shaped_extra_peak_mib"] = round(modes["u_shaped"]["peak_rss_mib"] - modes["split"]["peak_rss_mib"], 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
