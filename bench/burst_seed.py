"""Seeding for the `burst` phase: N registrations of one event with their confirmations sent, in a dump.rdb.

Once per N, into a Redis of its own: the registration.created events go through the
real `Planner.apply` in batches of 100, as a worker applies them; each batch's confirmations are
then claimed with the send path's claim script and recorded as sent with the Sender's own entry,
state and settle script (`Sender._entry`, `_state`, `_record`), the sink's reply as the detail,
and the send counters added once for all of them. That leaves what a worker leaves after sending
the confirmations (state `sent`, out of the due index, one `sent` entry each in the delivery log
with its indexes) without building and sending N mails first. The server then SAVEs a dump.rdb.

The fan-out's first two stages are also timed on their own on the seeded Redis (the fastest of
PASSES passes over all pages: the least disturbed): reading the pages
(`ScheduleStore.registrations_page`, SSCAN) and turning them into send jobs (`Scheduler.fan_out`
minus its page read). Compared across sizes, per registration, with the sends and the whole
burst, they show whether any stage grows faster than linearly.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.data import bench_settings, registrations
from bench.infra import RedisServer
from bench.sink import ACCEPTED_TEXT, Sink
from mailer.clock import ms, utc_now
from mailer.constants import LOG_STREAM, SEND_STATS_KEY
from mailer.content.render import Renderer
from mailer.delivery.sender import Sender
from mailer.delivery.smtp import SmtpTransport
from mailer.events import parse_event
from mailer.lifecycle.planner import Plan, Planner
from mailer.lifecycle.scheduler import FAN_OUT_SLICE, Scheduler
from mailer.settings import Settings
from mailer.state.deliverylog import DeliveryLog
from mailer.state.queue import connect_client
from mailer.state.schedule import ScheduleStore
from mailer.state.sendstats import attempt_fields
from mailer.state.store import registrations_key, schedule_member

APPLY_BATCH = 100  # events per Planner.apply, as the worker applies a publish_many batch
GENERATE = 10_000  # events built at a time (a million dicts at once would take gigabytes)
SEED_SEND_US = 2_000  # the send duration counted for each seeded confirmation
PASSES = 5


def event_id(run: str) -> str:
    return f"bench-{run}"


def seeded_settings(n: int, sink: Sink) -> Settings:
    """The bench settings with a delivery log long enough for every entry of the burst
    (a confirmation and a reminder per registration); the default cap would trim it."""
    return bench_settings().model_copy(update={"smtp_port": sink.port, "log_max_entries": log_max_entries(n)})


def log_max_entries(n: int) -> int:
    return max(1_000_000, 3 * n)


async def _mark_sent(sender: Sender, plan: Plan) -> None:
    """Record the batch's confirmations as sent, as the send path does once the sink said 250."""
    now = utc_now()
    claims = await sender.store.claim(plan.deliver_now, now_ms=ms(now), lease_ms=sender.lease_ms)
    writes = []
    for claim in claims:
        if claim.code != "claimed":
            raise RuntimeError(f"seeding: {claim.ref.id} could not be claimed ({claim.code})")
        reg = plan.registrations[claim.ref.registration_id]
        stored = plan.events[reg.event_id or ""]
        # The Sender's own entry and state for a sent message (private: the bench must write
        # exactly what the send path writes, not a copy of it that could drift).
        entry = sender._entry(claim, reg, stored, "sent", ACCEPTED_TEXT, now)
        writes.append((claim, sender._state("sent", claim, now), entry))
    await sender._record(writes, [])


async def _seed(url: str, settings: Settings, *, n: int, run: str, today: datetime) -> dict[str, Any]:
    redis = await connect_client(url)
    try:
        log = DeliveryLog(redis, max_entries=settings.log_max_entries, echo=None, worker="bench-seed")
        sender = Sender(
            redis=redis,
            settings=settings,
            transport=SmtpTransport(settings),
            renderer=Renderer(settings.template_dir),
            log=log,
        )
        planner = Planner(redis, default_offsets=settings.reminder_offsets, worker="bench-seed")
        began = time.perf_counter()
        for start in range(0, n, GENERATE):
            events = registrations(min(GENERATE, n - start), run=run, days_ahead=10, start=start, today=today)
            for at in range(0, len(events), APPLY_BATCH):
                plan = await planner.apply([parse_event(e) for e in events[at : at + APPLY_BATCH]])
                await log.write(plan.notes)
                await _mark_sent(sender, plan)
        async with redis.pipeline(transaction=False) as pipe:
            for field in attempt_fields(sender.transport.name, "2xx", SEED_SEND_US):
                pipe.hset(SEND_STATS_KEY, field, n)
            await pipe.execute()
        return {"seconds": time.perf_counter() - began}
    finally:
        await redis.aclose()


async def _fan_out_stages(url: str, settings: Settings, *, run: str) -> dict[str, Any]:
    """The fan-out's first two stages alone, PASSES times over all pages: µs per registration."""
    redis = await connect_client(url)
    try:
        pages = ScheduleStore(redis)
        scheduler = Scheduler(redis, batch_size=settings.batch_size)
        member = schedule_member(event_id(run), "reminder", "PT1H")
        passes = []
        for index in range(PASSES):
            # A due time of its own per pass: new job ids, so no pass finds its jobs enqueued.
            due_ms = ms(utc_now()) + 3_600_000 + index * 1000
            cursor, read_s, fan_s, slices, reached = 0, 0.0, 0.0, 0, 0
            while True:
                t0 = time.perf_counter()
                following, _ = await pages.registrations_page(event_id(run), cursor, count=FAN_OUT_SLICE)
                t1 = time.perf_counter()
                reached += await scheduler.fan_out(member, due_ms, cursor)
                fan_s += time.perf_counter() - t1
                read_s += t1 - t0
                slices += 1
                if following == 0:
                    break
                cursor = following
            passes.append({"pages_s": read_s, "fan_out_s": fan_s, "slices": slices, "reached": reached})
        n = passes[0]["reached"]
        pages_us = min(1e6 * p["pages_s"] / n for p in passes)
        fan_us = min(1e6 * p["fan_out_s"] / n for p in passes)
        return {
            "passes": passes,
            "registrations": n,
            "slice": FAN_OUT_SLICE,
            "batch_size": settings.batch_size,
            "pages_us_per_registration": pages_us,
            # fan_out reads its page again, then builds and enqueues the send jobs
            "send_jobs_us_per_registration": max(0.0, fan_us - pages_us),
        }
    finally:
        await redis.aclose()


def _in_redis(r: Any, key: str, n: int) -> dict[str, float]:
    """Redis's own time per member (INFO commandstats, the fastest of PASSES) for a full SSCAN
    in fan-out slices, and for SMEMBERS of the same set: a read linear by construction, whose
    cost per member still rises once the set no longer fits the CPU's caches. A pages stage
    that grows no more than SMEMBERS grows with the machine's memory, not with its algorithm."""
    best = {"sscan": math.inf, "smembers": math.inf}
    for _ in range(PASSES):
        for command in best:
            r.config_resetstat()
            if command == "sscan":
                cursor = None
                while cursor != 0:
                    cursor, _ = r.sscan(key, cursor or 0, count=FAN_OUT_SLICE)
            else:
                r.smembers(key)
            usec = float(r.info("commandstats")[f"cmdstat_{command}"]["usec"])
            best[command] = min(best[command], usec / n)
    return {
        "sscan_in_redis_us_per_registration": best["sscan"],
        "smembers_in_redis_us_per_registration": best["smembers"],
    }


def seed(directory: Path, sink: Sink, *, n: int, run: str) -> tuple[Path, dict[str, Any]]:
    """Seed N registrations with their confirmations sent; (the dump.rdb, what it took)."""
    settings = seeded_settings(n, sink)
    redis = RedisServer(directory / "seed")
    try:
        redis.start()
        empty = redis.used_memory()
        today = utc_now()
        result = asyncio.run(_seed(redis.url, settings, n=n, run=run, today=today))
        result["today"] = today.isoformat()
        r = redis.client()
        seeded = redis.used_memory()
        result.update(
            n=n,
            used_memory_empty=empty,
            used_memory=seeded,
            bytes_per_registration=(seeded - empty) / n,
            log_entries=int(r.xlen(LOG_STREAM)),
            enrolled=int(r.scard(registrations_key(event_id(run)))),
            keys=int(r.dbsize()),
        )
        if result["enrolled"] != n or result["log_entries"] != n:
            raise RuntimeError(f"seeding left {result['enrolled']} enrolled, {result['log_entries']} logged")
        began = time.perf_counter()
        r.save()
        result["save_seconds"] = time.perf_counter() - began
        rdb = directory / f"burst-{n}.rdb"
        shutil.move(redis.directory / "dump.rdb", rdb)
        result["rdb_bytes"] = rdb.stat().st_size
        # Last, on this throw-away server: the passes leave their send jobs behind.
        result["stages"] = asyncio.run(_fan_out_stages(redis.url, settings, run=run))
        result["stages"].update(_in_redis(r, registrations_key(event_id(run)), n))
    finally:
        redis.stop()
    return rdb, result
