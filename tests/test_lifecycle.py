"""Reminders, cancellations and changes: the whole life of a registration, against real servers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import icalendar

from mailer.durations import Offset
from mailer.intake.client import MailerClient
from mailer.lifecycle.planner import Planner
from mailer.state.queue import connect
from mailer.state.retention import RETENTION_LOCK_KEY
from tests.clocks import SettableClock
from tests.conftest import BERLIN, log_until, make_event, settled, wait_for
from tests.test_confirmation import log_entries


def kinds(server: Any, address: str) -> list[str]:
    return [r.message["X-Mailer-Kind"] for r in server.handler.to(address)]


def calendar_of(received: Any) -> Any:
    part = next(p for p in received.message.iter_attachments() if p.get_content_type() == "text/calendar")
    return icalendar.Calendar.from_ical(part.get_content())


async def clocked_worker(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> tuple[Any, SettableClock]:
    """An in-process worker whose time is a SettableClock the test moves."""
    clock = SettableClock()
    settings = make_settings(redis_url=redis_url, smtp_host=smtp_server.host, smtp_port=smtp_server.port)
    return await running_worker(settings, clock=clock), clock


async def ticked(worker: Any) -> None:
    """Wait until a per-second tick that started after this call has finished: whatever was due
    at the clock's time has been fanned out. With nothing else queued, ticks are the jobs."""
    done = worker.jobs_complete
    await wait_for(lambda: worker.jobs_complete >= done + 2, 10)


async def fanned_out(redis_url: str, clock: SettableClock) -> None:
    """Wait until nothing is due in the schedule at the clock's time and no fan-out or send job
    is queued or running: whatever the due entries called for has been sent or found empty."""
    from mailer.clock import ms

    redis = await connect(redis_url)
    try:
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            due = await redis.zcount("mailer:schedule", "-inf", ms(clock.now))
            jobs = [k async for k in redis.scan_iter(match="arq:job:*") if not k.startswith(b"arq:job:cron:")]
            if not due and not jobs:
                return
            assert asyncio.get_running_loop().time() < deadline, (due, jobs[:5])
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


async def test_reminder_falls_due_and_carries_the_join_link(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> None:
    """Each reminder goes out when the clock reaches its time, not a second before; the one an
    hour before carries the join link."""
    worker, clock = await clocked_worker(redis_url, smtp_server, make_settings, running_worker)
    start = (clock.now + timedelta(days=3)).replace(microsecond=0)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(starts_at=start, reminder_offsets=["PT1H", "P1D"]))
    to_maria = "maria.mueller@example.org"
    await wait_for(lambda: kinds(smtp_server, to_maria) == ["confirmation"])
    clock.set(start - timedelta(days=1, seconds=1))  # a second before the day-before reminder
    await ticked(worker)
    assert kinds(smtp_server, to_maria) == ["confirmation"]
    clock.set(start - timedelta(days=1))
    await wait_for(lambda: kinds(smtp_server, to_maria) == ["confirmation", "reminder"], 15)
    clock.set(start - timedelta(hours=1))
    await wait_for(lambda: kinds(smtp_server, to_maria) == ["confirmation", "reminder", "reminder"], 15)
    day_before, hour_before = (m.message for m in smtp_server.handler.to(to_maria)[1:])
    assert "morgen" in day_before["Subject"]
    assert "https://meet.example.org/weltoffen" in hour_before.get_body(("plain",)).get_content()
    assert "einer Stunde" in hour_before["Subject"]


async def test_late_registration_gets_no_reminder_it_registered_after(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Registered 30 minutes before the start: a confirmation only, no day-before or hour-before mail."""
    await mail_worker()
    start = datetime.now(UTC) + timedelta(minutes=30)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(starts_at=start))
    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    redis = await connect(redis_url)
    try:
        assert await redis.zcard("mailer:schedule") == 0
    finally:
        await redis.aclose()


async def test_registration_cancelled_sends_notice_and_stops_reminders(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> None:
    """A cancellation confirms itself with a METHOD:CANCEL calendar; its reminder is not sent
    when the clock passes the reminder's time."""
    _worker, clock = await clocked_worker(redis_url, smtp_server, make_settings, running_worker)
    start = (clock.now + timedelta(days=3)).replace(microsecond=0)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(starts_at=start, reminder_offsets=["PT1H"]))
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
        await client.publish(
            {
                "type": "registration.cancelled",
                "id": "evt-cancel",
                "occurred_at": datetime.now(UTC).isoformat(),
                "registration": {"id": "reg-1001"},
            }
        )
    await wait_for(lambda: len(smtp_server.handler.received) == 2)
    clock.set(start - timedelta(minutes=30))  # past the reminder's time
    await fanned_out(redis_url, clock)
    assert kinds(smtp_server, "maria.mueller@example.org") == ["confirmation", "registration_cancelled"]
    confirmation, notice = smtp_server.handler.received
    cancel = calendar_of(notice)
    assert str(cancel["METHOD"]) == "CANCEL"
    first, second = next(iter(calendar_of(confirmation).walk("VEVENT"))), next(iter(cancel.walk("VEVENT")))
    assert str(first["UID"]) == str(second["UID"])
    assert int(second["SEQUENCE"]) > int(first["SEQUENCE"])


async def test_event_update_moves_the_calendar_entry_and_notifies(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A time change: each active registrant gets a notice in their locale; same UID, higher SEQUENCE."""
    await mail_worker()
    start = datetime.now(BERLIN).replace(microsecond=0) + timedelta(days=10)
    base = make_event(starts_at=start)
    async with MailerClient(redis_url) as client:
        await client.publish_many(
            [
                base,
                make_event(
                    starts_at=start,
                    event_id="evt-2",
                    registration_id="reg-2",
                    email="john@example.org",
                    name="John Smith",
                    locale="en",
                ),
            ]
        )
        await wait_for(lambda: len(smtp_server.handler.received) == 2)
        moved = dict(
            base["event"],
            starts_at=(start + timedelta(hours=1)).isoformat(),
            ends_at=(start + timedelta(hours=3, minutes=30)).isoformat(),
        )
        update = {
            "type": "event.updated",
            "id": "evt-upd",
            "occurred_at": datetime.now(UTC).isoformat(),
            "event": moved,
        }
        await client.publish(update)
        await wait_for(lambda: len(smtp_server.handler.received) == 4)
        # Only the description changes: nothing an attendee sees, nothing sent.
        quiet = dict(
            update,
            id="evt-upd-2",
            occurred_at=datetime.now(UTC).isoformat(),
            event=dict(moved, description="Neue Beschreibung"),
        )
        await client.publish(quiet)
        # Replaying the first update changes nothing.
        await client.publish(dict(update, id="evt-upd"))
    # Both are applied (each leaves an `ignored` entry) and nothing is left to send: then count.
    await log_until(
        redis_url,
        lambda log: (
            {("evt-upd-2", False), ("evt-upd", True)}
            <= {(e.source_event, "replay" in e.detail) for e in log if e.status == "ignored"}
        ),
    )
    await settled(redis_url)
    assert len(smtp_server.handler.received) == 4
    german = smtp_server.handler.to("maria.mueller@example.org")
    english = smtp_server.handler.to("john@example.org")
    assert german[1].message["X-Mailer-Kind"] == "event_changed"
    assert "Änderung" in german[1].message["Subject"]
    assert english[1].message["X-Mailer-Kind"] == "event_changed"
    before = next(iter(calendar_of(german[0]).walk("VEVENT")))
    after = next(iter(calendar_of(german[1]).walk("VEVENT")))
    assert str(before["UID"]) == str(after["UID"])
    assert int(after["SEQUENCE"]) > int(before["SEQUENCE"])
    assert after.decoded("DTSTART") == start + timedelta(hours=1)
    redis = await connect(redis_url)
    try:
        due = dict(await redis.zrange("mailer:schedule", 0, -1, withscores=True))
    finally:
        await redis.aclose()
    day_before = Offset.parse("P1D").before(start + timedelta(hours=1), "Europe/Berlin")
    assert due[b"weltoffen|reminder|P1D"] == day_before.timestamp() * 1000


async def test_event_cancelled_notifies_every_active_registrant(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """event.cancelled: a notice with a CANCEL calendar to everyone still registered; reminders removed."""
    await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish_many(
            [
                make_event(event_id=f"e{i}", registration_id=f"r{i}", email=f"p{i}@example.org")
                for i in range(5)
            ]
        )
        await wait_for(lambda: len(smtp_server.handler.received) == 5)
        await client.publish(
            {
                "type": "event.cancelled",
                "id": "evt-x",
                "occurred_at": datetime.now(UTC).isoformat(),
                "event": {"id": "weltoffen"},
            }
        )
    await wait_for(lambda: len(smtp_server.handler.received) == 10)
    notices = [r for r in smtp_server.handler.received if r.message["X-Mailer-Kind"] == "event_cancelled"]
    assert sorted(r.rcpt_tos[0] for r in notices) == [f"p{i}@example.org" for i in range(5)]
    assert str(calendar_of(notices[0])["METHOD"]) == "CANCEL"
    redis = await connect(redis_url)
    try:
        assert await redis.zcard("mailer:schedule") == 0
    finally:
        await redis.aclose()


async def test_cancellation_before_its_registration_ends_the_same_as_in_order(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Out of order: the later occurred_at wins; the cancellation notice goes out, no confirmation."""
    await mail_worker()
    created_at = datetime.now(UTC) - timedelta(minutes=5)
    async with MailerClient(redis_url) as client:
        await client.publish(
            {
                "type": "registration.cancelled",
                "id": "c1",
                "occurred_at": datetime.now(UTC).isoformat(),
                "registration": {"id": "reg-1001"},
            }
        )
        # The cancellation must be applied before the registration is published.
        await log_until(redis_url, lambda log: any(e.source_event == "c1" for e in log))
        await client.publish(make_event(occurred_at=created_at))
    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    await settled(redis_url)
    assert kinds(smtp_server, "maria.mueller@example.org") == ["registration_cancelled"]
    entries = await log_entries(redis_url)
    assert any(e.status == "skipped" and e.kind == "confirmation" for e in entries)


async def test_dry_run_reports_and_changes_nothing(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """--dry-run's planner pass counts what would happen and writes nothing to Redis."""
    settings = await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    await settled(redis_url)  # the snapshot must not race the worker's last writes
    redis = await connect(redis_url)
    try:
        # The worker's per-second tick holds its retention lock for a moment: not the planner's.
        transient = {RETENTION_LOCK_KEY.encode()}

        async def keys() -> list[bytes]:
            return sorted(k for k in await redis.keys("mailer:*") if k not in transient)

        before = await keys()
        snapshot = {k: await redis.type(k) for k in before}
        from mailer.events import parse_event

        update = {
            "type": "event.cancelled",
            "id": "dry",
            "occurred_at": datetime.now(UTC).isoformat(),
            "event": {"id": "weltoffen"},
        }
        plan = await Planner(redis, default_offsets=settings.reminder_offsets).apply(
            [parse_event(update)], dry_run=True
        )
        assert plan.counts[("send", "event_cancelled", "*")] == 1
        assert plan.samples[("send", "event_cancelled")] == ["maria.mueller@example.org"]
        after = await keys()
        assert after == before
        assert {k: await redis.type(k) for k in after} == snapshot
        assert not await redis.exists("mailer:seen:dry")
    finally:
        await redis.aclose()


def test_one_day_reminder_keeps_local_time_across_the_dst_change() -> None:
    """10:00 Berlin on the Sunday clocks go forward: P1D is 10:00 on Saturday, PT24H is 09:00."""
    year = datetime.now(UTC).year + 1
    last_sunday = max(
        datetime(year, 3, d, tzinfo=BERLIN) for d in range(25, 32) if datetime(year, 3, d).weekday() == 6
    )
    start = last_sunday.replace(hour=10)
    day_before = Offset.parse("P1D").before(start, "Europe/Berlin").astimezone(BERLIN)
    assert (day_before.day, day_before.hour) == (last_sunday.day - 1, 10)
    exact = Offset.parse("PT24H").before(start, "Europe/Berlin").astimezone(BERLIN)
    assert exact.hour == 9


async def test_an_older_update_arriving_late_changes_nothing(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Updates out of order: the newer occurred_at wins, the older one is ignored and sends nothing."""
    await mail_worker()
    start = datetime.now(BERLIN).replace(microsecond=0) + timedelta(days=10)
    base = make_event(starts_at=start)
    now = datetime.now(UTC) + timedelta(seconds=1)  # strictly after the registration's occurred_at
    newer = dict(base["event"], location="Rathaus")
    older = dict(base["event"], location="Stadtbibliothek")
    async with MailerClient(redis_url) as client:
        await client.publish(base)
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
        await client.publish(
            {"type": "event.updated", "id": "u2", "occurred_at": now.isoformat(), "event": newer}
        )
        await wait_for(lambda: len(smtp_server.handler.received) == 2)
        await client.publish(
            {
                "type": "event.updated",
                "id": "u1",
                "occurred_at": (now - timedelta(minutes=1)).isoformat(),
                "event": older,
            }
        )
    await log_until(redis_url, lambda log: any(e.status == "ignored" and e.source_event == "u1" for e in log))
    await settled(redis_url)
    assert len(smtp_server.handler.received) == 2
    notice = smtp_server.handler.received[1].message.get_body(("plain",)).get_content()
    assert "Rathaus" in notice
    entries = await log_entries(redis_url)
    assert any(e.status == "ignored" and e.source_event == "u1" for e in entries)
