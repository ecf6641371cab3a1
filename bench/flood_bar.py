"""The hardening bar, measured (`python bench/flood.py --bar`): under a bounded flood of the attacks in
docs/security.md, on loopback, two honest clients finish every round, the server's peak memory stays under
1.5x its idle-training peak, and every checkpoint is finite and equal to the rule's aggregation of the
updates that round accepted.

- The model is the tests' tiny random Llama (as bench/load.py); the hand-made frames are the tests' own
  (tests/server/loopback.py), so that the bench and the tests attack alike.
- The server runs with tokens (honest-0, honest-1 and one token holder, "evil") and a checkpoint directory,
  twice: first with the two honest clients alone, sampling its RSS every 0.1 s (the idle-training peak);
  then the same run while, from the honest clients' first step until the run ends or --flood-seconds pass:
    - 2 peers send 125-byte pings as fast as they can and never read (bench/flood.py's flooders);
    - strangers send Hellos with a key of 9,000 two-byte characters, a 65,000-character key, a manifest
      hash carrying a newline, a forged server line and terminal escapes, the reserved id "..", and takeovers
      of honest-0 with a wrong token and with none;
    - the token holder joins and sends an activation holding 2e38, an update claiming 10**400 examples,
      one past the 10**9 cap, and one with adapters of 1e30 (each is refused and ends its connection).
- The checkpoints: for each round directory, the global adapters, tail LoRA and AdamW state are finite, the
  updates kept are those the metrics file's `round` record names (with its sample counts), no update dropped
  in that round (a `refused` record) is among them, and the rule applied to them (robust.AggregationRule;
  the previous round's global adapters, or the export's initial ones, for `clipped`) gives the global
  adapters to within 1e-6.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import free_port, serve_command
from flood_peers import flood, step_seconds
from load import ensure_artifacts, write_data

from edgesplit.server.orchestrate import ClientCommand, command_line

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "server"))
TOKENS = {"honest-0": "token-of-honest-0", "honest-1": "token-of-honest-1", "evil": "token-of-evil"}
FORGED = "0" * 63 + "\n[server] round 9/9 closed with 2 clients (a, b)\x1b[2J"


def stranger_frames(manifest: Any) -> dict[str, bytes]:
    from loopback import hello_frame, raw_frame

    from edgesplit.client.protocol import PROTOCOL_VERSION, Kind

    def hello(**changes: object) -> bytes:
        fields = {
            "client_id": "stranger",
            "protocol_version": PROTOCOL_VERSION,
            "manifest_hash": manifest.manifest_hash,
            "token": None,
            "num_samples": 8,
        }
        return raw_frame(Kind.HELLO, {**fields, **changes})

    return {
        "hello with a 9,000-character key": hello(**{"é" * 9_000: 1}),
        "hello with a 65,000-character key": hello(**{"k" * 65_000: 1}),
        "hello forging a log line": hello(manifest_hash=FORGED),
        "hello as '..'": hello_frame("..", manifest, "x"),
        "takeover with a wrong token": hello_frame("honest-0", manifest, "wrong"),
        "takeover with no token": hello_frame("honest-0", manifest),
    }


def admitted_attacks(manifest: Any) -> dict[str, Any]:
    """Name -> a function of the round the Welcome named, giving the frame the token holder then sends."""
    from loopback import activations, adapters, raw_frame

    from edgesplit.client.protocol import Kind, encode

    def update(num_samples: object, value: float) -> Any:
        return lambda r: raw_frame(
            Kind.ADAPTER_UPDATE, {"round": r, "num_samples": num_samples, "metrics": {}}, adapters(manifest, value)
        )

    def huge_activation(r: int) -> bytes:
        message = activations(manifest, round=r)
        message.tensors["activations"][0, 0, 0] = 2e38
        return encode(message)

    return {
        "activation of 2e38": huge_activation,
        "update claiming 10**400 examples": update(10**400, 0.01),
        "update claiming 10**9 + 1 examples": update(10**9 + 1, 0.01),
        "update with adapters of 1e30": update(8, 1e30),
    }


async def _answer(url: str, first: bytes, then: Any = None) -> str:
    """Send `first`; if a Welcome comes back and `then` is given, send then(welcome.round); the Error code the
    server ended with ("none" if it closed without one)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    from edgesplit.client.protocol import Error, Welcome, decode

    code = "none"
    try:
        async with connect(url, max_size=None, compression=None, open_timeout=30) as websocket:
            await websocket.send(first)
            while True:
                message = decode(await asyncio.wait_for(websocket.recv(), 60))
                if isinstance(message, Welcome) and then is not None:
                    await websocket.send(then(message.round))
                elif isinstance(message, Error):
                    code = message.code
    except ConnectionClosed:
        pass
    except (OSError, asyncio.TimeoutError) as error:
        code = f"{type(error).__name__}"
    return code


def attack_loop(url: str, attacks: list[tuple[str, bytes, Any]], going: Any, outcomes: dict[str, list[str]]) -> None:
    """Each (name, first frame, frame after the Welcome or None) in turn, again and again, while going()."""
    while going():
        for name, first, then in attacks:
            if not going():
                return
            code = asyncio.run(_answer(url, first, then))
            if code == "ConnectionRefusedError":
                return  # nothing listens on the port any more: the run is over
            outcomes.setdefault(name, []).append(code)


def sample_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    import psutil

    process = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], process.memory_info().rss / 2**20)
        except psutil.Error:
            return
        time.sleep(0.1)


def one_run(work: Path, name: str, rounds: int, steps: int, aggregation: str, attack_s: float) -> dict[str, Any]:
    """One server and two honest clients; with attack_s > 0, every attack from their first step on."""
    from edgesplit.client.artifacts import load_manifest

    artifacts = ensure_artifacts(work)
    manifest = load_manifest(artifacts, verify=False)
    run = work / name
    run.mkdir(parents=True)
    (run / "tokens").write_text("".join(f"{client} {token}\n" for client, token in TOKENS.items()))
    port = free_port()
    extra = ["--threads", "1", "--send-timeout", "5", "--aggregation", aggregation]
    extra += ["--tokens-file", str(run / "tokens"), "--checkpoint-dir", str(run / "ckpt")]
    metrics = run / "server.jsonl"
    command = serve_command(artifacts, port, metrics, rounds=rounds, min_clients=2, steps=steps, extra=extra)
    log = (run / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    clients = []
    for index in range(2):
        client_id = f"honest-{index}"
        (run / f"{client_id}.token").write_text(TOKENS[client_id])
        write_data(run / f"{client_id}.jsonl", seed=index, count=64)
        client = ClientCommand(
            server=f"ws://127.0.0.1:{port}",
            artifacts=artifacts,
            data=run / f"{client_id}.jsonl",
            client_id=client_id,
            metrics_out=run / f"{client_id}.metrics.jsonl",
            threads=1,
            connect_timeout_s=120.0,
            extra=("--token-file", str(run / f"{client_id}.token")),
        )
        clients.append(subprocess.Popen(command_line(client), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=sample_rss, args=(server.pid, stop, peak), daemon=True)
    sampler.start()
    outcomes: dict[str, list[str]] = {}
    threads: list[threading.Thread] = []
    aborted: list[float] = []  # the ping flooders' connections, seconds from open to the server's abort
    flood_began = flood_ended = 0.0
    try:
        if attack_s > 0:
            first = run / "honest-0.metrics.jsonl"
            deadline = time.monotonic() + 300
            while not (first.exists() and step_seconds(first)):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"honest-0 took no step; see {run / 'server.log'}")
                time.sleep(0.2)
            flood_began = time.monotonic()
            until = flood_began + attack_s
            url = f"ws://127.0.0.1:{port}"

            def going() -> bool:  # until the run ends or the flood's time is up
                return time.monotonic() < until and not stop.is_set() and server.poll() is None

            from loopback import hello_frame

            strangers, admitted = stranger_frames(manifest), admitted_attacks(manifest)
            evil_hello = hello_frame("evil", manifest, TOKENS["evil"])
            threads = [
                threading.Thread(target=flood, args=(port, until, aborted, going), daemon=True) for _ in range(2)
            ]
            for attacks in (
                [(name, frame, None) for name, frame in strangers.items()],
                [(name, evil_hello, then) for name, then in admitted.items()],
            ):
                threads.append(threading.Thread(target=attack_loop, args=(url, attacks, going, outcomes), daemon=True))
            for thread in threads:
                thread.start()
        client_codes = [client.wait(900) for client in clients]
        server_code = server.wait(120)
        flood_ended = min(time.monotonic(), until) if attack_s > 0 else 0.0
    finally:
        stop.set()
        for process in (*clients, server):
            if process.poll() is None:
                process.kill()
                process.wait()
        log.close()
    for thread in threads:
        thread.join(90)
    return {
        "server_rss_mb_peak": round(peak[0], 1),
        "client_exits": client_codes,
        "server_exit": server_code,
        "flood_seconds": round(flood_ended - flood_began, 1),
        "ping_connections_aborted": len(aborted),
        "attacks": {name: {code: codes.count(code) for code in sorted(set(codes))} for name, codes in outcomes.items()},
        **check_run(run, artifacts, rounds, aggregation),
    }


def check_run(run: Path, artifacts: Path, rounds: int, aggregation: str) -> dict[str, Any]:
    """Every round closed with both honest clients, and each checkpoint is the rule's aggregation of the
    updates its round accepted, finite throughout."""
    from safetensors.numpy import load_file

    from edgesplit.client.metrics import read_jsonl
    from edgesplit.server.checkpoint import load_checkpoint
    from edgesplit.server.robust import AggregationRule

    records = read_jsonl(run / "server.jsonl")
    closed = {r["round"]: r for r in records if r["event"] == "round"}
    dropped: dict[int, list[str]] = {}
    for record in records:
        if record["event"] == "refused" and record.get("code") == "bad_tensor" and "round" in record:
            dropped.setdefault(record["round"], []).append(record["client_id"])
    rule = AggregationRule(aggregation)
    previous = load_file(str(artifacts / "head_adapters.safetensors"))
    worst_difference, problems = 0.0, []
    for round_index in range(rounds):
        record = closed.get(round_index)
        if record is None or set(record["clients"]) != {"honest-0", "honest-1"}:
            problems.append(f"round {round_index + 1}: closed with {record and record['clients']}")
            continue
        checkpoint = load_checkpoint(run / "ckpt" / f"round-{round_index + 1:04d}")
        states = (checkpoint.global_adapters, checkpoint.tail_lora, checkpoint.tail_optimizer)
        if not all(_finite(state) for state in states):
            problems.append(f"round {round_index + 1}: a checkpointed tensor is not finite")
        accepted = set(checkpoint.updates)
        if accepted != set(record["clients"]) or accepted & set(dropped.get(round_index, [])):
            problems.append(f"round {round_index + 1}: checkpointed updates {sorted(accepted)}")
        counts = checkpoint.extra["num_samples"]
        if counts != record["num_samples"]:
            problems.append(f"round {round_index + 1}: counts {counts} against the record's {record['num_samples']}")
        expected = rule.aggregate([(checkpoint.updates[c], counts[c]) for c in sorted(accepted)], previous)
        for name, value in expected.items():
            worst_difference = max(worst_difference, float(np.max(np.abs(value - checkpoint.global_adapters[name]))))
        previous = checkpoint.global_adapters
    if worst_difference > 1e-6:
        problems.append(f"a global adapter differs from the rule's aggregation by {worst_difference:.3g}")
    return {
        "rounds_closed_with_both_honest": sum(
            1 for r in closed.values() if {"honest-0", "honest-1"} <= set(r["clients"])
        ),
        "updates_dropped": sum(len(v) for v in dropped.values()),
        "checkpoint_max_abs_difference_from_rule": worst_difference,
        "checkpoint_problems": problems,
    }


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(item) for item in value)
    if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating):
        return bool(np.all(np.isfinite(value)))
    return True


def run_bar(work: Path, rounds: int, steps: int, flood_seconds: float, aggregation: str) -> dict[str, Any]:
    import shutil

    for name in ("idle", "attacked"):
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    idle = one_run(work, "idle", rounds, steps, aggregation, attack_s=0)
    attacked = one_run(work, "attacked", rounds, steps, aggregation, attack_s=flood_seconds)
    ratio = attacked["server_rss_mb_peak"] / idle["server_rss_mb_peak"]
    checkpoints_ok = not idle["checkpoint_problems"] and not attacked["checkpoint_problems"]
    both_finish = all(
        run["client_exits"] == [0, 0] and run["server_exit"] == 0 and run["rounds_closed_with_both_honest"] == rounds
        for run in (idle, attacked)
    )
    return {
        "rounds": rounds,
        "steps_per_round": steps,
        "aggregation": aggregation,
        "flood_seconds_at_most": flood_seconds,
        "idle": idle,
        "attacked": attacked,
        "peak_memory_ratio": round(ratio, 3),
        "bar": {
            "honest_clients_finish_every_round": both_finish,
            "peak_memory_under_1_5x_idle": ratio < 1.5,
            "checkpoints_finite_and_equal_to_the_rule": checkpoints_ok,
        },
        "passed": both_finish and ratio < 1.5 and checkpoints_ok,
    }
