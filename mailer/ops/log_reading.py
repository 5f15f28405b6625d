"""What the log commands ask of the delivery log: filters, matching entries, timelines and stats.

The log's own readers (mailer.state.logquery) pick the index a filter needs and page through
it newest first; stats of all time come from the counters the send path keeps, stats since a
moment from the entries since then.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from mailer.clock import from_ms
from mailer.constants import DUE_KEY
from mailer.state.deliverylog import LogEntry, kind_of
from mailer.state.logquery import LogFilter, iter_log, log_counts
from mailer.state.messages import MessageState
from mailer.state.redis_types import RedisClient
from mailer.state.store import registration_key

FINAL = frozenset({"sent", "failed", "skipped"})
# The entries that move a message's state; "ignored" (a replay) and "rejected" notes do not.
STATE_CHANGES = FINAL | {"planned", "retrying", "held", "uncertain", "redriven"}
LogQuery = LogFilter
__all__ = ["LogQuery", "kind_of"]


def when(entry: LogEntry) -> datetime:
    return datetime.fromisoformat(entry.ts)


def entries(redis: RedisClient, query: LogQuery, *, page: int = 500) -> AsyncIterator[LogEntry]:
    """The entries that match, newest first, read `page` at a time (constant memory)."""
    return iter_log(redis, query, page=page)


@dataclass(slots=True)
class MessageStory:
    """One message's entries, oldest first."""

    message_id: str
    kind: str
    entries: list[LogEntry] = field(default_factory=list)
    # Its state now, from the registration's record: planned, claimed and sending are not
    # logged (an entry per state change of a million messages would double the log).
    current: MessageState | None = None
    due: datetime | None = None  # when the scheduler looks at it next, while it is not final

    @property
    def status(self) -> str:
        return self.entries[-1].status if self.entries else self.current.status if self.current else ""

    @property
    def attempts(self) -> int:
        return max((e.attempt for e in self.entries), default=self.current.attempts if self.current else 0)

    @property
    def sequence(self) -> int | None:
        """The calendar SEQUENCE of the newest build of this message (None before one was built)."""
        return next((e.sequence for e in reversed(self.entries) if e.sequence is not None), None)


@dataclass(slots=True)
class Timeline:
    """A registration's story (or one message's): its messages in the order they began."""

    registration_id: str
    event_id: str = ""
    recipient: str = ""
    messages: list[MessageStory] = field(default_factory=list)
    other: list[LogEntry] = field(default_factory=list)  # entries of no message (an erasure)


async def timeline(redis: RedisClient, ident: str) -> Timeline:
    """Every entry of a registration, or of one message when `ident` is a message id."""
    query = LogQuery(message=ident) if "/" in ident else LogQuery(registration=ident)
    found = [e async for e in entries(redis, query)]
    found.reverse()
    story = Timeline(ident.split("/", 1)[0])
    by_message: dict[str, MessageStory] = {}
    for entry in found:
        story.event_id = entry.event_id or story.event_id
        story.recipient = entry.recipient or story.recipient
        if not entry.message_id:
            story.other.append(entry)
            continue
        message = by_message.get(entry.message_id)
        if message is None:
            message = by_message[entry.message_id] = MessageStory(entry.message_id, kind_of(entry))
            story.messages.append(message)
        message.entries.append(entry)
    await _add_states(redis, story, ident, by_message)
    return story


async def _add_states(
    redis: RedisClient, story: Timeline, ident: str, by_message: dict[str, MessageStory]
) -> None:
    """Each message's state now, and the messages planned but not yet logged (a reminder due
    next week), from the registration's record."""
    record = await redis.hgetall(registration_key(story.registration_id))
    states: dict[str, MessageState] = {}
    for name, value in record.items():
        field_name = name.decode()
        if field_name.startswith("m:"):
            message_id = f"{story.registration_id}/{field_name[2:]}"
            if "/" not in ident or message_id == ident:
                with contextlib.suppress(ValueError):
                    states[message_id] = MessageState.decode(value)
    if not story.event_id and b"e" in record:
        story.event_id = record[b"e"].decode()
    waiting = [m for m, state in states.items() if not state.final]
    async with redis.pipeline(transaction=False) as pipe:
        for message_id in waiting:
            pipe.zscore(DUE_KEY, message_id)
        scores = dict(zip(waiting, await pipe.execute(), strict=True)) if waiting else {}
    for message_id, state in states.items():
        message = by_message.get(message_id)
        if message is None:
            message = by_message[message_id] = MessageStory(message_id, message_id.split("/")[1])
            story.messages.append(message)
        message.current = state
        score = scores.get(message_id)
        message.due = from_ms(int(score)) if score is not None else None


@dataclass(slots=True)
class LogStats:
    """Counts per status and kind, latency planned → sent, dead letters, the oldest message waiting."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, kind) -> entries
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max
    sent: int = 0  # sent messages whose planning is in the log too: the latency's sample
    dead_letters: int = 0
    oldest_waiting: tuple[str, str, datetime] | None = None  # (message id, status, first entry)
    uncounted_before: datetime | None = None  # an older mailer's entries, not in the counters

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of `mailer stats --json` and `GET /v1/stats`."""
        counts: dict[str, dict[str, int]] = {}
        for (status, kind), n in self.counts.items():
            counts.setdefault(status, {})[kind] = n
        oldest = self.oldest_waiting
        return {
            "counts": counts,
            "sent": self.sent,
            "latency_ms": self.latency_ms,
            "dead_letters": self.dead_letters,
            "uncounted_before": self.uncounted_before.isoformat() if self.uncounted_before else None,
            "oldest_waiting": {"message_id": oldest[0], "status": oldest[1], "since": oldest[2].isoformat()}
            if oldest
            else None,
        }


async def stats(redis: RedisClient, query: LogQuery) -> LogStats:
    """Stats of one event or all: from the counters (no entry read) unless a time range is
    asked for, then from the entries in it."""
    if query.since is None and query.until is None:
        counted = await log_counts(redis, query.event)
        oldest = counted.oldest_due
        return LogStats(
            counts=counted.counts,
            latency_ms=counted.latency_ms,
            sent=counted.sent,
            dead_letters=counted.dead_letters,
            oldest_waiting=(oldest[0], "due", oldest[1]) if oldest else None,
            uncounted_before=counted.uncounted_before,
        )
    return await _walked_stats(redis, query)


async def _walked_stats(redis: RedisClient, query: LogQuery) -> LogStats:
    result = LogStats()
    first: dict[str, datetime] = {}  # message -> its oldest entry seen
    latest: dict[str, LogEntry] = {}  # message -> its newest entry
    latencies: list[float] = []
    async for entry in entries(redis, query):  # newest first
        key = (entry.status, kind_of(entry))
        result.counts[key] = result.counts.get(key, 0) + 1
        if entry.status == "sent" and entry.latency_ms is not None:
            latencies.append(entry.latency_ms)
        if entry.message_id and entry.status in STATE_CHANGES:
            latest.setdefault(entry.message_id, entry)
            first[entry.message_id] = when(entry)
    for message_id, newest in latest.items():
        if newest.status == "failed":
            result.dead_letters += 1
        elif newest.status not in FINAL:
            since = first[message_id]
            if result.oldest_waiting is None or since < result.oldest_waiting[2]:
                result.oldest_waiting = (message_id, newest.status, since)
    result.sent = len(latencies)
    result.latency_ms = percentiles(latencies)
    return result


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank p50, p90, p99 and the maximum; {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    rank = {
        name: ordered[max(0, math.ceil(p * len(ordered)) - 1)]
        for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
    }
    return rank | {"max": ordered[-1]}
