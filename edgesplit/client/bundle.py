"""`edgesplit bundle`: the files a device needs out of an export, and nothing of the server's.

    edgesplit bundle --artifacts artifacts/ --out device/ [--cut-layer N]

An export holds the device's files (the head graphs with their weight files, the initial adapters, the
tokenizer, the manifest) and the server's (`tail/`, most of the bytes: 481 of 710 MB for SmolLM2 at cut 4).
The bundle is every file the manifest lists outside the server's stages, each checked against its sha256 as
it is copied, and the manifest itself, unchanged: the client checks only the files it opens, so it trains
from the bundle as from the whole export. For a mixed-cut export (`--cut-layers`) `--cut-layer` picks the
cut, whose directory already is that device's artifact.

Nothing here imports torch: the bundle can be made on the device's side too.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from edgesplit.client.artifacts import MANIFEST_NAME, SERVER, device_artifacts, load_manifest, sha256_file
from edgesplit.errors import ArtifactError


def device_files(root: Path) -> list[str]:
    """The manifest's files a device opens: all but those of the stages that run on the server."""
    manifest = load_manifest(root, verify=False)
    server = {name for stage in manifest.stages if stage.runs_on == SERVER for name in stage.files}
    return sorted(name for name in manifest.files if name not in server and not name.startswith("tail/"))


def make_bundle(artifacts: Path, out: Path, cut_layer: int | None = None) -> tuple[int, int]:
    """Copy the device's files of `artifacts` (at `cut_layer` for a mixed-cut export) into `out`, which must
    not exist. Returns (files, bytes) copied. ArtifactError, before anything is written, for artifacts that
    are not an export or a cut they do not hold; a file that does not match its sha256 removes the partial
    bundle and names the file."""
    root = device_artifacts(artifacts, cut_layer)
    names = device_files(root)
    manifest = load_manifest(root, verify=False)
    if out.exists():
        raise ArtifactError(f"{out} already exists: choose a new --out, or remove it first")
    copied = 0
    out.mkdir(parents=True)
    try:
        for name in names:
            source, target = root / name, out / name
            if not source.is_file():
                raise ArtifactError(f"{source} is listed in the manifest but missing: export again")
            if sha256_file(source) != manifest.files[name]:
                raise ArtifactError(f"{source} does not match its manifest: the export is damaged, export again")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied += target.stat().st_size
        shutil.copy2(root / MANIFEST_NAME, out / MANIFEST_NAME)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return len(names) + 1, copied + (out / MANIFEST_NAME).stat().st_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgesplit bundle",
        description="Copy the files a device needs out of an export (no server files) into a new directory.",
    )
    parser.add_argument("--artifacts", type=Path, required=True, help="the export's directory")
    parser.add_argument("--out", type=Path, required=True, help="the new directory to copy to the device")
    parser.add_argument("--cut-layer", type=int, help="for a --cut-layers export: the cut this device runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files, size = make_bundle(args.artifacts, args.out, args.cut_layer)
    whole = sum(path.stat().st_size for path in args.artifacts.rglob("*") if path.is_file())
    print(
        f"[bundle] {args.out}: {files} files, {size / 1e6:.1f} MB of the export's {whole / 1e6:.1f} MB; copy it to "
        f"the device and run `edgesplit client --artifacts {args.out.name}/ ...` there"
    )
    return 0
