"""Re-driving messages: the same Message-ID again with a fresh attempt budget (`mailer retry`)."""

from __future__ import annotations

from datetime import datetime

from mailer.clock import Clock, iso, ms, utc_now
from mailer.state.deliverylog import DeliveryLog, LogEntry
from mailer.state.logquery import read_log
from mailer.state.message_states import MessageStore
from mailer.state.messages import MessageRef, MessageState
from mailer.state.queue import SEND, Enqueuer
from mailer.state.redis_types import RedisClient

# Message ids per send job, as the scheduler's re-drives batch them.
REDRIVE_BATCH = 50


async def latest_with_status(
    redis: RedisClient,
    status: str,
    *,
    kind: str | None = None,
    event_id: str | None = None,
    since: datetime | None = None,
) -> list[str]:
    """The messages whose newest log entry has `status` (and the kind and event asked for)."""
    latest: set[str] = set()
    chosen: list[str] = []
    async for entry in read_log(redis):
        if since and datetime.fromisoformat(entry.ts) < since:
            break
        if not entry.message_id or entry.message_id in latest:
            continue
        latest.add(entry.message_id)
        if (
            entry.status == status
            and (not kind or entry.kind == kind)
            and (not event_id or entry.event_id == event_id)
        ):
            chosen.append(entry.message_id)
    return chosen


async def redrive(
    redis: RedisClient, refs: list[MessageRef], *, who: str, log_max_entries: int, clock: Clock = utc_now
) -> int:
    """Plan each message again (attempts from zero), log `redriven` by `who`, and queue its send."""
    now = clock()
    now_ms = ms(now)
    store = MessageStore(redis)
    log = DeliveryLog(redis, max_entries=log_max_entries, echo=None, worker="cli", clock=clock)
    async with redis.pipeline(transaction=False) as pipe:
        for ref in refs:
            store.write_state(pipe, ref, MessageState("planned", 0, now_ms, now_ms, now_ms))
            entry = LogEntry(
                ts=iso(now),
                status="redriven",
                message_id=ref.id,
                kind=ref.kind,
                registration_id=ref.registration_id,
                detail=who,
                worker="cli",
            )
            await log.add(pipe, entry)
        await pipe.execute()
    ids = [r.id for r in refs]
    jobs: list[tuple[str, str, dict[str, object]]] = [
        (f"retry:{now_ms}:{i}", SEND, {"messages": ids[i : i + REDRIVE_BATCH]})
        for i in range(0, len(ids), REDRIVE_BATCH)
    ]
    await Enqueuer(redis, clock=clock).enqueue(jobs)
    return len(refs)
