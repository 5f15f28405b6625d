"""The `intake` phase: `mailer serve` on a free port against the benchmark's Redis, no worker.

Measured: NDJSON batches of 1 000 events from 4 concurrent clients (events/s, over BATCHES
requests), and single events from 8 concurrent clients (requests/s and p50/p99 latency over
SINGLES requests). The events are the benchmark's registrations; what is timed is the HTTP
service's part: read, validate, queue (the worker would apply them later).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.data import registrations
from bench.infra import RedisServer, _stop_process, free_port

TOKEN = "bench-token"  # noqa: S105 (the private service of one benchmark run)
CLIENTS = 4
BATCH = 1000
BATCHES = 40
SINGLE_CLIENTS = 8
SINGLES = 4000


def start_serve(
    redis: RedisServer, directory: Path, *, token: str | None = TOKEN
) -> tuple[subprocess.Popen[bytes], str]:
    """`mailer serve` on a free loopback port; without a token its dashboard needs no login."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env |= {"MAILER_REDIS_URL": redis.url, "MAILER_DATA_DIR": str(directory)}
    if token is not None:
        env["MAILER_API_TOKEN"] = token
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "mailer", "serve", "--port", str(port)],
        env=env,
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=(directory / "serve.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("mailer serve did not start")


async def _batches(url: str, bodies: list[bytes]) -> float:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    queue = list(bodies)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
            while queue:
                answer = await http.post("/v1/events", content=queue.pop())
                assert answer.status_code == 202, answer.text

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return time.perf_counter() - began


async def _singles(url: str, bodies: list[bytes]) -> tuple[float, list[float]]:
    """Single events over kept-alive connections, written and read by hand: httpx spent more
    CPU per request than the service (measured: 9.6 s of client CPU for 6 000 requests), so
    it, not mailer, set the rate on two cores."""
    host, port = url.removeprefix("http://").split(":")
    queue = list(bodies)
    latencies: list[float] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while queue:
                body = queue.pop()
                head = (
                    f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                sent = time.perf_counter()
                writer.write(head.encode() + body)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append((time.perf_counter() - sent) * 1000)
                assert status_line.split()[1] == b"202", status_line
        finally:
            writer.close()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(SINGLE_CLIENTS)))
    return time.perf_counter() - began, latencies


def intake_phase(redis: RedisServer, directory: Path) -> dict[str, Any]:
    events = registrations(BATCH * BATCHES, run="intake")
    bodies = [
        b"\n".join(orjson.dumps(e) for e in events[i : i + BATCH]) for i in range(0, len(events), BATCH)
    ]
    singles = [orjson.dumps(e) for e in registrations(SINGLES, run="single")]
    redis.client().flushall()
    process, url = start_serve(redis, directory)
    try:
        asyncio.run(_batches(url, bodies[:2]))  # warm up: connections, imports, script loads
        seconds = asyncio.run(_batches(url, bodies))
        single_seconds, latencies = asyncio.run(_singles(url, singles))
    finally:
        _stop_process(process, 10)
    latencies.sort()
    return {
        "batch_events_per_s": round(BATCH * len(bodies) / seconds),
        "batch_clients": CLIENTS,
        "singles_per_s": round(SINGLES / single_seconds),
        "single_clients": SINGLE_CLIENTS,
        "single_p50_ms": round(statistics.median(latencies), 2),
        "single_p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
    }
