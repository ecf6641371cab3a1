"""`edgesplit profile` refuses an unknown --model, or cut layers past the model's depth, before the benchmark
and before any export process loads the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import edgesplit.profiles.splitpoint
import edgesplit.profiles.worker
from edgesplit.errors import ExportError
from edgesplit.profiles import cli


@pytest.fixture(autouse=True)
def nothing_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal that came after the benchmark or the sweep would fail here instead of with its message."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the refusal came too late: the benchmark or the sweep started")

    monkeypatch.setattr(edgesplit.profiles.worker, "cpu_benchmark", must_not_run)
    monkeypatch.setattr(edgesplit.profiles.splitpoint, "sweep", must_not_run)


def test_a_mistyped_model_is_refused_with_the_closest_alias() -> None:
    with pytest.raises(ExportError, match="unknown model 'smollm2-13m'.*did you mean 'smollm2-135m'"):
        cli.main(["--model", "smollm2-13m", "--device", "raspberry-pi-5"])


def test_cut_layers_past_the_default_models_depth_are_refused() -> None:
    with pytest.raises(ExportError, match="--cut-layers 40 is out of range: this model has 30 layers"):
        cli.main(["--cut-layers", "1-3,40", "--device", "raspberry-pi-5"])


def test_cut_layers_past_a_directorys_depth_are_refused_from_its_config(tmp_path: Path) -> None:
    model = tmp_path / "four-layers"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 4}))
    (model / "model.safetensors").write_bytes(b"unreadable")
    with pytest.raises(ExportError, match="--cut-layers 4 is out of range: this model has 4 layers"):
        cli.main(["--model", str(model), "--cut-layers", "2-4", "--device", "raspberry-pi-5"])


def test_every_option_has_help() -> None:
    for action in cli.build_parser()._actions:
        assert action.help, f"{action.option_strings} has no help text"
