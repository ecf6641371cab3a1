"""bench/inversion.py's smoke run: a real process on the tiny model, its JSON complete and its attacks sound."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_tiny_run_prints_a_recovery_rate_for_every_cut_noise_level_and_attack(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "inversion.py"), "--tiny", "--no-training", "--work-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # stdout is the JSON alone: the loaders' progress went to stderr
    assert report["machine"]["cores"] and report["noise_levels"] == [0.0, 0.1, 0.3, 1.0]
    assert report["sizes"]["private_tokens"] > 0 and 0 < report["sizes"]["candidate_coverage"] <= 1
    for attack in ("nearest_neighbour", "linear_decoder"):
        table = report["recovery"][attack]
        assert sorted(table) == ["1", "2", "3", "4"]
        for cut in table.values():
            assert sorted(cut) == ["0", "0.1", "0.3", "1"]
            assert all(0 <= rate[kind] <= 1 for rate in cut.values() for kind in ("all_tokens", "prompt_tokens"))
        # The attack works without noise (far above chance among 96 words), and noise as large as the signal
        # takes some of it away.
        assert table["1"]["0"]["all_tokens"] > 0.5
        assert table["1"]["1"]["all_tokens"] < table["1"]["0"]["all_tokens"]
