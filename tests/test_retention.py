"""Retention: what mailer stores about the attendees of an event is gone some days after it ended."""

from __future__ import annotations

import asyncio
import zlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailer.constants import LOG_STREAM
from mailer.durations import parse_offsets
from mailer.errors import ConfigError
from mailer.events import parse_event
from mailer.intake.client import MailerClient
from mailer.lifecycle.planner import Planner
from mailer.settings import load_settings
from mailer.state.deliverylog import DeliveryLog, LogEntry
from mailer.state.queue import connect_client
from mailer.state.retention import RETENTION_LOCK_KEY, WALK_PAUSE_MS, Retention, RetentionReport
from tests.clocks import SettableClock
from tests.conftest import BERLIN, log_until, make_event

DAY = timedelta(days=1)


async def everything(redis: Any) -> dict[str, str]:
    """Every key in Redis with all it holds, as text: what a scan for personal data reads."""
    found: dict[str, str] = {}
    async for raw in redis.scan_iter(count=1000):
        kind = (await redis.type(raw)).decode()
        if kind == "string":
            value: Any = await redis.get(raw)
        elif kind == "hash":
            value = await redis.hgetall(raw)
        elif kind == "set":
            value = await redis.smembers(raw)
        elif kind == "zset":
            value = await redis.zrange(raw, 0, -1, withscores=True)
        elif kind == "list":
            value = await redis.lrange(raw, 0, -1)
        elif kind == "stream":
            value = await redis.xrange(raw)
        else:
            value = kind
        found[raw.decode()] = _text(value)
    return found


def _text(value: Any) -> str:
    """Stored bytes as the text they are (so "Müller" is found), inside any structure."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return " ".join(f"{_text(k)}={_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple | set):
        return " ".join(_text(v) for v in value)
    return str(value)


def mentions(stored: dict[str, str], *needles: str, log: bool = True) -> dict[str, str]:
    """The keys whose name or content holds any of `needles`, in any letter case (without the
    delivery log and its indexes if not `log`)."""
    lowered = [n.lower() for n in needles]
    return {
        key: value[:200]
        for key, value in stored.items()
        if any(n in key.lower() or n in value.lower() for n in lowered)
        and (log or not key.startswith(LOG_STREAM))
    }


def created(event_id: str, registration_id: str, email: str, name: str, starts: datetime) -> Any:
    return parse_event(
        make_event(
            event_id=f"in-{zlib.crc32(registration_id.encode())}",
            registration_id=registration_id,
            email=email,
            name=name,
            starts_at=starts,
            occurred_at=starts - 30 * DAY,
            event={"id": event_id, "title": f"Abend {event_id}"},
            registration_deadline=None,
        )
    )


def cancelled(registration_id: str, at: datetime) -> Any:
    return parse_event(
        {
            "type": "registration.cancelled",
            "id": f"in-{zlib.crc32(registration_id.encode())}-c",
            "occurred_at": at.isoformat(),
            "registration": {"id": registration_id},
        }
    )


async def walk(retention: Retention, clock: SettableClock, *, walks: int = 1) -> list[RetentionReport]:
    """Run retention until `walks` walks through the keyspace are done (resting in between)."""
    reports: list[RetentionReport] = []
    while sum(r.walk_done for r in reports) < walks:
        assert len(reports) < 500, "retention never finished its walk"
        report = await retention.run()
        if report.resting:
            clock.advance(timedelta(milliseconds=WALK_PAUSE_MS))
        reports.append(report)
    return reports


async def plan_three_events(redis: Any, clock: SettableClock) -> tuple[datetime, datetime, datetime]:
    """An event that will have ended 91 days ago, one 80 days ago, one far ahead; with
    registrations, a cancellation, a cancellation that never met its registration, and log
    entries naming the attendees. Returns the three start times."""
    base = clock.now.astimezone(BERLIN).replace(microsecond=0)
    old, recent, ahead = base + 3 * DAY, base + 14 * DAY, base + 400 * DAY
    events = [
        created("evt-old", f"old-{i}", f"Old.{i}@Example.org", f"Alte Person {i}", old) for i in range(12)
    ]
    events += [
        created("evt-recent", f"rec-{i}", f"recent.{i}@example.org", f"Neu {i}", recent) for i in range(3)
    ]
    events += [
        created("evt-ahead", f"far-{i}", f"ahead.{i}@example.org", f"Weit {i}", ahead) for i in range(3)
    ]
    planner = Planner(redis, default_offsets=parse_offsets("P1D,PT1H"), clock=clock)
    await planner.apply(events)
    await planner.apply([cancelled("old-3", old - 2 * DAY), cancelled("ghost-1", old - 2 * DAY)])
    log = DeliveryLog(redis, max_entries=10_000, echo=None, clock=clock)
    await log.write(
        [
            LogEntry(
                ts=log.now(),
                status="sent",
                message_id=f"old-{i}/confirmation",
                registration_id=f"old-{i}",
                event_id="evt-old",
                recipient=f"old.{i}@example.org",
            )
            for i in range(12)
        ]
    )
    return old, recent, ahead


async def test_nothing_of_an_event_that_ended_longer_ago_than_the_retention_is_left(redis_url: str) -> None:
    """91 days after an event ended (retention 90), every key and value in Redis is scanned: no
    address, name, registration id or event id of it is left anywhere (registrations, message
    states, due index, schedule, the event's sets; the log apart, below); an event
    that ended 80 days ago and one ahead keep everything; every `seen:` key now expires."""
    redis = await connect_client(redis_url)
    try:
        clock = SettableClock()
        old, _recent, _ahead = await plan_three_events(redis, clock)
        before = await everything(redis)
        assert mentions(before, "old.5@example.org", "Alte Person 5", "evt-old", "old-3", "ghost-1")
        clock.set(old + timedelta(hours=2, minutes=30) + 91 * DAY)
        retention = Retention(redis, days=90, clock=clock, scan_count=5)
        reports = await walk(retention, clock)
        after = await everything(redis)
        left = mentions(after, "old.", "alte person", "evt-old", "old-", "ghost-1", log=False)
        assert not left, sorted(left)
        for i in range(3):
            assert f"recent.{i}@example.org" in after[f"mailer:reg:rec-{i}"]
            assert f"ahead.{i}@example.org" in after[f"mailer:reg:far-{i}"]
        assert {"mailer:event:evt-recent", "mailer:event:evt-ahead:regs"} <= set(after)
        assert "evt-ahead|reminder|P1D" in after["mailer:schedule"]
        seen = [key for key in after if key.startswith("mailer:seen:")]
        assert seen
        for key in seen:
            assert 0 < await redis.pttl(key) <= 90 * DAY / timedelta(milliseconds=1)
        assert sum(r.registrations for r in reports) == 13  # 12 registrations and the lone cancellation
        assert sum(r.events for r in reports) == 1
    finally:
        await redis.aclose()


async def test_each_run_does_a_bounded_slice(redis_url: str) -> None:
    """A run looks at one SCAN page of keys, not the whole keyspace: with pages of 5 keys the
    same cleanup takes many runs, none of which removes more than its page held."""
    redis = await connect_client(redis_url)
    try:
        clock = SettableClock()
        old, _, _ = await plan_three_events(redis, clock)
        keys = len(await everything(redis))
        clock.set(old + 92 * DAY)
        reports = await walk(Retention(redis, days=90, clock=clock, scan_count=5), clock)
        assert len(reports) > keys // 20
        assert max(r.scanned for r in reports) < 20
        assert all(r.registrations <= r.scanned for r in reports)
    finally:
        await redis.aclose()


async def test_a_run_already_under_way_is_not_doubled(redis_url: str) -> None:
    """While one worker's run holds the lock, another's does nothing (a walk is counted once)."""
    redis = await connect_client(redis_url)
    try:
        clock = SettableClock()
        old, _, _ = await plan_three_events(redis, clock)
        clock.set(old + 92 * DAY)
        await redis.set(RETENTION_LOCK_KEY, "other-worker", px=30_000)
        report = await Retention(redis, days=90, clock=clock).run()
        assert report.busy
        assert await redis.exists("mailer:reg:old-1")
        await redis.delete(RETENTION_LOCK_KEY)
        assert (await Retention(redis, days=90, clock=clock).run()).registrations > 0
    finally:
        await redis.aclose()


async def test_the_worker_removes_an_ended_event_on_its_tick(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> None:
    """Through a running worker: the confirmation goes out; once the worker's clock is 91 days past
    the event's end, its per-second tick removes the registration, with no command run."""
    clock = SettableClock()
    settings = make_settings(redis_url=redis_url, smtp_host=smtp_server.host, smtp_port=smtp_server.port)
    await running_worker(settings, clock=clock)
    start = (clock.now + 2 * DAY).replace(microsecond=0)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(starts_at=start, reminder_offsets=[]))
    await log_until(redis_url, lambda entries: any(e.status == "sent" for e in entries))
    redis = await connect_client(redis_url)
    try:
        assert mentions(await everything(redis), "maria.mueller@example.org")
        clock.set(start + 92 * DAY)
        deadline = asyncio.get_running_loop().time() + 15
        while left := mentions(await everything(redis), "maria.mueller@example.org", "reg-1001", log=False):
            assert asyncio.get_running_loop().time() < deadline, left
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()


async def test_log_entries_older_than_the_retention_are_trimmed_with_their_indexes(redis_url: str) -> None:
    """Retention trims the delivery log too: 91 days on, no entry or index names an attendee
    of the ended event."""
    redis = await connect_client(redis_url)
    try:
        clock = SettableClock()
        old, _, _ = await plan_three_events(redis, clock)
        clock.set(old + 92 * DAY)
        await walk(Retention(redis, days=90, clock=clock, scan_count=5), clock)
        left = mentions(await everything(redis), "old.", "evt-old", "old-")
        assert not left, sorted(left)
    finally:
        await redis.aclose()


def test_retention_days_is_bounded_and_not_shorter_than_a_messages_life(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAILER_RETENTION_DAYS: 1 to 3650 days, and at least MAILER_MESSAGE_TTL; a bad value is
    one line naming the setting(s)."""
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    assert load_settings().retention_days == 90
    with pytest.raises(ConfigError, match=r"^MAILER_RETENTION_DAYS: .*greater than or equal to 1"):
        load_settings(retention_days=0)
    with pytest.raises(ConfigError, match=r"^MAILER_RETENTION_DAYS: .*less than or equal to 3650"):
        load_settings(retention_days=3651)
    with pytest.raises(ConfigError, match=r"^MAILER_RETENTION_DAYS, MAILER_MESSAGE_TTL: .*shorter"):
        load_settings(retention_days=2, message_ttl=timedelta(days=3))
    assert load_settings(retention_days=2, message_ttl=timedelta(days=2)).retention_days == 2
