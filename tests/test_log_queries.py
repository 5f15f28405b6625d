"""The delivery log's queries and counters, checked against a brute-force pass over the same entries."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.clock import utc_now
from mailer.state.deliverylog import DeliveryLog, LogEntry, kind_of
from mailer.state.logquery import LogFilter, iter_log, log_counts, log_page, read_log
from mailer.state.queue import connect_client
from mailer.state.store import registration_key

NOW = utc_now().replace(microsecond=0)
EVENTS = ["evt-1", "evt-2", ""]
STATUSES = ["planned", "sent", "retrying", "held", "failed", "skipped", "rejected", "redriven"]
KINDS = ["confirmation", "reminder", "registration_cancelled"]
REGISTRATIONS = ["reg-1", "reg-2", "reg-3"]
ADDRESSES = ["maria@example.org", "Jo@Example.org", ""]
# Booking codes as registration systems write them: spaces, slashes and umlauts included.
REFERENCES = ["B-2026-0042", "Anmeldung 7/12", "Bürger 1", ""]


@st.composite
def log_entry(draw: Any) -> LogEntry:
    registration = draw(st.sampled_from(REGISTRATIONS))
    kind = draw(st.sampled_from(KINDS))
    with_message = draw(st.booleans())
    return LogEntry(
        # Writers' clocks disagree by up to half a minute; the log keeps the order it got.
        ts=(NOW + timedelta(milliseconds=draw(st.integers(-30_000, 30_000)))).isoformat(),
        status=draw(st.sampled_from(STATUSES)),
        message_id=f"{registration}/{kind}" if with_message else "",
        kind="" if with_message else draw(st.sampled_from(["", *KINDS])),
        registration_id=registration if draw(st.booleans()) else "",
        event_id=draw(st.sampled_from(EVENTS)),
        recipient=draw(st.sampled_from(ADDRESSES)),
        attempt=draw(st.integers(0, 3)),
        detail=draw(st.text(max_size=10)),
        latency_ms=draw(st.none() | st.integers(0, 100_000)),
        reference=draw(st.sampled_from(REFERENCES)),
    )


@st.composite
def log_filter(draw: Any) -> LogFilter:
    def maybe(values: list[str]) -> str | None:
        return draw(st.none() | st.sampled_from(values))

    since = draw(st.none() | st.integers(-40_000, 40_000))
    until = draw(st.none() | st.integers(-40_000, 40_000))
    return LogFilter(
        recipient=maybe(["maria@example.org", "JO@example.org", "nobody@example.org"]),
        registration=maybe(REGISTRATIONS),
        reference=maybe([r for r in REFERENCES if r] + ["B-2026-0043"]),
        message=maybe([f"{r}/{k}" for r in REGISTRATIONS for k in KINDS]),
        event=maybe([e for e in EVENTS if e]),
        status=maybe(STATUSES),
        kind=maybe(KINDS),
        since=None if since is None else NOW + timedelta(milliseconds=since),
        until=None if until is None else NOW + timedelta(milliseconds=until),
    )


async def everything_oldest_first(redis: Any) -> list[LogEntry]:
    """The brute force: every entry, read front to back through the stream (no index)."""
    return [e async for e in read_log(redis, newest_first=False)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(log_entry(), min_size=0, max_size=60),
    filters=st.lists(log_filter(), min_size=1, max_size=6),
    page=st.integers(1, 7),
)
async def test_every_query_returns_what_a_scan_finds_newest_first_and_pages_the_same(
    redis_url: str, entries: list[LogEntry], filters: list[LogFilter], page: int
) -> None:
    """For random logs and random filter combinations (recipient, registration, message, event,
    status, kind, time range): the query's entries are exactly those a scan of the whole log
    matches, newest first; reading them in cursor pages of any size gives the same entries."""
    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        log = DeliveryLog(redis, max_entries=10_000, echo=None)
        for start in range(0, len(entries), 7):
            await log.write(entries[start : start + 7])
        every = await everything_oldest_first(redis)
        assert len(every) == len(entries)
        await queries_agree_with_a_scan(redis, every, filters, page)
    finally:
        await redis.aclose()


async def queries_agree_with_a_scan(
    redis: Any, every: list[LogEntry], filters: list[LogFilter], page: int
) -> None:
    """Each filter as drawn, and without the fields an index field answers (registration,
    recipient, message), so the lists by event, status and kind are read as often: iter_log
    and cursor pages of `page` return exactly the entries a scan of `every` matches, newest first."""
    for flt in filters + [replace(f, recipient=None, registration=None, message=None) for f in filters]:
        expected = [e.entry_id for e in reversed(every) if flt.matches(e)]
        assert [e.entry_id async for e in iter_log(redis, flt)] == expected, flt
        paged: list[str] = []
        cursor = None
        for _ in range(len(every) + 2):
            result = await log_page(redis, flt, cursor=cursor, limit=page)
            paged += [e.entry_id for e in result.entries]
            if result.cursor is None:
                break
            cursor = result.cursor
        assert paged == expected, flt


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(log_entry(), min_size=0, max_size=80))
async def test_the_counters_say_what_counting_the_entries_says(
    redis_url: str, entries: list[LogEntry]
) -> None:
    """Per event and overall: entries per status and kind, sent entries with a latency, and the
    messages whose newest state change is `failed` (dead letters) equal a count over the log."""
    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        await DeliveryLog(redis, max_entries=10_000, echo=None).write(entries)
        every = await everything_oldest_first(redis)
        for event in [None, "evt-1", "evt-2"]:
            mine = [e for e in every if event is None or e.event_id == event]
            counted = await log_counts(redis, event)
            assert counted.counts == dict(Counter((e.status, kind_of(e)) for e in mine))
            assert counted.sent == sum(1 for e in mine if e.status == "sent" and e.latency_ms is not None)
            newest: dict[str, str] = {}
            for e in mine:
                if e.message_id and e.status not in ("rejected", "ignored"):
                    newest[e.message_id] = e.status
            assert counted.dead_letters == sum(1 for s in newest.values() if s == "failed")
    finally:
        await redis.aclose()


async def test_an_address_in_a_relay_reply_is_kept_only_in_its_bucket(redis_url: str) -> None:
    """The entry holds a token, and a relay text quoting the address says <recipient>: the
    address is stored once, and reads back in every entry."""
    redis = await connect_client(redis_url)
    try:
        log = DeliveryLog(redis, max_entries=100, echo=None)
        said = "550 5.1.1 <Maria@Example.org>: Recipient address rejected"
        await log.write(
            [
                LogEntry(
                    ts=log.now(),
                    status="failed",
                    message_id="r1/confirmation",
                    recipient="maria@example.org",
                    detail=said,
                )
            ]
        )
        raw = await redis.xrange("mailer:log")
        assert b"maria" not in b"".join(v for _, fields in raw for v in fields.values()).lower()
        (entry,) = [e async for e in read_log(redis)]
        assert entry.recipient == "maria@example.org"
        assert entry.detail == "550 5.1.1 <<recipient>>: Recipient address rejected"
    finally:
        await redis.aclose()


_WRITER = """
import asyncio, sys
from datetime import timedelta
from mailer.clock import utc_now
from mailer.state.deliverylog import DeliveryLog, LogEntry
from mailer.state.queue import connect_client
from mailer.state.store import registration_key

async def main(url, name, parity, behind):
    redis = await connect_client(url)
    log = DeliveryLog(redis, max_entries=10_000, echo=None, worker=name,
                      clock=lambda: utc_now() - timedelta(seconds=behind))
    for attempt in range(parity, 40, 2):
        # Each worker writes the message's next attempt once the other wrote the one before.
        while attempt and int(await redis.get("turn") or -1) != attempt - 1:
            await asyncio.sleep(0.001)
        entry = LogEntry(ts=log.now(), status="retrying", message_id="r1/confirmation", attempt=attempt,
                         worker=log.worker)
        await log.write([entry])
        await redis.set("turn", attempt)
    await redis.aclose()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("flt", "cursor"),
    [
        (LogFilter(since=EPOCH + timedelta(milliseconds=500)), None),
        (LogFilter(since=datetime.min.replace(tzinfo=UTC), until=datetime.max.replace(tzinfo=UTC)), None),
        (LogFilter(until=EPOCH), None),
        (LogFilter(), "0-0"),
        (LogFilter(event="evt-1"), "0-0"),
        (LogFilter(status="failed", since=EPOCH), None),
    ],
    ids=[
        "just-after-1970",
        "year-1-to-9999",
        "until-1970",
        "cursor-0-0",
        "list-cursor-0-0",
        "list-since-1970",
    ],
)
async def test_times_at_the_ends_of_the_calendar_are_answered_not_errors(
    redis_url: str, flt: LogFilter, cursor: str | None
) -> None:
    """Found by fuzzing the API from its OpenAPI description: `since` near 1970 made a negative
    stream id, a cursor of 0-0 the range "(0-0" Redis refuses; each was a 500."""
    redis = await connect_client(redis_url)
    try:
        await DeliveryLog(redis, max_entries=1000, echo=None).write(
            [LogEntry(ts=NOW.isoformat(), status="failed", message_id="reg-1/confirmation", event_id="evt-1")]
        )
        page = await log_page(redis, flt, cursor=cursor, limit=10)
    finally:
        await redis.aclose()
    assert len(page.entries) == (1 if flt.until is None or flt.until > NOW else 0) * (cursor is None)


async def test_two_worker_processes_keep_one_messages_entries_in_order(redis_url: str) -> None:
    """Two processes, one with its clock 20 s behind, take turns logging one message's attempts:
    the log lists them in the order they happened (ids never go back), each with its own time."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _WRITER, redis_url, name, parity, behind, env=dict(os.environ)
        )
        for name, parity, behind in [("w-even", "0", "0"), ("w-odd", "1", "20")]
    ]
    assert [await p.wait() for p in procs] == [0, 0]
    redis = await connect_client(redis_url)
    try:
        found = [e async for e in iter_log(redis, LogFilter(message="r1/confirmation"))]
    finally:
        await redis.aclose()
    assert [e.attempt for e in reversed(found)] == list(range(40))
    assert {e.worker for e in found if e.attempt % 2} == {"w-odd"}
    lagging = [datetime.fromisoformat(e.ts) for e in found if e.worker == "w-odd"]
    assert all(t < utc_now() - timedelta(seconds=15) for t in lagging)  # their own clock's time


EVENT_OF = {"reg-1": "evt-1", "reg-2": "evt-2", "reg-3": "evt-1"}


@st.composite
def message_entry(draw: Any) -> LogEntry:
    """A state change of one message, as the send path writes it: the event is the registration's."""
    registration = draw(st.sampled_from(REGISTRATIONS))
    kind = draw(st.sampled_from(KINDS))
    return LogEntry(
        ts=(NOW + timedelta(milliseconds=draw(st.integers(-30_000, 30_000)))).isoformat(),
        status=draw(st.sampled_from(["planned", "sent", "retrying", "failed", "skipped", "redriven"])),
        message_id=f"{registration}/{kind}",
        registration_id=registration,
        event_id=EVENT_OF[registration],
        recipient="maria@example.org",
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.lists(message_entry(), max_size=40),
    status=st.sampled_from(["failed", "skipped"]),
    kind=st.none() | st.sampled_from(KINDS),
    event=st.none() | st.sampled_from(["evt-1", "evt-2"]),
    since=st.none() | st.integers(-40_000, 40_000),
)
async def test_retry_by_status_picks_the_messages_whose_newest_entry_has_it(
    redis_url: str,
    entries: list[LogEntry],
    status: str,
    kind: str | None,
    event: str | None,
    since: int | None,
) -> None:
    """`mailer retry --status` (failed: the dead-letter hash; skipped: the event's index) chooses
    what a scan of the whole log chooses, newest first; its `redriven` entries name the event, so
    the event's dead letters drop to none."""
    from mailer.ops.redrive import latest_with_status, redrive
    from mailer.state.messages import MessageRef

    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        for registration, event_id in EVENT_OF.items():
            await redis.hset(registration_key(registration), mapping={"e": event_id, "ae": "x@example.org"})
        await DeliveryLog(redis, max_entries=10_000, echo=None).write(entries)
        cutoff = None if since is None else NOW + timedelta(milliseconds=since)
        seen: set[str] = set()
        expected = []
        for e in reversed(await everything_oldest_first(redis)):
            if e.message_id in seen:
                continue
            seen.add(e.message_id)
            recent = cutoff is None or datetime.fromisoformat(e.ts) >= cutoff
            if e.status == status and recent and kind in (None, kind_of(e)) and event in (None, e.event_id):
                expected.append(e.message_id)
        chosen = await latest_with_status(redis, status, kind=kind, event_id=event, since=cutoff)
        assert chosen == expected
        if status == "failed" and event:
            for m in chosen:  # the message states agree with the log, as the send path writes both
                ref = MessageRef.parse(m)
                await redis.hset(registration_key(ref.registration_id), ref.field, "failed|1|0|0|0")
            done = await redrive(
                redis, [MessageRef.parse(m) for m in chosen], who="test", log_max_entries=10_000
            )
            assert [r.id for r in done.planned] == chosen
            assert await latest_with_status(redis, "failed", event_id=event, since=cutoff) == []
            assert (await log_counts(redis, event)).dead_letters == len(
                await latest_with_status(redis, "failed", event_id=event)
            )
    finally:
        await redis.aclose()


async def test_a_redriven_dead_letter_leaves_its_events_dead_letters(redis_url: str) -> None:
    """`mailer retry` logs `redriven` under the message's event (read from its registration), so
    the event's dead-letter count and `retry --status failed --event` no longer list it."""
    from mailer.ops.redrive import latest_with_status, redrive
    from mailer.state.messages import MessageRef

    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        await redis.hset(
            registration_key("reg-1"),
            mapping={"e": "evt-1", "ae": "maria@example.org", "m:confirmation": "failed|1|0|0|0"},
        )
        failed = LogEntry(
            ts=NOW.isoformat(),
            status="failed",
            message_id="reg-1/confirmation",
            event_id="evt-1",
            recipient="maria@example.org",
        )
        await DeliveryLog(redis, max_entries=100, echo=None).write([failed])
        assert await latest_with_status(redis, "failed", event_id="evt-1") == ["reg-1/confirmation"]
        await redrive(redis, [MessageRef.parse("reg-1/confirmation")], who="test", log_max_entries=100)
        assert await latest_with_status(redis, "failed", event_id="evt-1") == []
        assert (await log_counts(redis, "evt-1")).dead_letters == 0
        (redriven, _) = [e async for e in iter_log(redis, LogFilter(event="evt-1"))]
        assert (redriven.status, redriven.detail) == ("redriven", "test")
    finally:
        await redis.aclose()
