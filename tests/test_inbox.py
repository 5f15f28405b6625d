"""publish() → the inbox → one drainer at a time: nothing lost, nothing twice, nothing stuck."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from mailer.constants import INBOX_ARMED_KEY, INBOX_KEY, INBOX_LEASE_KEY, QUEUE_NAME
from mailer.intake.client import MailerClient
from mailer.intake.inbox import SPILL_ABOVE, Inbox
from mailer.intake.job_bodies import deserialize
from mailer.state.queue import connect, job_key
from tests.conftest import log_until, make_event, settled, wait_for


def registration(i: int) -> dict[str, Any]:
    return make_event(event_id=f"evt-{i}", registration_id=f"reg-{i}", email=f"person{i}@example.org")


async def test_singles_published_while_a_drain_runs_all_arrive_once(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Events that arrive while a drainer is busy or just finishing are never stranded."""
    await mail_worker()
    async with MailerClient(redis_url) as client:
        for i in range(150):
            await client.publish(registration(i))
            if i % 10 == 0:
                await asyncio.sleep(0.005)  # let drains start and end in between
    await wait_for(lambda: len(smtp_server.handler.received) >= 150, 30)
    await settled(redis_url)
    assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == sorted(
        f"person{i}@example.org" for i in range(150)
    )
    redis = await connect(redis_url)
    try:
        assert await redis.llen(INBOX_KEY) == 0
        assert not await redis.exists(INBOX_LEASE_KEY)
    finally:
        await redis.aclose()


async def test_a_backlog_is_delivered_once_by_two_workers(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A backlog over SPILL_ABOVE, drained by two workers at once: every registrant gets one mail."""
    n = SPILL_ABOVE + 150
    async with MailerClient(redis_url) as client:
        for i in range(n):
            await client.publish(registration(i))
    await mail_worker()
    await mail_worker(worker_name="second-worker")
    await wait_for(lambda: len(smtp_server.handler.received) >= n, 60)
    await settled(redis_url)
    recipients = [r.rcpt_tos[0] for r in smtp_server.handler.received]
    assert len(recipients) == len(set(recipients)) == n


async def test_a_backlog_is_handed_to_ingest_jobs_any_worker_can_run(redis_url: str) -> None:
    """Over SPILL_ABOVE waiting, the drainer moves batches into ingest jobs, oldest first."""
    redis = await connect(redis_url)
    inbox = Inbox(redis)
    applied: list[bytes] = []

    async def apply(batch: list[bytes]) -> None:
        applied.extend(batch)

    n = SPILL_ABOVE + 250
    events = [orjson.dumps({"n": i}) for i in range(n)]
    try:
        await inbox.push(events)
        await redis.delete(QUEUE_NAME)  # the drain job publish() enqueued: we run drain by hand
        assert await inbox.drain(apply) == n - 300
        job_ids = await redis.zrange(QUEUE_NAME, 0, -1)
        assert len(job_ids) == 3
        spilled = []
        for job_id in job_ids:
            job = deserialize(await redis.get(job_key(job_id.decode())))
            assert job["f"] == "ingest"
            spilled += [orjson.loads(e)["n"] for e in job["k"]["events"]]
        assert sorted(spilled) == list(range(300))
        assert applied == events[300:]
        assert await redis.llen(INBOX_KEY) == 0
    finally:
        await redis.aclose()


async def test_an_inbox_nobody_drains_is_picked_up_by_the_tick(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Events in the inbox with no drain job (lost with a Redis restore, say) still go out,
    and bytes that are not an event are rejected in the delivery log, not dropped silently."""
    redis = await connect(redis_url)
    try:
        await redis.rpush(
            INBOX_KEY, orjson.dumps(registration(1)), b"not json {", orjson.dumps(registration(2))
        )
        await redis.set(INBOX_ARMED_KEY, 1)  # "a drain is pending", long ago
    finally:
        await redis.aclose()
    await mail_worker()
    await wait_for(lambda: len(smtp_server.handler.received) == 2, 15)
    entries = await log_until(redis_url, lambda log: any(e.status == "rejected" for e in log))
    (rejected,) = [e for e in entries if e.status == "rejected"]
    assert "not valid JSON" in rejected.detail


async def test_only_the_lease_holder_drains_and_trims(redis_url: str) -> None:
    """A second drainer backs off; a drainer whose lease was taken over trims nothing."""
    redis = await connect(redis_url)
    inbox = Inbox(redis)
    seen: list[list[bytes]] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    async def slow(batch: list[bytes]) -> None:
        seen.append(batch)
        inside.set()
        await release.wait()
        # Meanwhile the lease lapsed and another worker took it over.
        await redis.set(INBOX_LEASE_KEY, "someone-else")

    try:
        await inbox.push([b'{"n": 1}', b'{"n": 2}'])
        first = asyncio.create_task(inbox.drain(slow))
        await inside.wait()
        assert await inbox.drain(slow) == 0  # lease held: the second drainer does nothing
        release.set()
        assert await first == 2
        assert seen == [[b'{"n": 1}', b'{"n": 2}']]
        assert await redis.lrange(INBOX_KEY, 0, -1) == [b'{"n": 1}', b'{"n": 2}']  # not trimmed
    finally:
        await redis.aclose()


async def test_a_drain_hands_over_to_a_new_job_when_its_turn_is_up(redis_url: str) -> None:
    """A long drain ends its turn with a fresh drain job queued, so arq's timeout never hits it."""
    redis = await connect(redis_url)
    inbox = Inbox(redis)

    async def apply(batch: list[bytes]) -> None:
        await inbox.push([b'{"more": true}'])  # the producer keeps publishing

    try:
        await inbox.push([b"{}"])
        await redis.delete(QUEUE_NAME)  # the drain job publish() enqueued: we run drain by hand
        assert await inbox.drain(apply, turn_s=0.0) == 1
        assert await redis.llen(INBOX_KEY) == 1
        assert not await redis.exists(INBOX_LEASE_KEY)
        (job_id,) = await redis.zrange(QUEUE_NAME, 0, -1)
        assert job_id.startswith(b"drain:")
    finally:
        await redis.aclose()


async def test_after_every_drain_the_inbox_is_empty_or_a_drain_is_queued(redis_url: str) -> None:
    """Events pushed while a batch is applied (and between batches) are never left behind."""
    redis = await connect(redis_url)
    inbox = Inbox(redis)
    pushed = 0

    async def apply(batch: list[bytes]) -> None:
        nonlocal pushed
        if pushed < 5:
            pushed += 1
            await inbox.push([orjson.dumps({"late": pushed})])

    try:
        for turn_s in (30.0, 0.0):
            pushed = 0
            await inbox.push([b"{}"])
            await redis.delete(QUEUE_NAME)
            await inbox.drain(apply, turn_s=turn_s)
            waiting = await redis.llen(INBOX_KEY)
            queued = [j for j in await redis.zrange(QUEUE_NAME, 0, -1) if j.startswith(b"drain:")]
            assert waiting == 0 or (queued and await redis.exists(INBOX_ARMED_KEY)), (turn_s, waiting)
            await redis.delete(INBOX_KEY, INBOX_ARMED_KEY)
    finally:
        await redis.aclose()


async def test_a_batch_that_fails_becomes_an_ingest_job_and_the_drain_goes_on(redis_url: str) -> None:
    """A batch that raises (a bug meets an event) must not hold up every event behind it."""
    redis = await connect(redis_url)
    inbox = Inbox(redis)
    applied: list[bytes] = []

    async def apply(batch: list[bytes]) -> None:
        if b'{"poison": true}' in batch:
            raise RuntimeError("a bug meets this event")
        applied.extend(batch)

    events = [b'{"poison": true}'] + [orjson.dumps({"n": i}) for i in range(100)]
    try:
        await inbox.push(events)
        await redis.delete(QUEUE_NAME)
        assert await inbox.drain(apply) == 1
        assert applied == events[100:]  # the second batch: the 100th fine event
        (job_id,) = await redis.zrange(QUEUE_NAME, 0, -1)
        job = deserialize(await redis.get(job_key(job_id.decode())))
        assert job["f"] == "ingest"
        assert [e.encode() for e in job["k"]["events"]] == events[:100]
        assert await redis.llen(INBOX_KEY) == 0
        assert not await redis.exists(INBOX_LEASE_KEY)
    finally:
        await redis.aclose()


async def test_a_cancelled_drain_lets_go_and_queues_the_next_one(redis_url: str) -> None:
    """arq's job timeout (or a shutdown) cancels a drain mid-batch: nothing is trimmed, the
    lease is released and a new drain job is queued at once, not after lease + tick."""
    redis = await connect(redis_url)
    inbox = Inbox(redis)
    started = asyncio.Event()

    async def stuck(batch: list[bytes]) -> None:
        started.set()
        await asyncio.sleep(30)

    try:
        await inbox.push([b'{"n": 1}'])
        await redis.delete(QUEUE_NAME)
        drain = asyncio.create_task(inbox.drain(stuck))
        await started.wait()
        drain.cancel()
        with pytest.raises(asyncio.CancelledError):
            await drain
        assert await redis.lrange(INBOX_KEY, 0, -1) == [b'{"n": 1}']
        assert not await redis.exists(INBOX_LEASE_KEY)
        (job_id,) = await redis.zrange(QUEUE_NAME, 0, -1)
        assert job_id.startswith(b"drain:")
    finally:
        await redis.aclose()


async def test_garbage_in_the_inbox_is_rejected_entry_by_entry_and_the_drain_goes_on(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Not JSON, not an object, not a valid event: one `rejected` entry each, with the event id
    where the record has one; the valid events around them are delivered in the same drain."""
    bad_date = registration(7)
    bad_date["occurred_at"] = 1764079200  # a number is not a timestamp
    garbage = [
        b"not json {",
        b"[1, 2]",
        b"42",
        b"\xff\xfe not utf-8",
        b'{"id": "evt-half", "type": "registration.created"}',
        orjson.dumps(bad_date),
        b'{"id": 12, "type": "event.cancelled"}',
    ]
    await mail_worker()
    redis = await connect(redis_url)
    try:
        await Inbox(redis).push([orjson.dumps(registration(1)), *garbage, orjson.dumps(registration(2))])
    finally:
        await redis.aclose()
    await wait_for(lambda: len(smtp_server.handler.received) == 2, 15)
    entries = await log_until(redis_url, lambda log: sum(e.status == "rejected" for e in log) >= len(garbage))
    refused = [e for e in entries if e.status == "rejected"]
    assert len(refused) == len(garbage)
    assert all(e.detail.startswith("invalid event: ") for e in refused)
    assert sorted(e.source_event for e in refused if e.source_event) == ["evt-7", "evt-half"]
    assert "occurred_at" in next(e.detail for e in refused if e.source_event == "evt-7")
