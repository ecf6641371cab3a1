"""Which cut layer `edgesplit profile` recommends, and a reason that says exactly why.

The rule, in one sentence (RULE): of the cuts whose client peak RSS measured here fits the memory budget, take
the lowest estimated step time; every cut within TIE_TOLERANCE (5%) of it counts as just as good, and of those
the one with the fewest layers on the device is recommended: less client compute, memory and artifact for no
difference a shared machine's timing can show. So the recommended cut is often not the fastest one, and the
reason names both.

Noise: a cut's client step is timed `repeats` times; the estimate's spread is the estimate with the fastest
and with the slowest of those steps (the server's and the link's parts are single figures). Two cuts whose
spreads overlap were not told apart by the measurement: the report names them.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesplit.errors import DataError
from edgesplit.profiles.records import CutEstimate, CutMeasurement

TIE_TOLERANCE = 0.05  # step times this close are within the noise of a shared machine's measurement
RULE = (
    "the fewest layers on the device among the cuts within {tolerance:.0%} of the lowest estimated step time, "
    "of the cuts whose measured peak RSS fits the memory budget"
)
MIB = 2**20


@dataclass(frozen=True)
class Recommendation:
    cut_layer: int | None  # None: no cut fits the budget
    reason: str
    rule: str = RULE.format(tolerance=TIE_TOLERANCE)
    best_cut_layer: int | None = None  # the lowest estimated step time among the cuts that fit
    best_step_s: float | None = None
    within_tolerance: tuple[int, ...] = ()  # the cuts that count as just as good as the best, by layer
    # Pairs of fitting cuts, one of them the recommended or the best, whose step-time spreads overlap.
    too_noisy_to_separate: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if not self.reason:
            raise DataError("a recommendation needs its reason")
        if self.cut_layer is not None and self.cut_layer not in self.within_tolerance:
            raise DataError(f"the recommended cut {self.cut_layer} must be one of {self.within_tolerance}")


def spreads_overlap(first: CutEstimate, second: CutEstimate) -> bool:
    return first.step_s_min <= second.step_s_max and second.step_s_min <= first.step_s_max


def overlapping_cuts(estimates: list[CutEstimate]) -> dict[int, tuple[int, ...]]:
    """For each cut, the other cuts whose estimated step-time spread overlaps its own."""
    return {
        e.cut_layer: tuple(o.cut_layer for o in estimates if o is not e and spreads_overlap(e, o)) for e in estimates
    }


def _name_cuts(cuts: list[int]) -> str:
    """[4] -> "cut 4", [3, 4] -> "cuts 3 and 4", [2, 3, 4] -> "cuts 2, 3 and 4"."""
    if len(cuts) == 1:
        return f"cut {cuts[0]}"
    return "cuts " + ", ".join(map(str, cuts[:-1])) + f" and {cuts[-1]}"


def _spread(e: CutEstimate) -> str:
    return f"cut {e.cut_layer} {e.step_s_min:.2f}-{e.step_s_max:.2f} s"


def recommend(
    measurements: list[CutMeasurement],
    estimates: list[CutEstimate],
    budget_mb: float,
    budget_label: str,
    tolerance: float = TIE_TOLERANCE,
) -> Recommendation:
    """The cut that RULE picks, with a reason naming the best estimate, the chosen cut and any noisy pairs."""
    rule = RULE.format(tolerance=tolerance)
    peaks = {m.cut_layer: m.client_peak_rss_bytes / MIB for m in measurements}
    fitting = [e for e in estimates if e.fits_memory]
    if not fitting:
        smallest = min(peaks, key=lambda cut: peaks[cut])
        return Recommendation(
            None,
            (
                f"no cut fits the {budget_label} of {budget_mb:.0f} MiB: the smallest measured peak RSS is "
                f"{peaks[smallest]:.0f} MiB at cut {smallest}; try --quantize int8, a smaller --batch-size "
                "or --seq-len, or a device with more memory"
            ),
            rule,
        )
    best = min(fitting, key=lambda e: (e.step_s, e.cut_layer))
    tied = sorted((e for e in fitting if e.step_s <= best.step_s * (1 + tolerance)), key=lambda e: e.cut_layer)
    chosen = tied[0]
    if chosen is best:
        reason = f"the lowest estimated step time, {best.step_s:.2f} s"
        if len(tied) > 1:
            others = [e.cut_layer for e in tied[1:]]
            reason += f" ({_name_cuts(others)} within {tolerance:.0%} of it, with more layers on the device)"
    else:
        reason = (
            f"{chosen.step_s:.2f} s, {chosen.step_s / best.step_s - 1:.1%} above the lowest estimated step time "
            f"(cut {best.cut_layer}, {best.step_s:.2f} s): of {_name_cuts([e.cut_layer for e in tied])} within "
            f"{tolerance:.0%} of it, cut {chosen.cut_layer} keeps the fewest layers on the device"
        )
    reason += (
        f"; {len(fitting)} of {len(estimates)} cuts fit the {budget_label} of {budget_mb:.0f} MiB "
        f"(cut {chosen.cut_layer} peaks at {peaks[chosen.cut_layer]:.0f} MiB, measured here); rule: {rule}"
    )
    deciding = {chosen.cut_layer, best.cut_layer}
    noisy: list[tuple[int, int]] = []
    for index, first in enumerate(fitting):
        for second in fitting[index + 1 :]:
            if spreads_overlap(first, second) and deciding & {first.cut_layer, second.cut_layer}:
                noisy.append((min(first.cut_layer, second.cut_layer), max(first.cut_layer, second.cut_layer)))
    noisy.sort()
    if noisy:
        by_cut = {e.cut_layer: e for e in fitting}
        named = sorted({cut for pair in noisy for cut in pair})
        pairs = "; ".join(_name_cuts(list(pair)) for pair in noisy)
        reason += (
            f"; too noisy to separate: {pairs} (the estimate's spread over the repeated client steps: "
            f"{', '.join(_spread(by_cut[cut]) for cut in named)} overlap; more --repeats, on an idle machine, "
            "can tell them apart)"
        )
    return Recommendation(
        chosen.cut_layer,
        reason,
        rule,
        best.cut_layer,
        best.step_s,
        tuple(e.cut_layer for e in tied),
        tuple(noisy),
    )


@dataclass(frozen=True)
class FederationPlan:
    """One cut per device of a mixed federation, and the cuts to export for all of them at once."""

    by_device: dict[str, Recommendation]  # device profile name -> its recommendation

    @property
    def cut_layers(self) -> tuple[int, ...]:
        """The distinct recommended cuts, smallest first: `edgesplit export --cut-layers` takes them."""
        return tuple(sorted({r.cut_layer for r in self.by_device.values() if r.cut_layer is not None}))

    @property
    def without_cut(self) -> tuple[str, ...]:
        """The devices no cut fits."""
        return tuple(name for name, r in self.by_device.items() if r.cut_layer is None)

    def export_command(self, model: str) -> str | None:
        """The export that serves every device its own cut; None when no device has one."""
        if not self.cut_layers:
            return None
        return f"edgesplit export --model {model} --cut-layers {','.join(map(str, self.cut_layers))}"

    def to_json(self, model: str) -> dict[str, object]:
        return {
            "model": model,
            "devices": {
                name: {"cut_layer": r.cut_layer, "reason": r.reason, "rule": r.rule}
                for name, r in self.by_device.items()
            },
            "cut_layers": list(self.cut_layers),
            "export": self.export_command(model),
            "without_cut": list(self.without_cut),
        }
