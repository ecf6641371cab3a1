"""What `edgesplit serve` prints: per-step progress, no third-party FutureWarning at start, a rounded final loss,
and clear refusals of numbers it cannot use."""

from __future__ import annotations

import warnings

import pytest

from edgesplit.server.cli import finished_line, main
from edgesplit.server.progress import StepProgress


def test_steps_are_said_at_a_rounds_first_step_and_then_every_quiet_period() -> None:
    said: list[str] = []
    progress = StepProgress(rounds=3, steps_per_round=10, min_clients=2, say=said.append, quiet_s=3600)
    assert progress.bar.disable  # not a terminal under pytest: lines, not a bar
    progress.step(0, "a", 4.51234)
    progress.step(0, "b", 4.2)
    assert said == ["[server] round 1/3: 1 of about 20 steps, 0 s; loss a 4.512"]
    progress.quiet_s = 0
    progress.step(0, "a", 4.4)
    assert said[-1].startswith("[server] round 1/3: 3 of about 20 steps") and said[-1].endswith("loss a 4.400, b 4.200")
    progress.quiet_s = 3600
    progress.step(1, "b", 3.9)  # the next round's first step: said at once, counted afresh
    assert said[-1].startswith("[server] round 2/3: 1 of about 20 steps") and said[-1].endswith("loss b 3.900")
    progress.close()


def test_the_final_eval_loss_is_rounded() -> None:
    assert finished_line(3, 2.718281828459045) == "[server] finished 3 rounds; final eval loss 2.7183"
    assert finished_line(3, None).endswith("final eval loss n/a")


def test_loading_the_tail_raises_no_future_warning(tiny_artifacts) -> None:  # type: ignore[no-untyped-def]
    from edgesplit.server.tail import OptimizerSettings, Tail

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Tail(tiny_artifacts("llama", 1), OptimizerSettings(learning_rate=1e-3), seed=0, threads=1)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--learning-rate", "1e999"], "--learning-rate and --weight-decay must be finite numbers"),
        (["--aggregation", "median", "--framework", "kd"], "--aggregation applies to the split and fedllm"),
        (["--aggregation", "trimmed-mean", "--trim-fraction", "0.5"], "--trim-fraction must be at least 0"),
        (["--aggregation", "clipped", "--clip-norm", "1e999"], "--clip-norm must be a positive number"),
        (["--send-timeout", "0"], "--send-timeout"),
    ],
)
def test_numbers_serve_cannot_use_are_refused_at_once(
    tmp_path, capsys: pytest.CaptureFixture[str], flags: list[str], said: str
) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as stopped:
        main(["--artifacts", str(tmp_path), *flags])
    assert stopped.value.code == 2
    assert said in capsys.readouterr().err
