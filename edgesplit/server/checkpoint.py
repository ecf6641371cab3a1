"""Server checkpoints: the round, the global client adapters, and the tail's LoRA and optimiser state.

    checkpoint_dir/
      round-0003/            one directory per finished round
        global_adapters.safetensors  FedAvg of the accepted client updates below
        updates/<client>.safetensors the client adapters the round accepted (their sample counts: state.json)
        tail_lora.safetensors
        tail_optimizer.safetensors   AdamW moments, "<param index>.<exp_avg|exp_avg_sq|step>"
        state.json                   round, optimiser hyperparameters, metrics
      latest                 the name of the newest complete round directory

The adapters (global, per client, and the tail's LoRA) are keyed by adapter name,
`layers.<layer>.<module path>.lora_A|B` with the layer's index in the whole model (edgesplit/lora_names.py):
the same names as the head's graph and PEFT's keys, whatever the cut. A checkpoint from before that naming
does not fit a tail (`Tail.load_state_dict` says so) and must be started over.

Written atomically: files go into a temporary directory that is fsynced and renamed, then `latest` is
replaced by rename, so a kill at any moment leaves the previous checkpoint intact. A kill mid-write can
leave a `.round-*` scratch directory behind; `remove_partial` clears those when the server starts. Saving a
round that is already there moves the old copy aside (`.round-0003.replaced`) before the new one is renamed
in, and deletes it after: a kill between those renames leaves `latest` naming a directory that is gone for
a moment, and `load_latest` and `remove_partial` then use or restore the copy set aside. Nothing is
pickled, and nothing is written outside the checkpoint directory: client ids become file names only after
the same check the protocol makes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file


@dataclass
class Checkpoint:
    round: int  # the number of rounds finished
    global_adapters: dict[str, np.ndarray]
    tail_lora: dict[str, np.ndarray]
    tail_optimizer: dict[str, Any]  # torch.optim state_dict, tensors as numpy
    extra: dict[str, Any]
    updates: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # client_id -> adapters
    path: Path | None = None  # the round directory it was loaded from


# The protocol's client id rule (edgesplit/client/protocol.py), checked again: the id becomes a file name.
_CLIENT_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def update_path(updates_dir: Path, client_id: str) -> Path:
    """Where a client's update goes: always a file directly inside `updates_dir`, whatever the id."""
    if _CLIENT_FILE_NAME.fullmatch(client_id) is None:
        raise ValueError(f"client id {client_id!r:.80} cannot be a file name")
    path = updates_dir / f"{client_id}.safetensors"  # the suffix makes "." and ".." plain names
    if path.parent != updates_dir or path.name in (".", ".."):
        raise ValueError(f"client id {client_id!r} would leave {updates_dir}")
    return path


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], list[Any]]:
    tensors: dict[str, np.ndarray] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{index}.{key}"] = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    return tensors, state["param_groups"]


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = f"round-{checkpoint.round:04d}"
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        save_file(checkpoint.global_adapters, str(scratch / "global_adapters.safetensors"))
        save_file(checkpoint.tail_lora, str(scratch / "tail_lora.safetensors"))
        if checkpoint.updates:
            (scratch / "updates").mkdir()
            for client_id, adapters in checkpoint.updates.items():
                save_file(adapters, str(update_path(scratch / "updates", client_id)))
        optimizer_tensors, param_groups = _flatten_optimizer(checkpoint.tail_optimizer)
        save_file(optimizer_tensors, str(scratch / "tail_optimizer.safetensors"))
        state = {"round": checkpoint.round, "param_groups": param_groups, **checkpoint.extra}
        _write_synced(scratch / "state.json", json.dumps(state, indent=2).encode())
        for file in scratch.rglob("*.safetensors"):
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(scratch)
        final = directory / name
        replaced = _set_aside(final) if final.exists() else None  # the same round again
        scratch.rename(final)
        pointer = directory / ".latest.tmp"
        _write_synced(pointer, name.encode())
        pointer.replace(directory / "latest")
        _fsync_dir(directory)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return directory / name


def _set_aside(final: Path) -> Path:
    aside = final.with_name(f".{final.name}.replaced")
    if aside.exists():
        shutil.rmtree(aside)
    final.rename(aside)
    return aside


def remove_partial(directory: Path) -> list[str]:
    """Delete the scratch directories of writes that never finished (the process died mid-write), after
    putting back a round's old copy whose replacement never landed."""
    if not directory.is_dir():
        return []
    for aside in directory.glob(".round-*.replaced"):
        final = directory / aside.name[1 : -len(".replaced")]
        if not final.exists():
            aside.rename(final)
    removed = []
    for scratch in sorted(directory.glob(".round-*")):
        if scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)
            removed.append(scratch.name)
    return removed


def load_latest(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint in `directory`, or None if there is none."""
    pointer = directory / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    folder = directory / name
    aside = directory / f".{name}.replaced"
    if not folder.is_dir() and aside.is_dir():  # killed while replacing this round: the old copy is whole
        folder = aside
    return load_checkpoint(folder)


def load_checkpoint(folder: Path) -> Checkpoint:
    """One round directory (round-0003/): every round's stays, so a run's history can be checked."""
    state = json.loads((folder / "state.json").read_text())
    import torch

    flat = load_file(str(folder / "tail_optimizer.safetensors"))
    optimizer_state: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        optimizer_state.setdefault(int(index), {})[name] = torch.from_numpy(value.copy())
    extra = {k: v for k, v in state.items() if k not in ("round", "param_groups")}
    updates = {
        p.name.removesuffix(".safetensors"): load_file(str(p))
        for p in sorted((folder / "updates").glob("*.safetensors"))
    }
    return Checkpoint(
        round=int(state["round"]),
        global_adapters=load_file(str(folder / "global_adapters.safetensors")),
        tail_lora=load_file(str(folder / "tail_lora.safetensors")),
        tail_optimizer={"state": optimizer_state, "param_groups": state["param_groups"]},
        extra=extra,
        updates=updates,
        path=folder,
    )
