"""Lifecycle costs: Redis memory per registration with reminders, reschedule time, and `mailer enqueue`."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.data import bench_settings, moved_event, registrations
from bench.infra import PhaseTimeout, RedisServer
from bench.mailer_phases import throughput
from bench.sink import Sink
from mailer.constants import SCHEDULE_KEY
from mailer.events import parse_event
from mailer.lifecycle.planner import Planner
from mailer.state.queue import connect

OFFSETS = "P1D,PT1H"


def _breakdown(redis: RedisServer, run: str, n: int) -> dict[str, Any]:
    """Where the bytes are: MEMORY USAGE of one registration's keys and of the shared ones."""
    r = redis.client()
    sizes: dict[str, Any] = {}
    for label, key in (
        ("registration_hash", f"mailer:reg:r-{run}-0"),
        ("seen_key", f"mailer:seen:e-{run}-0"),
        ("event_hash", f"mailer:event:bench-{run}"),
        ("event_registrations_set", f"mailer:event:bench-{run}:regs"),
        ("due_index", "mailer:due"),
        ("schedule", SCHEDULE_KEY),
    ):
        sizes[label] = r.memory_usage(key, samples=0)
    sizes["event_registrations_set_per_registration"] = (sizes["event_registrations_set"] or 0) / n
    sizes["keys"] = int(r.dbsize())
    sizes["schedule_entries"] = [
        (m.decode(), int(score)) for m, score in r.zrange(SCHEDULE_KEY, 0, -1, withscores=True)
    ]
    return sizes


def memory(
    redis: RedisServer, sink: Sink, base_dir: Path, *, n: int, run: str, timeout: float
) -> dict[str, Any]:
    """N registrations, event 10 days ahead, reminders P1D and PT1H, through one real worker."""
    result = throughput(
        redis,
        sink,
        base_dir,
        n=n,
        workers=1,
        run=run,
        timeout=timeout,
        days_ahead=10,
        MAILER_REMINDER_OFFSETS=OFFSETS,
    )
    breakdown = _breakdown(redis, run, n)
    return {
        "n": n,
        "offsets": OFFSETS,
        "bytes_per_registration": result["redis_bytes_per_registration"],
        "log": "mailer:log stream deleted before measuring",
        "queue_drained": result["queue_drained"],
        "mails": result["accepted_total"],
        "breakdown": breakdown,
        "worker_peak_rss_kib": result["worker_peak_rss_kib"],
        "mail_rate": result["rate"],
    }


async def _populate_and_move(url: str, n: int, run: str, repeats: int) -> dict[str, Any]:
    redis: Any = await connect(url)
    try:
        planner = Planner(redis, default_offsets=bench_settings().reminder_offsets)
        events = registrations(n, run=run, days_ahead=10)
        began = time.perf_counter()
        for start in range(0, n, 100):
            await planner.apply([parse_event(e) for e in events[start : start + 100]])
        populate = time.perf_counter() - began
        active = int(await redis.scard(f"mailer:event:bench-{run}:regs"))
        times = []
        for version in range(1, repeats + 1):
            update = parse_event(moved_event(events[0], hours=version, version=version))
            began = time.perf_counter()
            plan = await planner.apply([update])
            times.append(time.perf_counter() - began)
            if plan.notes:
                raise RuntimeError(f"the update was not applied: {plan.notes[0].detail}")
        schedule = [m.decode() for m in await redis.zrange(SCHEDULE_KEY, 0, -1)]
        return {
            "populate_seconds": populate,
            "active_registrations": active,
            "times": times,
            "schedule": schedule,
        }
    finally:
        await redis.aclose()


def reschedule(redis: RedisServer, *, n: int, run: str, repeats: int = 5) -> dict[str, Any]:
    """Time Planner.apply of one event.updated that moves the start, with `n` registrations."""
    redis.client().flushall()
    result = asyncio.run(_populate_and_move(redis.url, n, run, repeats))
    times = result.pop("times")
    redis.client().flushall()  # no worker ran: the change notices it scheduled are never sent
    return {
        "n": n,
        "repeats": repeats,
        "first_s": times[0],
        "median_s": statistics.median(times),
        "max_s": max(times),
        **result,
    }


def enqueue_cli(redis: RedisServer, *, lines: int, run: str, timeout: float) -> dict[str, Any]:
    """Time `python -m mailer enqueue FILE` (a subprocess) for an NDJSON file of `lines` events."""
    redis.client().flushall()
    with tempfile.TemporaryDirectory(prefix="mailer-bench-") as tmp:
        path = Path(tmp) / "registrations.ndjson"
        with path.open("wb") as out:
            for start in range(0, lines, 10_000):
                chunk = registrations(min(10_000, lines - start), run=run, start=start)
                out.write(b"".join(orjson.dumps(e) + b"\n" for e in chunk))
        env = dict(os.environ, MAILER_REDIS_URL=redis.url)
        began = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-m", "mailer", "enqueue", str(path)],
                cwd=tmp,
                env=env,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise PhaseTimeout(f"mailer enqueue did not finish within {timeout:.0f}s") from None
        seconds = time.perf_counter() - began
        size = path.stat().st_size
    queued = int(redis.client().zcard("mailer:queue"))
    redis.client().flushall()
    if done.returncode != 0:
        raise RuntimeError(f"mailer enqueue exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return {
        "lines": lines,
        "file_bytes": size,
        "seconds": seconds,
        "events_per_second": lines / seconds,
        "jobs_queued": queued,
        "output": done.stderr.decode().strip().splitlines()[-1:],
    }
