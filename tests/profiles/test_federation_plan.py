"""`edgesplit profile --devices`: a cut per device, and the one --cut-layers export that serves them all."""

from __future__ import annotations

import pytest

from edgesplit.profiles.cli import main
from edgesplit.profiles.recommendation import FederationPlan, Recommendation


def recommended(cut: int | None) -> Recommendation:
    return Recommendation(cut, f"because {cut}", within_tolerance=() if cut is None else (cut,))


def test_the_export_holds_each_recommended_cut_once_smallest_first() -> None:
    plan = FederationPlan(
        {
            "raspberry-pi-4": recommended(2),
            "raspberry-pi-5": recommended(4),
            "jetson-orin-nano": recommended(8),
            "x86-laptop": recommended(4),
            "tiny-board": recommended(None),
        }  # fmt: skip
    )
    assert plan.cut_layers == (2, 4, 8)
    assert plan.without_cut == ("tiny-board",)
    assert plan.export_command("smollm2-135m") == "edgesplit export --model smollm2-135m --cut-layers 2,4,8"
    written = plan.to_json("smollm2-135m")
    assert written["cut_layers"] == [2, 4, 8]
    assert written["devices"]["raspberry-pi-5"] == {
        "cut_layer": 4,
        "reason": "because 4",
        "rule": plan.by_device["raspberry-pi-5"].rule,
    }  # type: ignore[index]


def test_no_fitting_cut_anywhere_means_nothing_to_export() -> None:
    assert FederationPlan({"a": recommended(None)}).export_command("m") is None


@pytest.mark.parametrize("extra", [["--device", "raspberry-pi-5"], ["--save-profile", "x.toml"]])
def test_devices_goes_with_neither_device_nor_save_profile(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--devices", "raspberry-pi-4,jetson-orin-nano", *extra])
    assert exit_info.value.code == 2
    assert "leave out --device and --save-profile" in capsys.readouterr().err
