"""A checkpoint write that fails or is killed half-way leaves the previous checkpoint whole and loadable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import edgesplit.server.checkpoint as checkpoint_module
from edgesplit.server.checkpoint import Checkpoint, load_latest, remove_partial, save_checkpoint


def make_checkpoint(round_index: int, size: int = 16) -> Checkpoint:
    """Every tensor holds the round number, so a checkpoint mixing two writes would show it."""
    tensors = {"w": np.full((size, size), round_index, np.float32)}
    optimizer: dict[str, Any] = {
        "state": {0: {"step": np.array(float(round_index))}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    return Checkpoint(round_index, tensors, tensors, optimizer, {"num_samples": {"c": round_index}}, {"c": tensors})


def assert_whole(checkpoint: Checkpoint | None, round_index: int) -> None:
    assert checkpoint is not None and checkpoint.round == round_index
    tensors = [checkpoint.global_adapters["w"], checkpoint.tail_lora["w"], checkpoint.updates["c"]["w"]]
    assert all(np.all(tensor == round_index) for tensor in tensors)
    assert float(checkpoint.tail_optimizer["state"][0]["step"]) == round_index
    assert checkpoint.extra["num_samples"] == {"c": round_index}


def test_a_failure_mid_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, make_checkpoint(1))
    real_save_file = checkpoint_module.save_file
    calls = []

    def failing_save_file(tensors: Any, path: str) -> None:
        calls.append(path)
        if len(calls) == 3:  # the disk fills up, or the process is interrupted, half-way through the files
            raise OSError(28, "No space left on device")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", failing_save_file)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, make_checkpoint(2))
    assert_whole(load_latest(tmp_path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "round-0001"]  # no half-written directory


def test_a_failure_before_latest_moves_keeps_the_previous_and_a_retry_succeeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, make_checkpoint(1))
    real_write = checkpoint_module._write_synced

    def failing_write(path: Path, data: bytes) -> None:
        if path.name == ".latest.tmp":
            raise OSError(5, "Input/output error")
        real_write(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_synced", failing_write)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, make_checkpoint(2))
    assert_whole(load_latest(tmp_path), 1)  # round-0002/ may be complete, but `latest` still names round 1
    monkeypatch.setattr(checkpoint_module, "_write_synced", real_write)
    save_checkpoint(tmp_path, make_checkpoint(2))
    assert_whole(load_latest(tmp_path), 2)


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[3])
    from test_checkpoint_atomic import make_checkpoint
    from edgesplit.server.checkpoint import save_checkpoint
    directory, first = Path(sys.argv[1]), int(sys.argv[2])
    for round_index in range(first, first + 1000):
        save_checkpoint(directory, make_checkpoint(round_index, size=512))  # 1 MB tensors: writes take time
        print("saved", round_index, flush=True)
""")


def test_a_kill_during_writes_leaves_a_whole_checkpoint(tmp_path: Path) -> None:
    """SIGKILL a process that writes checkpoints back to back, right after one finished (so, most likely,
    during the next); then again from where it stood. Each time the latest checkpoint is whole."""
    directory = tmp_path / "ckpt"
    first = 1
    for _ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(directory), str(first), str(Path(__file__).parent)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None
            lines = [writer.stdout.readline() for _ in range(2)]
            writer.kill()
            writer.wait(30)
            lines += writer.stdout.read().splitlines()  # it may have finished more writes before it died
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(30)
        saved = max(int(line.split()[1]) for line in lines)
        latest = load_latest(directory)
        # The last write it reported, or the one after, which may have landed before its line was printed.
        assert latest is not None and latest.round in (saved, saved + 1)
        assert_whole(latest, latest.round)
        remove_partial(directory)  # what the server does when it starts
        assert not list(directory.glob(".round-*"))
        first = latest.round + 1


def same_round(round_index: int, value: int) -> Checkpoint:
    checkpoint = make_checkpoint(value)
    checkpoint.round = round_index
    return checkpoint


def test_saving_a_round_again_replaces_it_and_a_kill_between_the_renames_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, same_round(1, 5))
    save_checkpoint(tmp_path, same_round(1, 6))  # the same round again: the new copy wins, nothing is left over
    assert float(load_latest(tmp_path).global_adapters["w"][0, 0]) == 6  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "round-0001"]

    real_rename = Path.rename

    def killed_after_moving_the_old_copy_aside(self: Path, target: Any) -> Any:
        if self.name.startswith(".round-0001.") and not self.name.endswith(".replaced"):
            raise KeyboardInterrupt  # the scratch directory would be renamed into place now
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_moving_the_old_copy_aside)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, same_round(1, 7))
    monkeypatch.setattr(Path, "rename", real_rename)
    assert not (tmp_path / "round-0001").exists()  # `latest` names a directory that is gone for the moment
    survivor = load_latest(tmp_path)
    assert survivor is not None and float(survivor.global_adapters["w"][0, 0]) == 6
    remove_partial(tmp_path)  # what the server does when it starts: the old copy goes back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "round-0001"]
    assert float(load_latest(tmp_path).global_adapters["w"][0, 0]) == 6  # type: ignore[union-attr]
