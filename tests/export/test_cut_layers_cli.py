"""`edgesplit export --cut-layers`: refused before any model loads when the cuts cannot be exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesplit.errors import ExportError
from edgesplit.export import cli


@pytest.fixture
def four_layer_dir(tmp_path: Path) -> Path:
    """A config that says 4 layers and weights that cannot be read: a refusal after loading would differ."""
    directory = tmp_path / "four-layers"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    (directory / "model.safetensors").write_bytes(b"not weights at all")
    return directory


def test_cut_layers_past_the_depth_are_refused_naming_the_flag(four_layer_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"--cut-layers 4 is out of range: this model has 4 layers"):
        cli.main(["--model", str(four_layer_dir), "--cut-layers", "1,2,4", "--out", str(tmp_path / "out")])
    with pytest.raises(ExportError, match=r"--cut-layers 0 is out of range"):
        cli.main(["--model", str(four_layer_dir), "--cut-layers", "0,2", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cut-layer", "2", "--cut-layers", "2,3"], "not both"),
        (["--full-model", "--cut-layers", "2,3"], "exclude each other"),
        (["--cut-layers", "2,x"], "comma-separated integers"),
    ],
)
def test_conflicting_or_malformed_cuts_are_usage_errors(
    flags: list[str], message: str, four_layer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", str(four_layer_dir), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
