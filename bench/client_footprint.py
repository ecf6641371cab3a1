"""The edge client's footprint on a device: its installed environment and its peak memory in training. JSON.

    python bench/client_footprint.py [--work-dir /var/tmp/edgesplit-footprint] [--steps 8] [--cut-layer 4]
                                     [--quantize int8] [--reexport] [--plain] [--fresh-venv]

- Environment: a new venv holding only the edge client, made by the device recipe, `tools/install_edge.py`
  (the slim install: the wheel built from this checkout with its edge dependencies as pip resolves them, minus
  huggingface-hub and what only it needs, minus pip and setuptools). It is measured as `du` of its
  site-packages, with the size of each installed distribution from its RECORD and the installer's record of
  what it dropped. It is built afresh on every run (it has no pip to update itself with). `--plain` also
  measures a plain `pip install` of the same wheel into another venv, kept between runs (`--fresh-venv`
  rebuilds it), with pip, setuptools and the huggingface_hub stack shown apart. For scale, the size of the
  PyTorch in this interpreter's environment, if there is one.
- Memory: a real `edgesplit serve` (this interpreter, torch) and a real `edgesplit client` from the slim venv
  (no torch, no huggingface_hub in it) train the default model cut at `--cut-layer` with `--quantize` over
  loopback for `--steps` steps. The client's peak RSS is its own metrics summary: `peak_rss_mb` (its 10 ms RSS
  sampler) and `memory.os_max_rss_bytes` (the kernel's ru_maxrss high-water mark, which a sampler cannot miss).

Bars (issue 9): environment under 200 MB installed, client peak under 400 MB. The figures are reported whether
or not a bar is met. The work dir keeps the plain venv and the artifacts between runs (an int8 export of
SmolLM2 at layer 4 takes about 40 s); `--fresh-venv` and `--reexport` rebuild them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import export_command, free_port, serve_command

from edgesplit.server.orchestrate import ClientCommand, command_line

REPO = Path(__file__).resolve().parent.parent
E2E_TRAIN = REPO.parent / "shared" / "data" / "e2e" / "train.jsonl"
INSTALLER = REPO / "tools" / "install_edge.py"
ENVIRONMENT_BAR_MB = 200.0
PEAK_MEMORY_BAR_MB = 400.0
MB = 1e6  # installed sizes in decimal megabytes, like du --si and pip
MIB = 2**20  # memory in MiB, like the client's own peak_rss_mb

# Run inside the venv's interpreter: each installed distribution's size from its RECORD, and whether torch is
# importable there (it must not be).
SIZES_SCRIPT = r"""
import importlib.metadata, importlib.util, json, os, sysconfig
try:
    from packaging.requirements import Requirement
except ImportError:
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:
        Requirement = None
def canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")
sizes, requires = {}, {}
for dist in importlib.metadata.distributions():
    total = 0
    for entry in dist.files or []:
        try:
            total += os.path.getsize(entry.locate())
        except OSError:
            pass
    name = canonical(dist.metadata["Name"])
    sizes[name] = [dist.version, total]
    requires[name] = [canonical(r.name) for r in map(Requirement, dist.requires or [])
                      if r.marker is None or r.marker.evaluate({"extra": ""})] if Requirement else []
print(json.dumps({"site_packages": sysconfig.get_paths()["purelib"], "sizes": sizes, "requires": requires,
                  "torch_importable": importlib.util.find_spec("torch") is not None,
                  "huggingface_hub_importable": importlib.util.find_spec("huggingface_hub") is not None}))
"""


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, **kwargs)


def du_bytes(path: Path) -> int:
    """Disk usage in bytes, as `du -s --block-size=1` counts it (blocks, not apparent sizes)."""
    output = subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True)
    return int(output.stdout.split()[0])


def build_wheel(work: Path) -> Path:
    """The edgesplit wheel of this checkout (pure Python, the same file for every device)."""
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(REPO)],
        stdout=subprocess.DEVNULL,
    )
    return next(dist.glob("edgesplit-*.whl"))


def build_slim_venv(work: Path, wheel: Path) -> tuple[Path, dict[str, Any]]:
    """The device recipe, tools/install_edge.py, into work/venv-slim; its python and the installer's record."""
    venv = work / "venv-slim"
    log = work / "install-slim.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        done = subprocess.run(
            [sys.executable, str(INSTALLER), str(venv), str(wheel), "--replace"],
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )
    if done.returncode != 0:
        raise SystemExit(f"the slim install failed ({done.returncode}); its output:\n{log.read_text()[-4000:]}")
    record: dict[str, Any] = json.loads((venv / "edgesplit-install.json").read_text())
    record["install_seconds"] = round(time.perf_counter() - started, 1)
    return venv / "bin" / "python", record


def build_plain_venv(work: Path, wheel: Path, fresh: bool) -> Path:
    """`pip install` of the wheel into work/venv, as a device would without the recipe; its python."""
    venv = work / "venv"
    if fresh:
        shutil.rmtree(venv, ignore_errors=True)
    python = venv / "bin" / "python"
    if not python.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--quiet"]
    run([*pip, str(wheel)])
    run([*pip, "--no-deps", "--force-reinstall", str(wheel)])  # the checkout's code changes, its version not
    return python


def reachable(requires: dict[str, list[str]], root: str, skip: frozenset[str] = frozenset()) -> set[str]:
    """The distributions `root` needs, transitively, not walking through those in `skip`."""
    seen: set[str] = set()
    stack = [root]
    while stack:
        name = stack.pop()
        if name in seen or name in skip or name not in requires:
            continue
        seen.add(name)
        stack.extend(requires[name])
    return seen


def environment_footprint(python: Path) -> dict[str, Any]:
    """A venv's installed size (du of site-packages), each distribution's, and what would not need to be there."""
    probe = json.loads(run([str(python), "-c", SIZES_SCRIPT], capture_output=True).stdout)
    site_packages = Path(probe["site_packages"])
    sizes: dict[str, tuple[str, int]] = probe["sizes"]
    requires: dict[str, list[str]] = probe["requires"]
    installed = du_bytes(site_packages)
    bootstrap = sum(sizes[name][1] for name in ("pip", "setuptools") if name in sizes)
    # tokenizers requires huggingface_hub (and it a dozen more) for downloading from the hub, which the
    # client never does (it reads the artifact's tokenizer.json): how much of the install that is.
    needed = reachable(requires, "edgesplit")
    hub_only = sorted(needed - reachable(requires, "edgesplit", frozenset({"huggingface-hub"})))
    return {
        "python": run([str(python), "--version"], capture_output=True).stdout.strip(),
        "site_packages_mb": round(installed / MB, 1),
        "pip_and_setuptools_mb": round(bootstrap / MB, 1),
        "site_packages_without_pip_setuptools_mb": round((installed - bootstrap) / MB, 1),
        "huggingface_hub_and_what_only_it_needs_mb": round(sum(sizes[name][1] for name in hub_only) / MB, 1),
        "huggingface_hub_and_what_only_it_needs": hub_only,
        "venv_mb": round(du_bytes(python.parent.parent) / MB, 1),
        "distribution_count": len(sizes),
        "distributions_mb": {
            f"{name}=={version}": round(size / MB, 2)
            for name, (version, size) in sorted(sizes.items(), key=lambda item: -item[1][1])
        },
        "torch_in_venv": probe["torch_importable"],
        "huggingface_hub_in_venv": probe["huggingface_hub_importable"],
        "bar_mb": ENVIRONMENT_BAR_MB,
        "meets_bar": installed / MB < ENVIRONMENT_BAR_MB,
    }


def pytorch_size() -> dict[str, float] | None:
    """The installed size of this interpreter's torch (and its nvidia-* libraries, if any), for scale."""
    probe = json.loads(run([sys.executable, "-c", SIZES_SCRIPT], capture_output=True).stdout)
    sizes = {
        f"{name}=={version}": round(size / MB, 1)
        for name, (version, size) in probe["sizes"].items()
        if name in ("torch", "triton") or name.startswith("nvidia-")
    }
    return sizes or None


def ensure_artifacts(work: Path, model: str, cut_layer: int, quantize: str, reexport: bool) -> Path:
    artifacts = work / f"artifacts-{model}-cut{cut_layer}-{quantize}"
    if reexport or not (artifacts / "manifest.json").exists():
        run(
            export_command(artifacts, cut_layer, quantize, model),
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdout=sys.stderr,  # the exporter's report would break this script's JSON on stdout
        )
    return artifacts


def write_training_data(work: Path, lines: int = 256) -> tuple[Path, str]:
    """E2E examples where the shared data set is present, otherwise generated sentences (the same shapes:
    the client pads every batch to the traced max_seq_len, so memory does not depend on the text)."""
    path = work / "train.jsonl"
    if E2E_TRAIN.exists():
        path.write_text("\n".join(E2E_TRAIN.read_text().splitlines()[::7][:lines]) + "\n")
        return path, f"E2E train, every 7th line, {lines} examples"
    words = "the device trains its adapters on local data while the server runs the remaining layers".split()
    with path.open("w") as handle:
        for index in range(lines):
            text = " ".join(words[(index + k) % len(words)] for k in range(40))
            handle.write(json.dumps({"text": text}) + "\n")
    return path, f"generated sentences, {lines} examples"


def train(python: Path, artifacts: Path, data: Path, work: Path, steps: int, threads: int) -> dict[str, Any]:
    port = free_port()
    server_metrics, client_metrics = work / "server.jsonl", work / "client.jsonl"
    for path in (server_metrics, client_metrics):
        path.unlink(missing_ok=True)
    server = subprocess.Popen(
        serve_command(artifacts, port, server_metrics, steps=steps),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    # The client runs from the venv, outside the checkout, so that nothing but the installed wheel is found.
    client_command = command_line(
        ClientCommand(
            server=f"ws://127.0.0.1:{port}",
            artifacts=artifacts,
            data=data,
            client_id="footprint",
            metrics_out=client_metrics,
            threads=threads or None,  # None: the client's default, every core
            connect_timeout_s=180.0,
            quiet=True,
        ),
        [str(python.parent / "edgesplit")],
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    started = time.perf_counter()
    try:
        client = subprocess.run(client_command, capture_output=True, text=True, timeout=1800, cwd=work, env=env)
        server_output = server.communicate(timeout=120)[0]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if client.returncode != 0:
        raise SystemExit(
            f"the client failed ({client.returncode}):\n{client.stdout}\n{client.stderr}\nserver:\n{server_output}"
        )
    records = [json.loads(line) for line in client_metrics.read_text().splitlines() if line.strip()]
    summary = next(r for r in records if r["event"] == "summary")
    step_records = [r for r in records if r["event"] == "step"]
    step_seconds = [sum(r["seconds"].values()) for r in step_records]
    memory = summary["memory"]
    peak_mb = max(summary["peak_rss_mb"], memory["os_max_rss_bytes"] / MIB)
    return {
        "steps": len(step_records),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "losses": [round(r["loss"], 4) for r in step_records],
        "step_seconds_median": round(statistics.median(step_seconds), 3) if step_seconds else None,
        "peak_rss_mb": round(summary["peak_rss_mb"], 1),
        "os_max_rss_mb": round(memory["os_max_rss_bytes"] / MIB, 1),
        "baseline_rss_mb": round(memory["baseline_bytes"] / MIB, 1),
        "steady_rss_mb": round(memory["steady_bytes"] / MIB, 1),
        "phase_peak_mb": {k: round(v / MIB, 1) for k, v in memory["phase_peak_bytes"].items()},
        "client_line": client.stdout.strip().splitlines()[-1] if client.stdout.strip() else "",
        "bar_mb": PEAK_MEMORY_BAR_MB,
        "meets_bar": peak_mb < PEAK_MEMORY_BAR_MB,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/var/tmp/edgesplit-footprint"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cut-layer", type=int, default=4)
    parser.add_argument("--quantize", choices=("none", "int8"), default="int8")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="the client's ONNX Runtime threads (0: all cores)")
    parser.add_argument("--reexport", action="store_true")
    parser.add_argument("--plain", action="store_true", help="also measure a plain `pip install` of the wheel")
    parser.add_argument("--fresh-venv", action="store_true", help="rebuild the plain venv (the slim one always is)")
    args = parser.parse_args(argv)
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)

    wheel = build_wheel(work)
    python, record = build_slim_venv(work, wheel)
    environment: dict[str, Any] = {
        "recipe": f"python tools/install_edge.py {work / 'venv-slim'} {wheel.name} --replace",
        "wheel": wheel.name,
        "install_seconds": record["install_seconds"],
        **environment_footprint(python),
        "dropped": record["dropped"],
        "removed": record["removed"],
    }
    plain = None
    if args.plain:
        plain = {
            "recipe": f"python -m venv {work / 'venv'} && {work / 'venv'}/bin/pip install {wheel.name}",
            **environment_footprint(build_plain_venv(work, wheel, args.fresh_venv)),
        }
    torch_size = pytorch_size()
    artifacts = ensure_artifacts(work, args.model, args.cut_layer, args.quantize, args.reexport)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    data, data_source = write_training_data(work)
    training = train(python, artifacts, data, work, args.steps, args.threads)
    artifact_files = {p.name: round(p.stat().st_size / MB, 1) for p in sorted(artifacts.iterdir()) if p.is_file()}
    report: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "setup": {
            "model": args.model,
            "cut_layer": args.cut_layer,
            "quantize": args.quantize,
            "batch_size": manifest.get("shapes", {}).get("batch_size"),
            "max_seq_len": manifest.get("shapes", {}).get("max_seq_len"),
            "data": data_source,
            "artifact_files_mb": artifact_files,
        },
        "environment": environment,
        "training": training,
        "bars_met": environment["meets_bar"] and training["meets_bar"],
    }
    if plain is not None:
        report["environment_plain"] = plain
        report["slim_saves_mb"] = round(plain["site_packages_mb"] - environment["site_packages_mb"], 1)
    if torch_size is not None:
        report["for_scale_pytorch_here_mb"] = torch_size
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
