"""`edgesplit demo`'s options: the DemoConfig record, checked when built, and the parser whose flags are named
after its fields; and the demo's one way of printing a line. Nothing here starts a process or loads a model."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from edgesplit.export.models import DEFAULT_MODEL  # the module imports torch only when it loads a model
from edgesplit.server.orchestrate import RunError


class DemoError(RunError):
    """The demo's options do not fit together, or a stage of it failed; the message says which."""


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    model: str = DEFAULT_MODEL
    clients: int = 3
    rounds: int = 3
    steps_per_round: int = 4
    cut_layer: int = 4
    top_layers: int | None = None  # a U-shaped split: the last K layers and the loss on the clients too
    quantize: str = "none"
    # None: sized for the data. A short task needs a short window: 16 tokens holds the longest shape-codes
    # example (14 tokens with EOS), and a training step costs about 8x less than at the exporter's 128. With
    # --data, the window that holds 95% of the examples whole, up to max_seq_len_cap.
    max_seq_len: int | None = None
    max_seq_len_cap: int = 256
    batch_size: int = 4
    # True: a head for every length, each batch computed at its longest example's length, not the window's.
    # None: so with --data, whose examples' lengths vary, unless the split is U-shaped (fixed shapes). The
    # generated task's examples fill 14 of its 16 tokens: there a dynamic head's fp32 step took 1.12x the
    # fixed head's CPU time, its export 1.5x as long, for 30% less peak memory (docs/demo.md), so it keeps
    # the fixed head.
    dynamic_seq: bool | None = None
    # Each client's batches drawn from examples of like length: with a dynamic head, less padding computed.
    group_by_length: bool = True
    lora_rank: int = 8
    learning_rate: float = 3e-3
    task: str = "shape-codes"
    train_examples: int = 240
    eval_examples: int | None = None  # None: 24 of the generated task, or every line of --eval-data
    data: Path | None = None
    eval_data: Path | None = None
    alpha: float = 0.5
    iid: bool = False
    seed: int = 0
    threads: int = 1
    reexport: bool = False

    def __post_init__(self) -> None:
        if self.clients < 1 or self.rounds < 1 or self.steps_per_round < 1:
            raise DemoError("--clients, --rounds and --steps-per-round must be at least 1")
        if (self.data is None) != (self.eval_data is None):
            raise DemoError(
                "--data and --eval-data go together: the demo scores on --eval-data after training on --data"
            )
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise DemoError(f"--alpha must be a number > 0, got {self.alpha}")
        if self.train_examples < self.clients or (self.eval_examples is not None and self.eval_examples < 1):
            raise DemoError("--train-examples must be at least --clients, and --eval-examples at least 1")
        if (self.max_seq_len is not None and self.max_seq_len < 2) or self.max_seq_len_cap < 2:
            raise DemoError("--max-seq-len and --max-seq-len-cap must be at least 2 (a context and a target)")
        if self.dynamic_seq and self.top_layers is not None:
            raise DemoError(
                "--dynamic-seq and --top-layers do not go together: a U-shaped split's graphs have fixed shapes "
                "(leave --dynamic-seq out, the demo then exports fixed-length graphs)"
            )

    @property
    def head_dynamic_seq(self) -> bool:
        """Whether the head is exported for every length (by default with --data, unless U-shaped)."""
        if self.dynamic_seq is None:
            return self.data is not None and self.top_layers is None
        return self.dynamic_seq

    @property
    def clients_group_by_length(self) -> bool:
        """Whether the clients group their batches by length: only worth it with a head for every length."""
        return self.group_by_length and self.head_dynamic_seq

    @property
    def window(self) -> int:
        """The sequence length of the export; run_demo sizes it (size_window) before anything needs it."""
        if self.max_seq_len is None:
            raise DemoError("the window is not sized yet: size_window sizes it from the data first")
        return self.max_seq_len


GENERATED_EVAL_EXAMPLES = 24  # held-out combinations of the generated task, unless --eval-examples says
GENERATED_TASK_WINDOW = 16  # see DemoConfig.max_seq_len

DESCRIPTION = """\
`edgesplit demo`: the whole system on this machine, end to end, with real processes on loopback.

    export the model (or reuse OUT/artifacts) ──> generate the task (or read --data), split it across the clients
        ──> score the untrained model on held-out prompts
        ──> `edgesplit serve` + N x `edgesplit client` train for --rounds rounds
        ──> write the result as a PEFT adapter (OUT/adapter), score again with it
        ──> OUT/report.md, plots, summary.json

Ctrl-C stops the demo and every process it started.
"""


def build_parser() -> argparse.ArgumentParser:
    from edgesplit.server.tasks import TASKS

    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="edgesplit demo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=d.clients, help="edge client processes (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds (default %(default)s)")
    parser.add_argument(
        "--steps-per-round",
        type=int,
        default=d.steps_per_round,
        help="training steps each client takes per round (default %(default)s)",
    )
    parser.add_argument("--cut-layer", type=int, default=d.cut_layer, help="layers [0, cut) run on the clients")
    parser.add_argument(
        "--top-layers",
        type=int,
        default=d.top_layers,
        help="a U-shaped split: the clients also run the last K layers, the LM head and the loss (labels stay)",
    )
    parser.add_argument("--quantize", choices=("none", "int8"), default=d.quantize, help="the head's frozen weights")
    parser.add_argument("--out", type=Path, default=d.out, help="run directory (default %(default)s)")
    parser.add_argument(
        "--model",
        default=d.model,
        help=f"hub id, local model directory, .gguf file, or {DEFAULT_MODEL!r} (default)",
    )
    parser.add_argument(
        "--task",
        choices=sorted(TASKS),
        default=d.task,
        help="the generated task (default %(default)s; shape-codes-w is for the tests' tiny models)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="your own training JSONL instead of the generated task "
        '(a "group" key on every line enables the non-IID split)',
    )
    parser.add_argument("--eval-data", type=Path, help="held-out prompt/completion JSONL, with --data")
    parser.add_argument(
        "--alpha",
        type=float,
        default=d.alpha,
        help="Dirichlet concentration of the non-IID split: small = skewed (default %(default)s)",
    )
    parser.add_argument("--iid", action="store_true", help="split the data uniformly at random instead")
    parser.add_argument(
        "--train-examples",
        type=int,
        default=d.train_examples,
        help="examples of the generated task (default %(default)s; not used with --data)",
    )
    parser.add_argument(
        "--eval-examples",
        type=int,
        default=d.eval_examples,
        help="held-out inputs scored: the first N (default: 24 of the generated task, every input of --eval-data)",
    )
    parser.add_argument("--learning-rate", type=float, default=d.learning_rate, help="tail and clients (AdamW)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="the export's batch size")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=d.max_seq_len,
        help="the export's sequence length (default: 16 for the generated task; with --data, the length that "
        "holds 95%% of the examples whole, rounded up to a multiple of 16)",
    )
    parser.add_argument(
        "--max-seq-len-cap",
        type=int,
        default=d.max_seq_len_cap,
        help="the longest window sized from --data (default %(default)s): a longer one is refused, naming it",
    )
    parser.add_argument(
        "--dynamic-seq",
        action=argparse.BooleanOptionalAction,
        default=d.dynamic_seq,
        help="export one head for every length up to the window, so that each batch is computed at its longest "
        "example's length (default: with --data, unless --top-layers); --no-dynamic-seq: fixed-length graphs",
    )
    parser.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=d.group_by_length,
        help="each client batches examples of like length, so that little padding is computed (default: yes, "
        "with a head for every length)",
    )
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=d.seed, help="the task, the split and the initialisation (default %(default)s)"
    )
    # One by default: on a small machine shared by the server, N clients and the demo itself, a second
    # PyTorch thread mostly waits at barriers for a core (measured: 5x slower generation on a busy
    # 2-core machine).
    parser.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="PyTorch threads of the server and of the demo's scoring (default %(default)s)",
    )
    parser.add_argument("--reexport", action="store_true", help="export again even if OUT/artifacts matches")
    return parser


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)
