"""What a long run tells the person watching it: `edgesplit serve`'s own steps as it takes them
(`StepProgress`), training progress read from server.jsonl as the server writes it (`Progress`), and a
child's elapsed time with its log's latest line while it works (`LogTicker`:
an export, with a first-use download's progress); and, before `edgesplit compare` starts, a rough estimate
of how long it will take."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class StepProgress:
    """`edgesplit serve`'s training steps as the tail takes them, so that a round of minutes is not minutes of
    silence. On a terminal, a live bar for the round (steps against min-clients x steps-per-round, the rate,
    each client's latest loss); elsewhere (a pipe, a service's journal) a line at a round's first step and then
    one every `quiet_s` seconds."""

    def __init__(
        self,
        rounds: int,
        steps_per_round: int,
        min_clients: int,
        first_round: int = 0,
        say: Callable[[str], None] | None = None,
        quiet_s: float = 15.0,
    ) -> None:
        from tqdm import tqdm

        self.rounds = rounds
        self.expected = steps_per_round * min_clients
        self.say = say or _print_now
        self.quiet_s = quiet_s
        self.round = first_round
        self.steps = 0
        self.losses: dict[str, float] = {}
        self.started = self.last_said = time.monotonic()
        # disable=None: tqdm draws only on a terminal; a pipe would collect its redraws as garbage.
        self.bar = tqdm(total=self.expected, desc=self._label(), unit="step", disable=None, leave=False)

    def _label(self) -> str:
        return f"[server] round {self.round + 1}/{self.rounds}"

    def _losses(self) -> str:
        return ", ".join(f"{client} {loss:.3f}" for client, loss in sorted(self.losses.items())[:8])

    def step(self, round_index: int, client_id: str, loss: float) -> None:
        if round_index != self.round:
            self.round_closed(round_index)
        self.steps += 1
        self.losses[client_id] = loss
        if not self.bar.disable:
            self.bar.update(1)
            self.bar.set_postfix_str(f"loss {self._losses()}", refresh=False)
            return
        now = time.monotonic()
        if self.steps == 1 or now - self.last_said >= self.quiet_s:
            self.say(
                f"{self._label()}: {self.steps} of about {self.expected} steps, {now - self.started:.0f} s; "
                f"loss {self._losses()}"
            )
            self.last_said = now

    def round_closed(self, next_round: int) -> None:
        self.round, self.steps, self.losses = next_round, 0, {}
        self.started = self.last_said = time.monotonic()
        self.bar.reset(total=self.expected)
        self.bar.set_description_str(self._label(), refresh=False)

    def close(self) -> None:
        self.bar.close()


def _print_now(line: str) -> None:
    print(line, flush=True)


class Progress:
    """Follows server.jsonl as the server writes it, and says what happened since the last look: each round
    as it closes, and every 15 s without one, the steps taken so far."""

    def __init__(self, path: Path, rounds: int, total_steps: int, say: Callable[[str], None]) -> None:
        self.path = path
        self.rounds = rounds
        self.total_steps = total_steps
        self.say = say
        self.offset = 0
        self.steps = 0
        self.rounds_closed = 0
        self.last_said = time.monotonic()
        self.started = time.monotonic()

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        for line in complete.splitlines():
            record = json.loads(line)
            if record["event"] == "step":
                self.steps += 1
            elif record["event"] == "round":
                self.rounds_closed += 1
                losses = {c: m.get("mean_loss") for c, m in record.get("client_metrics", {}).items()}
                train = ", ".join(f"{c} {v:.3f}" for c, v in sorted(losses.items()) if v is not None)
                eval_loss = record.get("eval_loss")
                eval_text = "" if eval_loss is None else f"eval loss {eval_loss:.4f}; "
                self.say(
                    f"round {record['round'] + 1}/{self.rounds} closed after "
                    f"{record['seconds']:.0f} s: {eval_text}train loss {train}"
                )
                self.last_said = time.monotonic()
        if time.monotonic() - self.last_said > 15:
            elapsed = time.monotonic() - self.started
            if self.steps:
                self.say(f"training: {self.steps}/{self.total_steps} steps, {elapsed:.0f} s")
            else:  # FedLLM and KD clients train locally: the server sees their rounds, not their steps
                self.say(f"training: round {min(self.rounds_closed + 1, self.rounds)}/{self.rounds}, {elapsed:.0f} s")
            self.last_said = time.monotonic()


def latest_log_line(log: Path, tail_bytes: int = 4096) -> str:
    """The last non-empty line of `log`, a progress bar's carriage-return updates counting as lines: the
    current state of a download that a child reports with one."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(log.stat().st_size - tail_bytes, 0))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    parts = [part.strip() for part in text.replace("\r", "\n").split("\n")]
    return next((part for part in reversed(parts) if part), "")


class LogTicker:
    """Shows that a long child is alive: elapsed time and its log's latest line (a download's progress,
    say). On a terminal a live status bar; elsewhere (a pipe, a test) one line every `quiet_s` seconds,
    through `say`, which adds the command's own prefix; the bar, drawn by tqdm, starts with `bar_prefix`."""

    def __init__(
        self, label: str, log: Path, say: Callable[[str], None], quiet_s: float = 30.0, bar_prefix: str = ""
    ) -> None:
        from tqdm import tqdm

        self.label = label
        self.log = log
        self.say = say
        self.quiet_s = quiet_s
        self.started = time.monotonic()
        self.last_said = self.started
        # disable=None: tqdm draws only on a terminal; a pipe would collect its redraws as garbage.
        self.bar = tqdm(desc=bar_prefix + label, bar_format="{desc}: {elapsed} {postfix}", disable=None, leave=False)

    def __call__(self) -> None:
        latest = latest_log_line(self.log)[:70]
        if not self.bar.disable:
            self.bar.set_postfix_str(latest, refresh=True)
            return
        if time.monotonic() - self.last_said >= self.quiet_s:
            self.say(f"{self.label}: {time.monotonic() - self.started:.0f} s so far; {latest}")
            self.last_said = time.monotonic()

    def close(self) -> float:
        """Remove the status bar; the seconds it ran."""
        self.bar.close()
        return time.monotonic() - self.started


# Rough costs, measured with the default model (SmolLM2-135M) on a busy 2-core machine: what an estimate
# before a run can go by. Other models and machines differ; the estimate says so when it is printed.
EXPORT_SECONDS = {False: 60.0, True: 480.0}  # split at a cut, whole model
STEP_SECONDS_AT_64_TOKENS = {"split": 2.0, "fedllm": 3.0, "kd": 3.0}  # one client step, batch 4
# Scoring goes through the run's PEFT adapter with a KV cache (scoring.py): about 0.5-0.7 s an input on this
# machine, after loading the base model once per framework (26-42 s for the default GGUF; bench/generate.py).
SCORE_SECONDS_PER_INPUT = 0.7
SCORE_LOAD_SECONDS = 30.0


def rough_compare_seconds(config: Any, exports_to_make: Iterable[bool]) -> float:
    """`edgesplit compare`'s wall time for `config` (a CompareConfig), making the exports listed (True: the
    whole model): exports, every framework's steps, and scoring, by the rough costs above."""
    seconds = sum(EXPORT_SECONDS[full] for full in exports_to_make)
    token_share = (config.batch_size * config.max_seq_len) / (4 * 64)
    steps = config.clients * config.rounds * config.steps_per_round
    for framework in config.frameworks:
        # The split clients queue at one shared tail; the others train side by side on their own cores.
        parallel = 1 if framework == "split" else min(config.clients, 2)
        step = STEP_SECONDS_AT_64_TOKENS.get(framework, 3.0) * token_share
        seconds += step * steps / parallel
        if framework == "kd":  # each round, each client: top-k on the proxy (forward), then a distillation epoch
            proxy_batches = math.ceil(config.proxy_examples / config.batch_size)
            seconds += 1.5 * step * proxy_batches * config.rounds * config.clients / parallel
        seconds += SCORE_LOAD_SECONDS + SCORE_SECONDS_PER_INPUT * config.eval_examples
    return float(seconds)
