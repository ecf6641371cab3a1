"""Every federated framework the server runs, as a Strategy (base.py), and the one registry of their names.

    split   the device runs the head, the server the tail; FedAvg of the head adapters   (split.py)
    fedllm  the device trains the whole model; FedAvg of its adapters                     (fedllm.py)
    kd      the device trains the whole model; averaged top-k logits, distilled           (kd.py)

Adding a framework is adding a module with one strategy and one line in STRATEGIES; nothing else on the
server names frameworks.
"""

from __future__ import annotations

from edgesplit.server.strategies.base import (
    Arrays,
    StepOutcome,
    Strategy,
    StrategyFactory,
    StrategyOptions,
    TailState,
    Updates,
    encode_file,
    load_global_adapters,
)
from edgesplit.server.strategies.fedllm import FedLlmStrategy
from edgesplit.server.strategies.kd import KdSettings, KdStrategy
from edgesplit.server.strategies.split import SplitStrategy, adapters_below

STRATEGIES: dict[str, StrategyFactory] = {
    SplitStrategy.name: SplitStrategy,
    FedLlmStrategy.name: FedLlmStrategy.from_options,
    KdStrategy.name: KdStrategy.from_options,
}
FRAMEWORKS: tuple[str, ...] = tuple(STRATEGIES)  # for flags and for compare.py


def build_strategy(framework: str, options: StrategyOptions) -> Strategy:
    factory = STRATEGIES.get(framework)
    if factory is None:
        raise ValueError(f"--framework must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    return factory(options)


__all__ = [
    "FRAMEWORKS",
    "STRATEGIES",
    "Arrays",
    "FedLlmStrategy",
    "KdSettings",
    "KdStrategy",
    "SplitStrategy",
    "StepOutcome",
    "Strategy",
    "StrategyFactory",
    "StrategyOptions",
    "TailState",
    "Updates",
    "adapters_below",
    "build_strategy",
    "encode_file",
    "load_global_adapters",
]
