"""A real server batching two real clients' steps, its Prometheus endpoint scraped while it runs, and the
Gradients' split of the server's time as the clients see it."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import urllib.request

import pytest
from loopback import write_task

from edgesplit.client.client import Client, ClientConfig
from edgesplit.server.server import Server, ServerConfig

STEPS = 6


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(edgesplit_\w+) (\S+)$", text, re.MULTILINE)}


def test_two_clients_steps_are_batched_and_the_endpoint_shows_the_run(tiny_artifacts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("prometheus_client")  # the `metrics` extra, which setup.sh installs
    artifacts = tiny_artifacts("llama", 1)
    for name in ("a", "b"):
        write_task(tmp_path / f"{name}.jsonl", seed=ord(name), count=8)
    config = ServerConfig(
        artifacts=artifacts,
        port=0,
        rounds=1,
        min_clients=2,
        steps_per_round=STEPS,
        max_batch_clients=2,
        batch_window_ms=500,  # the two clients step in lockstep: each step's partner comes well within it
        metrics_port=0,
    )
    server = Server(config)
    scrapes: list[dict[str, float]] = []

    async def scenario() -> None:
        ready = asyncio.Event()
        serving = asyncio.create_task(server.serve(ready))
        await ready.wait()
        assert server.metrics_endpoint is not None
        url = f"http://127.0.0.1:{server.metrics_endpoint.port}/metrics"
        scrapes.append(scrape(url))  # before any client
        clients = [
            Client(
                ClientConfig(
                    server=f"ws://127.0.0.1:{server.port}",
                    artifacts=artifacts,
                    data=tmp_path / f"{name}.jsonl",
                    client_id=name,
                    quiet=True,
                    metrics_out=tmp_path / f"{name}-metrics.jsonl",
                )
            )
            for name in ("a", "b")
        ]
        stop = threading.Event()

        def scrape_until_stopped() -> None:  # as Prometheus would, only much more often
            while not stop.is_set():
                scrapes.append(scrape(url))
                stop.wait(0.02)

        scraper = threading.Thread(target=scrape_until_stopped)
        scraper.start()
        try:
            await asyncio.gather(*(client.run() for client in clients))
        finally:
            stop.set()
            scraper.join()
        await serving

    asyncio.run(scenario())
    stats = server.worker.stats
    assert stats.steps == 2 * STEPS and stats.batches < stats.steps  # some steps shared a pass of the tail
    first, during = scrapes[0], scrapes[1:]
    assert first["edgesplit_steps_total"] == 0 and first["edgesplit_rounds_total"] == 1
    assert max(s["edgesplit_clients_connected"] for s in during) == 2, [
        s["edgesplit_clients_connected"] for s in during
    ]
    assert max(s["edgesplit_round_steps_taken"] for s in during) > 0
    last = during[-1]
    assert 0 < last["edgesplit_tail_passes_total"] <= last["edgesplit_steps_total"] <= 2 * STEPS
    assert last["edgesplit_tail_busy_seconds_total"] > 0 and last["edgesplit_step_compute_seconds_total"] > 0
    assert all(s["edgesplit_tail_queue_depth"] >= 0 for s in scrapes)
    # Each client's step records split the server's time; a batched step's queue includes its window's wait.
    for name in ("a", "b"):
        records = [json.loads(line) for line in (tmp_path / f"{name}-metrics.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["event"] == "step"]
        assert len(steps) == STEPS and all(r["seconds"]["server_compute"] > 0 for r in steps)
        assert all(r["seconds"]["server_queue"] >= 0 for r in steps)
