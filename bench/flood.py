"""Peers that send pings and never read, against one server on loopback while an honest client trains: the
server's memory over time, how soon each flooding connection is aborted, and the honest client's step time
before and during the flood. Prints one JSON object.

    python bench/flood.py [--flooders 4] [--flood-seconds 20] [--steps 120] [--send-timeout 60]
                          [--work-dir DIR]

- The model is the tests' tiny random Llama, exported once into the work directory (as bench/load.py does):
  this measures the transport, not a model.
- One `edgesplit serve` process and one `edgesplit client` process (1 round of --steps steps). Once the client
  has taken 5 steps, --flooders raw sockets open a websocket each, say nothing, shrink their receive buffer
  to 4 KiB, and send 125-byte pings as fast as they can without ever reading. A flooder whose connection the
  server aborts opens a new one at once, until --flood-seconds have passed.
- Reported: the server's RSS every 0.5 s (MB, seconds since the flood began), each connection's seconds from
  open to abort, and the honest client's median step time (its metrics' phases summed) before and during.

    python bench/flood.py --bar [--rounds 3] [--steps 20] [--flood-seconds 60] [--aggregation fedavg]

The hardening bar instead (bench/flood_bar.py): the same server run twice with tokens on and two honest
clients, first alone (its idle-training memory peak), then under every attack of docs/security.md at once
(flood_bar.py's docstring lists them); whether both honest clients finish every round, the server's peak
memory over the idle one, and whether each checkpoint is finite and equal to the rule's aggregation of the
updates the round accepted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import free_port, machine, serve_command
from flood_peers import flood, step_seconds
from load import ensure_artifacts, write_data

from edgesplit.server.orchestrate import ClientCommand, command_line

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    import psutil

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--flood-seconds", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=120, help="the honest client's steps (one round)")
    parser.add_argument("--send-timeout", type=float, default=60.0, help="the server's --send-timeout")
    parser.add_argument("--work-dir", type=Path, default=REPO / "runs" / "bench-flood")
    parser.add_argument("--bar", action="store_true", help="the hardening bar: every attack, two honest clients")
    parser.add_argument("--rounds", type=int, default=3, help="--bar: rounds of the run")
    parser.add_argument("--aggregation", default="fedavg", help="--bar: the server's --aggregation")
    args = parser.parse_args(argv)
    if args.bar:
        from flood_bar import run_bar

        report = run_bar(args.work_dir.resolve(), args.rounds, args.steps, args.flood_seconds, args.aggregation)
        print(json.dumps({**report, "machine": machine()}, indent=2))
        return 0 if report["passed"] else 1
    if not 1 <= args.flooders <= 64 or not 0 < args.flood_seconds <= 300 or not 10 <= args.steps <= 500:
        parser.error("--flooders 1-64, --flood-seconds up to 300, --steps 10-500")
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for stale in ("server.jsonl", "client.jsonl"):
        (work / stale).unlink(missing_ok=True)
    shutil.rmtree(work / "data", ignore_errors=True)
    (work / "data").mkdir()
    artifacts = ensure_artifacts(work)
    write_data(work / "data" / "honest.jsonl", seed=0, count=64)

    port = free_port()
    extra = ["--threads", "1", "--send-timeout", str(args.send_timeout)]
    server_log = (work / "server.log").open("w")  # a pipe left unread would block the server's prints
    server = subprocess.Popen(
        serve_command(artifacts, port, work / "server.jsonl", steps=args.steps, extra=extra),
        stdout=server_log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    client_metrics = work / "client.jsonl"
    client = subprocess.Popen(
        command_line(
            ClientCommand(
                server=f"ws://127.0.0.1:{port}",
                artifacts=artifacts,
                data=work / "data" / "honest.jsonl",
                client_id="honest",
                metrics_out=client_metrics,
                threads=1,
                connect_timeout_s=120.0,
            )
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    memory = psutil.Process(server.pid)
    try:
        deadline = time.monotonic() + 300
        while not (client_metrics.exists() and len(step_seconds(client_metrics)) >= 5):
            if time.monotonic() > deadline or client.poll() is not None:
                raise RuntimeError("the honest client did not take 5 steps")
            time.sleep(0.2)
        rss_before = memory.memory_info().rss / 2**20
        flood_began, flood_began_wall = time.monotonic(), time.time()
        until = flood_began + args.flood_seconds
        aborted_after: list[float] = []
        threads = [threading.Thread(target=flood, args=(port, until, aborted_after)) for _ in range(args.flooders)]
        for thread in threads:
            thread.start()
        rss: list[tuple[float, float]] = []
        while time.monotonic() < until:
            rss.append((round(time.monotonic() - flood_began, 1), round(memory.memory_info().rss / 2**20, 1)))
            time.sleep(0.5)
        for thread in threads:
            thread.join()
        flood_ended_wall = time.time()
        client_code = client.wait(600)
        server.wait(120)
    finally:
        for process in (client, server):
            if process.poll() is None:
                process.kill()
                process.wait()
        server_log.close()
    server_output = (work / "server.log").read_text()
    steps = step_seconds(client_metrics)
    before = [s for t, s in steps if t < flood_began_wall]
    during = [s for t, s in steps if flood_began_wall <= t <= flood_ended_wall]
    report = {
        "flooders": args.flooders,
        "flood_seconds": args.flood_seconds,
        "send_timeout_s": args.send_timeout,
        "server_rss_mb_before_flood": round(rss_before, 1),
        "server_rss_mb_peak_during_flood": max(mb for _, mb in rss),
        "server_rss_mb_over_time": rss,
        "connections_aborted": len(aborted_after),
        "seconds_to_abort": {
            "median": statistics.median(aborted_after) if aborted_after else None,
            "max": max(aborted_after, default=None),
        },
        "honest_step_ms_median_before": round(statistics.median(before) * 1e3, 1) if before else None,
        "honest_step_ms_median_during": round(statistics.median(during) * 1e3, 1) if during else None,
        "honest_steps_before_during": [len(before), len(during)],
        "honest_client_exit": client_code,
        "server_exit": server.returncode,
        "server_abort_lines": sum("aborted: " in line for line in server_output.splitlines()),
        "machine": machine(),
    }
    print(json.dumps(report, indent=2))
    return 0 if client_code == 0 and server.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
