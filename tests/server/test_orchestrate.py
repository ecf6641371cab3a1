"""The command records render command lines their real parsers read back field for field, refuse bad values
when built, and the process helpers fail with the end of the failing child's log."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from edgesplit.server.orchestrate import (
    EDGESPLIT,
    ClientCommand,
    ExportCommand,
    RunError,
    ServeCommand,
    command_line,
    follow,
    main,
    record_from_pairs,
    wait_for_port,
)

# Record field -> the parser's dest, where the flag's name says the unit and the field's name must too.
DEST = {"round_deadline_s": "round_deadline", "connect_timeout_s": "connect_timeout"}


def parse(command: ExportCommand | ServeCommand | ClientCommand) -> Any:
    if isinstance(command, ExportCommand):
        from edgesplit.export.cli import build_parser
    elif isinstance(command, ServeCommand):
        from edgesplit.server.cli import build_parser
    else:
        from edgesplit.client.client_cli import build_parser
    argv = command.argv()
    assert argv[0] == type(command).__name__.removesuffix("Command").lower()
    return build_parser().parse_args(argv[1:])


def assert_round_trip(command: ExportCommand | ServeCommand | ClientCommand) -> None:
    parsed = vars(parse(command))
    for field in fields(command):
        if field.name == "extra":
            continue
        value = getattr(command, field.name)
        assert value is not None, f"{field.name}: set every field, or the round trip proves nothing about it"
        assert parsed[DEST.get(field.name, field.name)] == value, field.name


def test_export_command_round_trips_through_the_exporter_parser(tmp_path: Path) -> None:
    split = ExportCommand(
        out=tmp_path / "artifacts", model="tiny", cut_layer=3, top_layers=1, full_model=False, quantize="int8",
        batch_size=2, max_seq_len=24, lora_rank=4, lora_alpha=8.0, seed=7, force=True,
    )  # fmt: skip
    assert_round_trip(split)
    whole = ExportCommand(out=tmp_path / "full", model="tiny", full_model=True)
    parsed = parse(whole)
    assert parsed.full_model and parsed.cut_layer is None and not parsed.force
    assert parsed.quantize == "none"  # unset fields leave the exporter's own defaults
    dynamic = ExportCommand(out=tmp_path / "dyn", model="tiny", cut_layer=2, max_seq_len=64, dynamic_seq=True)
    assert parse(dynamic).dynamic_seq and not parsed.dynamic_seq


def test_serve_command_round_trips_through_the_server_parser(tmp_path: Path) -> None:
    command = ServeCommand(
        artifacts=tmp_path / "a", port=0, rounds=3, steps_per_round=5, min_clients=2, host="127.0.0.1",
        learning_rate=0.02, wire="fp16", eval_data=tmp_path / "eval.jsonl", eval_batches=4,
        checkpoint_dir=tmp_path / "ckpt", metrics_out=tmp_path / "server.jsonl", round_deadline_s=30.0,
        seed=1, threads=1, framework="kd", proxy_data=tmp_path / "proxy.jsonl", kd_top_k=8,
        extra=("--max-pending-hellos", "3"),
    )  # fmt: skip
    assert_round_trip(command)
    assert parse(command).max_pending_hellos == 3


def test_client_command_round_trips_through_the_client_parser(tmp_path: Path) -> None:
    command = ClientCommand(
        server="wss://localhost:8765", artifacts=tmp_path / "a", data=tmp_path / "d.jsonl", client_id="pi-4.a_1",
        metrics_out=tmp_path / "m.jsonl", seed=2, threads=1, connect_timeout_s=120.0, device_profile="x86-laptop",
        group_by_length=True, quiet=True,
        extra=("--token-file", str(tmp_path / "token")),
    )  # fmt: skip
    assert_round_trip(command)
    assert parse(command).token_file == tmp_path / "token"


def test_extra_flags_come_last_so_that_a_test_may_override_the_records_own(tmp_path: Path) -> None:
    command = ClientCommand("ws://127.0.0.1:1", tmp_path, tmp_path / "d.jsonl", "a", connect_timeout_s=120.0,
                            extra=("--connect-timeout", "5"))  # fmt: skip
    assert parse(command).connect_timeout == 5.0


def test_a_command_line_runs_this_interpreter_unless_told(tmp_path: Path) -> None:
    command = ClientCommand("ws://127.0.0.1:1", tmp_path, tmp_path / "d.jsonl", "a")
    assert command_line(command)[: len(EDGESPLIT)] == [sys.executable, "-m", "edgesplit.cli"]
    assert command_line(command, ["/venv/bin/edgesplit"])[:2] == ["/venv/bin/edgesplit", "client"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda p: ExportCommand(out=p, model="m"), "cut_layer, or full_model"),
        (lambda p: ExportCommand(out=p, model="m", cut_layer=0), "cut_layer must be at least 1"),
        (lambda p: ExportCommand(out=p, model="m", cut_layer=2, quantize="int4"), "quantize is one of"),
        (lambda p: ExportCommand(out=p, model="", cut_layer=2), "model is empty"),
        (lambda p: ExportCommand(out=p, model="m", cut_layer=2, lora_alpha=float("nan")), "lora_alpha"),
        (lambda p: ExportCommand(out=p, model="m", cut_layer=2, top_layers=1, dynamic_seq=True), "U-shaped"),
        (lambda p: ServeCommand(p, port=70000, rounds=1, steps_per_round=1, min_clients=1), "port"),
        (lambda p: ServeCommand(p, port=0, rounds=0, steps_per_round=1, min_clients=1), "rounds"),
        (lambda p: ServeCommand(p, 0, 1, 1, 1, learning_rate=-1.0), "learning_rate"),
        (lambda p: ServeCommand(p, 0, 1, 1, 1, wire="fp8"), "wire is one of"),
        (lambda p: ServeCommand(p, 0, 1, 1, 1, framework="split --evil"), "plain name"),
        (lambda p: ClientCommand("http://host:1", p, p, "a"), "ws:// or wss://"),
        (lambda p: ClientCommand("ws://host:1", p, p, "a b"), "client_id"),
        (lambda p: ClientCommand("ws://host:1", p, p, "x" * 65), "client_id"),
        (lambda p: ClientCommand("ws://host:1", p, p, "a", connect_timeout_s=0.0), "connect_timeout_s"),
        (lambda p: ClientCommand("ws://host:1", p, p, "a", device_profile=" "), "device_profile is empty"),
    ],
)
def test_a_bad_command_is_refused_when_built(build: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(RunError, match=message):
        build(tmp_path)


def test_the_loopback_and_bench_helpers_render_through_the_records(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    try:
        import common
    finally:
        sys.path.pop(0)
    from loopback import client_command, serve_command

    from edgesplit.client.client_cli import build_parser as client_parser
    from edgesplit.export.cli import build_parser as export_parser
    from edgesplit.server.cli import build_parser as serve_parser

    serve = serve_command(tmp_path / "a", 4000, tmp_path, rounds=2, extra=["--wire", "int8"])
    parsed = serve_parser().parse_args(serve[len(EDGESPLIT) + 1 :])
    assert (parsed.port, parsed.rounds, parsed.min_clients, parsed.wire) == (4000, 2, 2, "int8")
    client = client_command("ws://127.0.0.1:4000", tmp_path / "a", tmp_path / "d.jsonl", "a", tmp_path)
    parsed = client_parser().parse_args(client[len(EDGESPLIT) + 1 :])
    assert (parsed.client_id, parsed.metrics_out) == ("a", tmp_path / "a-metrics.jsonl")
    exported = common.export_command(tmp_path / "out", 4, "int8")
    parsed = export_parser().parse_args(exported[len(EDGESPLIT) + 1 :])
    assert (parsed.cut_layer, parsed.quantize, parsed.force) == (4, "int8", True)
    served = common.serve_command(tmp_path / "a", 4001, tmp_path / "m.jsonl", steps=3)
    parsed = serve_parser().parse_args(served[len(EDGESPLIT) + 1 :])
    assert (parsed.host, parsed.steps_per_round, parsed.min_clients) == ("127.0.0.1", 3, 1)


def test_shell_scripts_render_a_record_from_field_value_pairs(capsys: pytest.CaptureFixture[str]) -> None:
    pairs = ["out=/tmp/a", "model=tiny", "cut_layer=1", "batch_size=2", "quantize=int8", "seed=", "force=true"]
    assert main(["export", *pairs]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == ExportCommand(Path("/tmp/a"), "tiny", 1, batch_size=2, quantize="int8", force=True).argv()
    command = record_from_pairs(
        "client", ["server=ws://h:1", "artifacts=a", "data=d", "client_id=c", "extra=--x 'a b'"]
    )
    assert isinstance(command, ClientCommand) and command.extra == ("--x", "a b")
    for kind, pairs, message in [
        ("serve", ["artifacts=a", "port=x"], "port takes int"),
        ("serve", ["artifacts=a"], "missing"),
        ("export", ["out=a", "model=m", "cut_layer=1", "force=yes"], "force takes bool"),
        ("export", ["colour=red"], "FIELD one of out, model"),
        ("train", [], "one of export, serve, client"),
    ]:
        with pytest.raises(RunError, match=message):
            record_from_pairs(kind, pairs)
    assert main(["serve", "artifacts=a", "port=x"]) == 2
    assert "port takes int" in capsys.readouterr().err


def python(code: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT)


def test_follow_fails_with_the_end_of_the_failing_childs_log(tmp_path: Path) -> None:
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "a", "b")}
    server = python("import time; time.sleep(30)", logs["server"])
    clients = {
        "a": python("import time; time.sleep(30)", logs["a"]),
        "b": python("import sys; print('no such artifacts'); sys.exit(3)", logs["b"]),
    }
    try:
        with pytest.raises(RunError, match=r"(?s)b exited with 3.*no such artifacts"):
            follow(server, clients, logs)
    finally:
        for process in (server, *clients.values()):
            process.kill()
            process.wait()


def test_follow_fails_when_a_client_outlives_the_server(tmp_path: Path) -> None:
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "a")}
    server = python("pass", logs["server"])
    client = python("import time; print('waiting'); time.sleep(30)", logs["a"])
    try:
        with pytest.raises(RunError, match="a still runs"):
            follow(server, {"a": client}, logs, clients_after_server_s=0.5)
    finally:
        client.kill()
        client.wait()


def test_the_port_is_read_from_the_servers_log_or_its_exit_is_reported(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    listening = python("print('[server] listening on ws://127.0.0.1:43210'); import time; time.sleep(30)", log)
    try:
        assert wait_for_port(listening, log, timeout_s=30) == 43210
    finally:
        listening.kill()
        listening.wait()
    failed = python("import sys; print('bad artifacts'); sys.exit(1)", log)
    with pytest.raises(RunError, match=r"(?s)exited with 1 before listening.*bad artifacts"):
        wait_for_port(failed, log, timeout_s=30)


def test_a_long_child_shows_its_elapsed_time_and_latest_log_line(tmp_path: Path) -> None:
    from edgesplit.server.progress import LogTicker, latest_log_line

    log = tmp_path / "export.log"
    # A download's progress bar: carriage-return updates on one line, the newest last.
    log.write_text("loading\nmodel.gguf:  10%|#   | 10M/100M\rmodel.gguf:  55%|#####  | 55M/100M\r")
    assert latest_log_line(log) == "model.gguf:  55%|#####  | 55M/100M"
    assert latest_log_line(tmp_path / "missing.log") == ""

    said: list[str] = []
    ticker = LogTicker("exporting", log, said.append, quiet_s=0.0, bar_prefix="[demo] ")
    ticker()  # not a terminal here: a plain line, through `say`, which adds its own prefix (not the bar's)
    ticker.close()
    assert len(said) == 1 and said[0].startswith("exporting: 0 s so far; model.gguf:  55%")


def test_run_ticks_while_the_child_works_and_raises_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edgesplit.server.orchestrate as orchestrate

    # A child that works for a second, says something and fails: in place of a real export.
    work = "import time; time.sleep(1.2); print('ran out of disk'); raise SystemExit(3)"
    monkeypatch.setattr(orchestrate, "command_line", lambda command: [sys.executable, "-c", work])
    ticks: list[None] = []
    log = tmp_path / "export.log"
    command = ExportCommand(out=tmp_path / "out", model="m", cut_layer=1)
    with orchestrate.Children(lambda _: None) as children:
        with pytest.raises(RunError, match="(?s)export exited with 3.*ran out of disk"):
            children.run("export", command, log, on_tick=lambda: ticks.append(None))
    assert len(ticks) >= 2  # about twice a second while it ran
