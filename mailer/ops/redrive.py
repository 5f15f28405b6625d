"""Re-driving messages: the same Message-ID again with a fresh attempt budget (`mailer retry`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mailer.clock import Clock, iso, ms, utc_now
from mailer.constants import LOG_DEAD_KEY
from mailer.state.deliverylog import DeliveryLog, LogEntry, id_of, position_of, scope_of
from mailer.state.logquery import (
    LogFilter,
    entries_at,
    indexed_from,
    iter_log,
    log_page,
    position_at,
    top_position,
)
from mailer.state.message_states import REDRIVABLE, MessageStore
from mailer.state.messages import MessageRef
from mailer.state.queue import SEND, Enqueuer
from mailer.state.redis_types import RedisClient
from mailer.state.store import load_registrations

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
    """The messages whose newest log entry has `status` and was written at `since` or later (and
    the kind and event asked for), newest first.

    Failed ones are the dead letters the log keeps as a hash; others walk the event's or kind's
    index, not the whole log. An entry's position is never below its own time (ids are the
    writer's clock, clamped increasing), so below `since` nothing newer can follow.
    """
    floor = 0 if since is None else position_at(since)
    if status == "failed":
        return await _dead_letters(redis, kind=kind, event_id=event_id, since=since, floor=floor)
    latest: set[str] = set()
    chosen: list[str] = []
    async for entry in iter_log(redis, LogFilter(event=event_id, kind=kind)):
        if position_of(entry.entry_id) < floor:
            break
        if not entry.message_id or entry.message_id in latest:
            continue
        latest.add(entry.message_id)
        if entry.status == status and _at_or_after(entry, since):
            chosen.append(entry.message_id)
    return chosen


async def _dead_letters(
    redis: RedisClient, *, kind: str | None, event_id: str | None, since: datetime | None, floor: int
) -> list[str]:
    dead = await redis.hgetall(LOG_DEAD_KEY.format(scope=scope_of(event_id)))
    found = sorted(
        ((int(position), message.decode()) for message, position in dead.items() if int(position) >= floor),
        reverse=True,
    )
    chosen = [(position, m) for position, m in found if not kind or MessageRef.parse(m).kind == kind]
    if since is None:
        picked = [m for _, m in chosen]
    else:
        # A writer whose clock ran behind the log's newest entry got a position above its own time.
        entries = await entries_at(redis, [id_of(position) for position, _ in chosen])
        picked = [e.message_id for e in entries if _at_or_after(e, since)]
    return picked + [m for m in await _older_failures(redis, kind, event_id, since) if m not in picked]


async def _older_failures(
    redis: RedisClient, kind: str | None, event_id: str | None, since: datetime | None
) -> list[str]:
    """Failures an older mailer logged, below the first indexed entry (no dead-letter hash for
    them): walked. One re-driven since is not failed any more; the re-plan checks its state."""
    floor = await indexed_from(redis)
    if floor is None:
        floor = await top_position(redis) + 1
    cursor = id_of(floor)
    latest: set[str] = set()
    chosen: list[str] = []
    older = LogFilter(event=event_id, kind=kind, since=since)
    while True:
        page = await log_page(redis, LogFilter(since=since), cursor=cursor, limit=500)
        for entry in page.entries:
            if entry.message_id and entry.message_id not in latest:
                latest.add(entry.message_id)
                if entry.status == "failed" and older.matches(entry):
                    chosen.append(entry.message_id)
        if page.cursor is None:
            return chosen
        cursor = page.cursor


def _at_or_after(entry: LogEntry, since: datetime | None) -> bool:
    return since is None or datetime.fromisoformat(entry.ts) >= since


@dataclass(frozen=True, slots=True)
class Redriven:
    """What `mailer retry` did: the messages planned again, and those it left with their status."""

    planned: list[MessageRef]
    refused: dict[str, str]  # message id -> its status ("" when mailer has no such message)


async def redrive(
    redis: RedisClient, refs: list[MessageRef], *, who: str, log_max_entries: int, clock: Clock = utc_now
) -> Redriven:
    """Plan each failed or skipped message again (attempts from zero), log `redriven` by `who`,
    and queue its send. Any other message is left alone: a sent one is never sent again."""
    now = clock()
    now_ms = ms(now)
    was = await MessageStore(redis).replan(refs, now_ms=now_ms)
    planned = [ref for ref, status in zip(refs, was, strict=True) if status in REDRIVABLE]
    refused = {ref.id: status for ref, status in zip(refs, was, strict=True) if status not in REDRIVABLE}
    log = DeliveryLog(redis, max_entries=log_max_entries, echo=None, worker="cli", clock=clock)
    # The entry names the event, so the event's dead letters and queries see the re-drive.
    stored = (await load_registrations(redis, {r.registration_id for r in planned})).found
    event_of = {rid: registration.event_id or "" for rid, registration in stored.items()}
    await log.write(
        [
            LogEntry(
                ts=iso(now),
                status="redriven",
                message_id=ref.id,
                kind=ref.kind,
                registration_id=ref.registration_id,
                event_id=event_of.get(ref.registration_id, ""),
                detail=who,
                worker="cli",
            )
            for ref in planned
        ]
    )
    ids = [r.id for r in planned]
    jobs: list[tuple[str, str, dict[str, object]]] = [
        (f"retry:{now_ms}:{i}", SEND, {"messages": ids[i : i + REDRIVE_BATCH]})
        for i in range(0, len(ids), REDRIVE_BATCH)
    ]
    await Enqueuer(redis, clock=clock).enqueue(jobs)
    return Redriven(planned, refused)
