"""edgesplit's own commands as child processes: typed records that render their command lines, and the
handling of the processes that run them.

    ExportCommand / ServeCommand / ClientCommand ── argv() ──> ["serve", "--artifacts", ...]
        ── Children.start(name, command, log) ──> `python -m edgesplit.cli ...` in its own process group
        ── wait_for_port (the server's log) ── follow (every child to its end, or the failure's log tail)
        ── Children.stop_all: SIGINT to each group, a grace period, then SIGKILL

The demo, compare, the bench scripts and the tests' loopback helpers all render their command lines here, so
that a flag renamed in one command's parser is renamed in one place, and a test parses every rendering with
the real parser of its command. A field left at None is not rendered: the command's own default applies.
`extra` holds flags a record does not model; it is rendered last, so that a test may also override one of
the record's own on purpose (argparse takes a flag's last occurrence). Shell scripts render the records too:
`python -m edgesplit.server.orchestrate serve artifacts=DIR port=0 ...` prints the argv one argument a line
(tools/arm64_emulated_run.sh).

Children run in their own process groups: a Ctrl-C at the terminal reaches only the parent, which then stops
every child in order, grandchildren included, so that nothing is left running and the exporter can clean up
its half-written directory.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from types import FrameType
from typing import IO

from edgesplit.client.tensors import Wire
from edgesplit.errors import EdgesplitError

# This interpreter's edgesplit: the same environment (torch and all) as the parent's.
EDGESPLIT: tuple[str, ...] = (sys.executable, "-m", "edgesplit.cli")

QUANTIZE_CHOICES = ("none", "int8")
WIRE_CHOICES = tuple(wire.value for wire in Wire)
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")  # the protocol's rule: ids end up in file names and logs
_FRAMEWORK = re.compile(r"[a-z][a-z0-9_-]*")


class RunError(EdgesplitError):
    """A command record is invalid, or a child process failed; the message says which and where its log is."""


# ---------------------------------------------------------------------------------------------- commands


FlagValue = str | int | float | bool | Path | None


def _render(flags: Sequence[tuple[str, FlagValue]]) -> list[str]:
    """`--flag value` for each set value; True renders the bare flag, False and None nothing."""
    argv: list[str] = []
    for flag, value in flags:
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def _at_least(command: str, minimum: int, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < minimum:
            raise RunError(f"{command}: {name} must be at least {minimum}, got {value}")


def _positive_number(command: str, **values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise RunError(f"{command}: {name} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class ExportCommand:
    """`edgesplit export`: cut `model` at `cut_layer` (or the whole model) into the artifact directory `out`."""

    out: Path
    model: str
    cut_layer: int | None = None
    top_layers: int | None = None  # a U-shaped export
    full_model: bool = False
    quantize: str | None = None
    batch_size: int | None = None
    max_seq_len: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    seed: int | None = None
    dynamic_seq: bool = False  # one head for every length: each batch computed at its longest row's length
    force: bool = False
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.model:
            raise RunError("export: model is empty")
        if self.cut_layer is None and not self.full_model:
            raise RunError("export: needs a cut_layer, or full_model")
        _at_least("export", 1, cut_layer=self.cut_layer, batch_size=self.batch_size, max_seq_len=self.max_seq_len)
        _at_least("export", 1, lora_rank=self.lora_rank)
        _at_least("export", 0, seed=self.seed, top_layers=self.top_layers)
        _positive_number("export", lora_alpha=self.lora_alpha)
        if self.quantize is not None and self.quantize not in QUANTIZE_CHOICES:
            raise RunError(f"export: quantize is one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.dynamic_seq and self.top_layers is not None:
            raise RunError("export: dynamic_seq and top_layers do not go together (a U-shaped export has fixed shapes)")

    def _flags(self) -> list[str]:
        return _render(
            [
                ("--model", self.model),
                ("--cut-layer", self.cut_layer),
                ("--top-layers", self.top_layers),
                ("--full-model", self.full_model),
                ("--out", self.out),
                ("--quantize", self.quantize),
                ("--batch-size", self.batch_size),
                ("--max-seq-len", self.max_seq_len),
                ("--lora-rank", self.lora_rank),
                ("--lora-alpha", self.lora_alpha),
                ("--seed", self.seed),
                ("--dynamic-seq", self.dynamic_seq),
                ("--force", self.force),
            ]
        )

    def argv(self) -> list[str]:
        """The arguments of `edgesplit`, the subcommand first."""
        return ["export", *self._flags(), *self.extra]


@dataclass(frozen=True)
class ServeCommand:
    """`edgesplit serve` of `artifacts` on `port` (0: the OS picks one; `wait_for_port` reads it back)."""

    artifacts: Path
    port: int
    rounds: int
    steps_per_round: int
    min_clients: int
    host: str | None = None
    learning_rate: float | None = None
    wire: str | None = None
    eval_data: Path | None = None
    eval_batches: int | None = None
    checkpoint_dir: Path | None = None
    metrics_out: Path | None = None
    round_deadline_s: float | None = None
    seed: int | None = None
    threads: int | None = None
    framework: str | None = None
    proxy_data: Path | None = None
    kd_top_k: int | None = None
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise RunError(f"serve: port must be in 0-65535, got {self.port}")
        _at_least("serve", 1, rounds=self.rounds, steps_per_round=self.steps_per_round)
        _at_least("serve", 1, min_clients=self.min_clients, eval_batches=self.eval_batches, kd_top_k=self.kd_top_k)
        _at_least("serve", 0, seed=self.seed, threads=self.threads)
        _positive_number("serve", learning_rate=self.learning_rate, round_deadline_s=self.round_deadline_s)
        if self.wire is not None and self.wire not in WIRE_CHOICES:
            raise RunError(f"serve: wire is one of {', '.join(WIRE_CHOICES)}, got {self.wire!r}")
        if self.framework is not None and not _FRAMEWORK.fullmatch(self.framework):
            raise RunError(f"serve: framework must be a plain name, got {self.framework!r}")
        if self.host is not None and not self.host.strip():
            raise RunError("serve: host is empty")

    def _flags(self) -> list[str]:
        return _render(
            [
                ("--artifacts", self.artifacts),
                ("--host", self.host),
                ("--port", self.port),
                ("--rounds", self.rounds),
                ("--min-clients", self.min_clients),
                ("--steps-per-round", self.steps_per_round),
                ("--learning-rate", self.learning_rate),
                ("--wire", self.wire),
                ("--eval-data", self.eval_data),
                ("--eval-batches", self.eval_batches),
                ("--checkpoint-dir", self.checkpoint_dir),
                ("--metrics-out", self.metrics_out),
                ("--round-deadline", self.round_deadline_s),
                ("--seed", self.seed),
                ("--threads", self.threads),
                ("--framework", self.framework),
                ("--proxy-data", self.proxy_data),
                ("--kd-top-k", self.kd_top_k),
            ]
        )

    def argv(self) -> list[str]:
        """The arguments of `edgesplit`, the subcommand first."""
        return ["serve", *self._flags(), *self.extra]


@dataclass(frozen=True)
class ClientCommand:
    """`edgesplit client`: train on `data` against the server at `server` (ws:// or wss://)."""

    server: str
    artifacts: Path
    data: Path
    client_id: str
    metrics_out: Path | None = None
    seed: int | None = None
    threads: int | None = None
    connect_timeout_s: float | None = None
    device_profile: str | None = None
    group_by_length: bool = False  # batches of like-length examples (saves compute with a --dynamic-seq head)
    quiet: bool = False
    extra: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.server.startswith(("ws://", "wss://")):
            raise RunError(f"client: server must be a ws:// or wss:// URL, got {self.server!r}")
        if not _CLIENT_ID.fullmatch(self.client_id):
            raise RunError(f"client: client_id takes 1-64 letters, digits, '.', '_' and '-', got {self.client_id!r}")
        _at_least("client", 0, seed=self.seed, threads=self.threads)
        _positive_number("client", connect_timeout_s=self.connect_timeout_s)
        if self.device_profile is not None and not self.device_profile.strip():
            raise RunError("client: device_profile is empty; give a profile's name or a .toml file")

    def _flags(self) -> list[str]:
        return _render(
            [
                ("--server", self.server),
                ("--artifacts", self.artifacts),
                ("--data", self.data),
                ("--client-id", self.client_id),
                ("--metrics-out", self.metrics_out),
                ("--seed", self.seed),
                ("--threads", self.threads),
                ("--connect-timeout", self.connect_timeout_s),
                ("--device-profile", self.device_profile),
                ("--group-by-length", self.group_by_length),
                ("--quiet", self.quiet),
            ]
        )

    def argv(self) -> list[str]:
        """The arguments of `edgesplit`, the subcommand first."""
        return ["client", *self._flags(), *self.extra]


Command = ExportCommand | ServeCommand | ClientCommand


def command_line(command: Command, launcher: Sequence[str] = EDGESPLIT) -> list[str]:
    """The whole command line: `launcher` (this interpreter's edgesplit unless told) and the record's argv."""
    return [*launcher, *command.argv()]


RECORDS: dict[str, type[Command]] = {"export": ExportCommand, "serve": ServeCommand, "client": ClientCommand}


def record_from_pairs(kind: str, pairs: Sequence[str]) -> Command:
    """A record from FIELD=VALUE strings, each value read as its field's type (for shell scripts). An empty
    value leaves an optional field unset; `extra` is split as a shell would split it."""
    if kind not in RECORDS:
        raise RunError(f"the command is one of {', '.join(RECORDS)}, got {kind!r}")
    record = RECORDS[kind]
    annotations = {f.name: str(f.type) for f in fields(record)}
    values: dict[str, object] = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals or name not in annotations:
            raise RunError(f"{kind}: expected FIELD=VALUE, FIELD one of {', '.join(annotations)}; got {pair!r}")
        values[name] = _read_value(kind, name, annotations[name], text)
    try:
        return record(**values)  # type: ignore[arg-type]
    except TypeError as error:  # a required field left out
        raise RunError(f"{kind}: {error}") from None


def _read_value(kind: str, name: str, annotation: str, text: str) -> object:
    if text == "" and annotation.endswith("| None"):
        return None
    try:
        if annotation.startswith("tuple"):
            return tuple(shlex.split(text))
        if annotation.startswith("bool"):
            if text not in ("true", "false"):
                raise ValueError(text)
            return text == "true"
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except ValueError:
        raise RunError(f"{kind}: {name} takes {annotation.split(' |')[0]}, got {text!r}") from None
    return Path(text) if annotation.startswith("Path") else text


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m edgesplit.server.orchestrate KIND FIELD=VALUE...`: the record's argv, one argument a line,
    for the shell scripts that cannot import the records."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(f"usage: python -m edgesplit.server.orchestrate {{{','.join(RECORDS)}}} FIELD=VALUE...", file=sys.stderr)
        return 2
    try:
        command = record_from_pairs(args[0], args[1:])
    except RunError as error:
        print(f"orchestrate: {error}", file=sys.stderr)
        return 2
    print("\n".join(command.argv()))
    return 0


# ---------------------------------------------------------------------------------------------- processes


class Children:
    """Child processes, each in its own process group with its own log, all stopped on exit whatever happens."""

    def __init__(self, say: Callable[[str], None] = print) -> None:
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._handles: list[IO[bytes]] = []
        self._say = say

    def start(self, name: str, command: Command, log: Path) -> subprocess.Popen[bytes]:
        """Run `command` with this interpreter, stdout and stderr appended to `log`."""
        if name in self.running and self.running[name].poll() is None:
            raise RunError(f"a child named {name} is already running")
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("ab")
        self._handles.append(handle)
        handle.write(("$ edgesplit " + " ".join(command.argv()) + "\n").encode())
        handle.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # logs readable while the child runs
        process = subprocess.Popen(
            command_line(command),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.running[name] = process
        self.logs[name] = log
        return process

    def run(self, name: str, command: Command, log: Path, on_tick: Callable[[], None] | None = None) -> None:
        """Run one child to its end, calling `on_tick` about twice a second meanwhile; a failure raises with
        the end of its log."""
        process = self.start(name, command, log)
        while True:
            try:
                code = process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if on_tick is not None:
                    on_tick()
        if code != 0:
            raise RunError(f"{name} exited with {code}; the end of {log}:\n{log_tail(log)}")

    def stop_all(self, grace_s: float = 5.0) -> list[str]:
        """SIGINT every live child's group, wait up to `grace_s`, then SIGKILL what is left; names stopped."""
        with _ignoring_interrupts():  # a second Ctrl-C must not cut the clean-up short
            return self._stop_all(grace_s)

    def _stop_all(self, grace_s: float) -> list[str]:
        live = {name: p for name, p in self.running.items() if p.poll() is None}
        for process in live.values():
            _signal_group(process, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for process in live.values():
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        for process in self.running.values():
            # The group too: a child may have children of its own (the exporter's pip download).
            _signal_group(process, signal.SIGKILL)
            process.wait()
        for handle in self._handles:
            handle.close()
        self._handles.clear()
        return sorted(live)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        stopped = self.stop_all()
        if stopped:
            self._say(f"stopped {', '.join(stopped)}")


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The group outlives its leader while a member lives; once all are gone, killpg finds nothing.
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def _ignoring_interrupts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the Ctrl-C path, so that `kill PARENT_PID` also stops the children. SIGINT is made to
    raise KeyboardInterrupt even where this process started with it ignored: a non-interactive shell starts its
    background jobs (`cmd &`) so, Python then leaves it ignored, and the children would inherit that too."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


_LISTENING = re.compile(rb"listening on wss?://[^\s:]+:(\d+)")


def wait_for_port(process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300.0) -> int:
    """The port the server printed it listens on (started with port 0, the OS picked a free one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = _LISTENING.search(log.read_bytes()) if log.exists() else None
        if found:
            return int(found.group(1))
        if process.poll() is not None:
            raise RunError(f"the server exited with {process.returncode} before listening:\n{log_tail(log)}")
        time.sleep(0.2)
    raise RunError(f"the server did not start listening within {timeout_s:.0f} s:\n{log_tail(log)}")


def follow(
    server: subprocess.Popen[bytes],
    clients: Mapping[str, subprocess.Popen[bytes]],
    logs: Mapping[str, Path],
    on_tick: Callable[[], None] = lambda: None,
    clients_after_server_s: float = 60.0,
) -> None:
    """Wait for the server and its clients to end, calling `on_tick` meanwhile; the first failure raises with
    the end of its log (`logs` by name, the server's under "server"). Once the server is done, the clients
    must follow within `clients_after_server_s`: one that does not is stuck."""
    everyone = {"server": server, **clients}

    def fail(name: str, code: int | None) -> RunError:
        return RunError(f"{name} exited with {code}; the end of {logs[name]}:\n{log_tail(logs[name])}")

    while any(p.poll() is None for p in everyone.values()):
        for name, process in everyone.items():
            code = process.poll()
            if code not in (None, 0):
                raise fail(name, code)
        if server.poll() == 0:
            for name, process in clients.items():
                try:
                    process.wait(timeout=clients_after_server_s)
                except subprocess.TimeoutExpired:
                    raise RunError(
                        f"{name} still runs {clients_after_server_s:.0f} s after the server finished:\n"
                        f"{log_tail(logs[name])}"
                    ) from None
        on_tick()
        time.sleep(0.3)
    on_tick()
    for name, process in everyone.items():
        if process.returncode != 0:
            raise fail(name, process.returncode)


if __name__ == "__main__":
    sys.exit(main())
