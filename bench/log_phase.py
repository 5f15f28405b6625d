"""The `log` phase: the delivery log filled to 100 000 and 1 000 000 entries, then queried.

The log is filled through `DeliveryLog.write`, which runs the same Lua function (`log_append`)
the send path's step script runs for every mail: the same entry layout, indexes and counters,
without the SMTP round trips that would make a million entries take ten minutes. The shape:
each registration gets a confirmation and a reminder sent, one in fifty a retry before its
confirmation went out, one in two hundred a failed reminder; five events, so at a million
entries one event has about 100 000 registrations.

Measured per size: Redis memory per entry (every index and counter included), the first page
(50 entries) of every kind of query, a registration's timeline, and stats of one event; each
the median of REPEATS runs. Then the dashboard as ops staff open it: a real `mailer serve`
against the filled Redis, its overview (the whole page and the live panel it re-reads every
5 s), a search by address and a timeline page, timed over HTTP from request to last byte. And
the step script alone with indexing on and off (same run).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx

from bench.infra import RedisServer, _stop_process
from bench.intake_phase import start_serve
from mailer.clock import from_ms, iso, ms, utc_now
from mailer.ops.log_reading import stats, timeline
from mailer.state.deliverylog import DeliveryLog, LogEntry, append_parts
from mailer.state.logquery import LogFilter, log_page
from mailer.state.message_states import MessageStore
from mailer.state.messages import MessageRef, MessageState
from mailer.state.queue import connect_client
from mailer.state.redis_types import RedisClient

EVENTS = 5
REPEATS = 21
BATCH = 2000
STEPS = 20_000


def _entries_of(i: int, start_ms: int) -> list[LogEntry]:
    """Registration i's entries: about two, at times spread over the fill's hour."""
    registration = f"reg-{i:07d}"
    event = f"evt-{i % EVENTS}"
    recipient = f"person{i}@example.org"
    at = iso(from_ms(start_ms + i))
    common = {"registration_id": registration, "event_id": event, "recipient": recipient, "worker": "bench-1"}
    out = []
    if i % 50 == 0:
        out.append(
            LogEntry(
                ts=at,
                status="retrying",
                message_id=f"{registration}/confirmation",
                attempt=1,
                smtp_code=451,
                enhanced_code="4.7.1",
                detail="451 4.7.1 greylisted, try again later",
                **common,
            )
        )
    out.append(
        LogEntry(
            ts=at,
            status="sent",
            message_id=f"{registration}/confirmation",
            attempt=2 if i % 50 == 0 else 1,
            smtp_code=250,
            enhanced_code="2.0.0",
            detail="250 2.0.0 Ok: queued",
            locale="de",
            message_id_header=f"confirmation.{i:024x}@stadt.example",
            sequence=0,
            latency_ms=40 + i % 200,
            **common,
        )
    )
    reminder = "failed" if i % 200 == 0 else "sent"
    out.append(
        LogEntry(
            ts=at,
            status=reminder,
            message_id=f"{registration}/reminder/P1D/20261209T170000Z",
            attempt=1,
            smtp_code=550 if reminder == "failed" else 250,
            enhanced_code="5.1.1" if reminder == "failed" else "2.0.0",
            detail="550 5.1.1 user unknown" if reminder == "failed" else "250 2.0.0 Ok: queued",
            locale="de",
            message_id_header=f"reminder.{i:024x}@stadt.example",
            sequence=0,
            latency_ms=40 + i % 300 if reminder == "sent" else None,
            **common,
        )
    )
    return out


async def _fill(redis: RedisClient, target: int, start_ms: int, begun: int) -> tuple[int, int]:
    """Append until the log holds `target` entries; (entries, registrations) written so far."""
    log = DeliveryLog(redis, max_entries=10_000_000, echo=None)
    written = await redis.xlen("mailer:log") if begun else 0
    i = begun
    while written < target:
        batch: list[LogEntry] = []
        while len(batch) < BATCH and written + len(batch) < target:
            batch += _entries_of(i, start_ms)
            i += 1
        batch = batch[: target - written]
        await log.write(batch)
        written += len(batch)
    return written, i


async def _median_ms(call: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(REPEATS):
        begin = time.perf_counter()
        await call()
        times.append((time.perf_counter() - begin) * 1000)
    return round(statistics.median(times), 2)


def _queries(registrations: int) -> dict[str, LogFilter]:
    some = registrations // 2
    hour_ago = utc_now() - timedelta(hours=1)
    return {
        "recipient": LogFilter(recipient=f"PERSON{some}@example.org"),
        "registration": LogFilter(registration=f"reg-{some:07d}"),
        "message": LogFilter(message=f"reg-{some:07d}/confirmation"),
        "event": LogFilter(event="evt-1"),
        "status failed": LogFilter(status="failed"),
        "kind reminder": LogFilter(kind="reminder"),
        "last hour": LogFilter(since=hour_ago),
        "event's failed reminders, last hour": LogFilter(
            event="evt-0", status="failed", kind="reminder", since=hour_ago
        ),
        "event's retries (kind confirmation)": LogFilter(
            event="evt-0", status="retrying", kind="confirmation"
        ),
        "no filter": LogFilter(),
    }


async def _measure(redis: RedisClient, registrations: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, flt in _queries(registrations).items():
        page = await log_page(redis, flt, limit=50)
        out[name] = {
            "ms": await _median_ms(lambda f=flt: log_page(redis, f, limit=50)),
            "found": len(page.entries),
        }
    some = f"reg-{registrations // 2:07d}"
    out["timeline"] = {"ms": await _median_ms(lambda: timeline(redis, some))}
    out["stats one event"] = {"ms": await _median_ms(lambda: stats(redis, LogFilter(event="evt-0")))}
    out["stats overall"] = {"ms": await _median_ms(lambda: stats(redis, LogFilter()))}
    return out


def _dashboard_pages(registrations: int) -> dict[str, str]:
    some = registrations // 2
    return {
        "overview": "/",
        "overview live panel": "/?part=live",
        "search by address": f"/log?q=person{some}%40example.org",
        "timeline": f"/timeline/reg-{some:07d}",
    }


async def _dashboard(server: RedisServer, directory: Path, registrations: int) -> dict[str, Any]:
    """Each dashboard page's median and slowest time over REPEATS requests, after one warm-up
    (the first request compiles the page's templates)."""
    process, base = start_serve(server, directory, token=None)
    out: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            for name, path in _dashboard_pages(registrations).items():
                (await client.get(path)).raise_for_status()
                times = []
                for _ in range(REPEATS):
                    begin = time.perf_counter()
                    answer = await client.get(path)
                    times.append((time.perf_counter() - begin) * 1000)
                    answer.raise_for_status()
                out[name] = {"ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}
    finally:
        _stop_process(process, 10)
    return out


async def _step_rate(redis: RedisClient, *, indexed: bool) -> float:
    """Step script calls per second (record an outcome with its log entry, hand the next over)."""
    store = MessageStore(redis)
    now = utc_now()
    begin = time.perf_counter()
    for i in range(STEPS):
        ref = MessageRef(f"step-{int(indexed)}-{i}", "confirmation")
        entry = _entries_of(i, ms(now))[-2]
        state = MessageState("sent", 1, ms(now), ms(now), 0)
        await store.step((ref, state, 1, append_parts(entry, max_entries=10_000_000, indexed=indexed)), None)
    return STEPS / (time.perf_counter() - begin)


async def _run(server: RedisServer, sizes: list[int], directory: Path) -> dict[str, Any]:
    redis = await connect_client(server.url)
    result: dict[str, Any] = {"sizes": {}}
    try:
        await redis.flushdb()
        base = server.used_memory()
        start_ms = ms(utc_now()) - 3_600_000 + 1
        begun = 0
        for size in sorted(sizes):
            fill_begin = time.perf_counter()
            written, begun = await _fill(redis, size, start_ms, begun)
            fill_s = time.perf_counter() - fill_begin
            used = server.used_memory()
            result["sizes"][str(size)] = {
                "entries": written,
                "registrations": begun,
                "fill_seconds": round(fill_s, 1),
                "bytes_per_entry": round((used - base) / written, 1),
                "queries": await _measure(redis, begun),
                "dashboard": await _dashboard(server, directory / f"serve-{size}", begun),
            }
        rates = {}
        for indexed in (False, True, False, True):
            rates.setdefault("on" if indexed else "off", []).append(await _step_rate(redis, indexed=indexed))
        result["step_script"] = {
            "calls_per_s_indexing_off": round(max(rates["off"])),
            "calls_per_s_indexing_on": round(max(rates["on"])),
        }
    finally:
        await redis.aclose()
    return result


def log_phase(redis: RedisServer, directory: Path, *, sizes: list[int]) -> dict[str, Any]:
    return asyncio.run(_run(redis, sizes, directory))
