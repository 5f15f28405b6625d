"""What the log commands ask of the delivery log: filters, matching entries, timelines and stats.

Read through mailer.state.deliverylog's public readers: a registration's, a message's or an
address's entries from their index, everything else by walking the stream newest first. The
log's own query API (typed filters, cursor paging, counters kept on the send path) replaces
the walking here when it lands; the commands only see `LogQuery`, `entries`, `timeline` and
`stats`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mailer.state.deliverylog import (
    LogEntry,
    indexed_entries,
    read_log,
    recipient_index,
    registration_index,
)
from mailer.state.redis_types import RedisClient

# Entries of one stream are in the order Redis received them; their `ts` is the writer's clock.
# Walking newest first, a walk for `since` stops this far past it, so a worker whose clock ran
# a little behind does not hide its entries.
CLOCK_SKEW = timedelta(seconds=60)
FINAL = frozenset({"sent", "failed", "skipped"})
# The entries that move a message's state; "ignored" (a replay) and "rejected" notes do not.
STATE_CHANGES = FINAL | {"planned", "retrying", "held", "uncertain", "redriven"}


def kind_of(entry: LogEntry) -> str:
    """The entry's kind, read from its message id where it has none of its own."""
    if entry.kind:
        return entry.kind
    parts = entry.message_id.split("/")
    return parts[1] if len(parts) > 1 else ""


def when(entry: LogEntry) -> datetime:
    return datetime.fromisoformat(entry.ts)


@dataclass(frozen=True, slots=True)
class LogQuery:
    """Which entries a command wants: every given field must match; `since` inclusive, `until` not."""

    recipient: str | None = None
    registration: str | None = None
    message: str | None = None
    event: str | None = None
    status: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: LogEntry) -> bool:
        moment = when(entry)
        return not (
            (self.recipient and entry.recipient.lower() != self.recipient.strip().lower())
            or (self.registration and entry.registration_id != self.registration)
            or (self.message and entry.message_id != self.message)
            or (self.event and entry.event_id != self.event)
            or (self.status and entry.status != self.status)
            or (self.kind and kind_of(entry) != self.kind)
            or (self.since and moment < self.since)
            or (self.until and moment >= self.until)
        )


async def entries(
    redis: RedisClient, query: LogQuery, *, skew: timedelta = CLOCK_SKEW
) -> AsyncIterator[LogEntry]:
    """The entries that match, newest first, read a page at a time (constant memory)."""
    registration = query.registration or (query.message.split("/", 1)[0] if query.message else None)
    index = registration_index(registration) if registration else None
    if index is None and query.recipient:
        index = recipient_index(query.recipient)
    if index is not None:
        for entry in await indexed_entries(redis, index):
            if query.matches(entry):
                yield entry
        return
    async for entry in read_log(redis):
        if query.since and when(entry) < query.since - skew:
            return
        if query.matches(entry):
            yield entry


@dataclass(slots=True)
class MessageStory:
    """One message's entries, oldest first."""

    message_id: str
    kind: str
    entries: list[LogEntry] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.entries[-1].status

    @property
    def attempts(self) -> int:
        return max(e.attempt for e in self.entries)


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
    return story


@dataclass(slots=True)
class LogStats:
    """Counts per status and kind, latency planned → sent, dead letters, the oldest message waiting."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, kind) -> entries
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max
    sent: int = 0  # sent messages whose planning is in the log too: the latency's sample
    dead_letters: int = 0
    oldest_waiting: tuple[str, str, datetime] | None = None  # (message id, status, first entry)


async def stats(redis: RedisClient, query: LogQuery) -> LogStats:
    """Stats of the matching entries (walks them all: one event, or a time range, keeps it short)."""
    result = LogStats()
    first: dict[str, datetime] = {}  # message -> its oldest entry seen
    planned: dict[str, datetime] = {}  # message -> its oldest planned entry
    latest: dict[str, LogEntry] = {}  # message -> its newest entry
    latencies: list[float] = []
    async for entry in entries(redis, query):  # newest first
        key = (entry.status, kind_of(entry))
        result.counts[key] = result.counts.get(key, 0) + 1
        if entry.message_id and entry.status in STATE_CHANGES:
            latest.setdefault(entry.message_id, entry)
            first[entry.message_id] = when(entry)
            if entry.status == "planned":
                planned[entry.message_id] = when(entry)
    for message_id, newest in latest.items():
        if newest.status == "sent":
            # Only where the log has the planning: a confirmation sent at once logs just `sent`.
            if message_id in planned:
                latencies.append((when(newest) - planned[message_id]).total_seconds() * 1000)
        elif newest.status == "failed":
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
