"""The delivery log: one entry per state change of a message, in a Redis stream, with its indexes.

Writers go through DeliveryLog (or, on the send path, the step script that embeds
LOG_APPEND_LUA): one Lua call per entry appends it and updates every index and counter, so an
entry never exists without its index members, and the entries of one message keep their order
across workers. mailer.state.loglua has the entry's layout; mailer.state.logquery reads the log
(filters, pages, timelines), mailer.state.logstats counts, mailer.state.logretention trims and
forgets.
"""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import TextIO

from mailer.clock import Clock, iso, ms, utc_now
from mailer.constants import LOG_DEAD_KEY, LOG_NAMES_KEY, LOG_STREAM
from mailer.state.logentry import LOG_STATUSES, STATUS_CODES, LogEntry, LogStatus
from mailer.state.loglua import (
    ALL,
    APPEND_ARGS,
    APPEND_KEYS,
    APPEND_LUA,
    address_bucket,
    bucket_of,
    index_key,
    latency_bucket,
    latency_key,
    registration_bucket,
    stats_key,
)
from mailer.state.logquery import scan_stream
from mailer.state.logretention import forget, trim
from mailer.state.messages import MessageRef
from mailer.state.redis_types import Pipeline, RedisClient

__all__ = [
    "LOG_APPEND_LUA",
    "LOG_STATUSES",
    "DeliveryLog",
    "LogEntry",
    "LogParts",
    "LogStatus",
    "bucket_of",
    "forget_recipient",
    "registration_slot",
    "read_log",
    "trim_log",
]

LOG_APPEND_LUA = APPEND_LUA
# What one entry's append takes: APPEND_KEYS keys and APPEND_ARGS arguments for log_append.
LogParts = tuple[list[str], list[str | int]]

_APPEND_SCRIPT = APPEND_LUA + "return log_append(KEYS, 1, ARGV, 1)"
_MASK = "<recipient>"


class DeliveryLog:
    """Appends entries (trimmed to `max_entries`, indexed unless `indexed=False`) and echoes them.

    `indexed=False` writes the same entries without the lists, per-registration fields,
    counters and dead letters: the bench's comparison; readers then find entries only by
    scanning.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        max_entries: int,
        echo: TextIO | None = sys.stdout,
        worker: str = "",
        clock: Clock = utc_now,
        indexed: bool = True,
    ) -> None:
        self.redis = redis
        self.max_entries = max_entries
        self.echo = echo
        self.worker = worker
        self.clock = clock
        self.indexed = indexed
        self._append = redis.register_script(_APPEND_SCRIPT)

    def now(self) -> str:
        """The timestamp for an entry written now."""
        return iso(self.clock())

    def parts(self, entry: LogEntry) -> LogParts:
        """The keys and arguments of log_append for this entry (for scripts that embed it)."""
        return encode(entry, max_entries=self.max_entries, indexed=self.indexed)

    async def add(self, pipe: Pipeline, entry: LogEntry) -> None:
        """Queue the entry (and its index updates) on a pipeline the caller executes with its
        state writes."""
        keys, args = self.parts(entry)
        # On a pipeline, awaiting the script only queues its EVALSHA (loaded at execute).
        await self._append(keys=keys, args=args, client=pipe)

    def print(self, entries: Iterable[LogEntry]) -> None:
        if self.echo is not None:
            self.print_json(e.to_json() for e in entries)

    def print_json(self, lines: Iterable[bytes]) -> None:
        """Echo entries the caller has already encoded (the send path encodes each once)."""
        if self.echo is None:
            return
        text = b"".join(line + b"\n" for line in lines)
        if text:
            self.echo.write(text.decode())
            self.echo.flush()

    async def write(self, entries: list[LogEntry]) -> None:
        """Append entries on their own (for outcomes with no state change to go with them)."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                await self.add(pipe, entry)
            await pipe.execute()
        self.print(entries)


def encode(entry: LogEntry, *, max_entries: int, indexed: bool = True) -> LogParts:
    """log_append's keys and arguments (mailer.state.loglua documents both) for one entry."""
    message = entry.message_id
    registration = entry.registration_id or (message.split("/", 1)[0] if "/" in message else "")
    kind = entry.kind_name
    lower = entry.recipient.strip().lower()
    address_key, address_no = address_bucket(lower) if lower else ("", 0)
    status = entry.status
    keys = [LOG_STREAM, LOG_NAMES_KEY, "", address_key] + [""] * (APPEND_KEYS - 4)
    if indexed:
        event = entry.event_id
        keys[2] = registration_bucket(registration) if registration else address_key
        keys[4:12] = [
            index_key("e", event) if event else "",
            index_key("s", status),
            index_key("k", kind) if kind else "",
            index_key("es", f"{event}|{status}") if event else "",
            stats_key(ALL),
            stats_key(event) if event else "",
            latency_key(ALL) if entry.latency_ms is not None else "",
            latency_key(event) if event and entry.latency_ms is not None else "",
        ]
        keys[12] = LOG_DEAD_KEY if message and status in ("failed", "redriven") else ""
    args: list[str | int] = [
        max_entries,
        ms(datetime.fromisoformat(entry.ts)),
        STATUS_CODES[status],
        message,
        "" if message.startswith(registration + "/") else registration,
        "" if message.count("/") else kind,
        entry.event_id,
        entry.recipient.strip(),
        lower,
        entry.attempt,
        "" if entry.smtp_code is None else entry.smtp_code,
        entry.enhanced_code or "",
        _masked(entry.smtp_text, lower),
        _masked(entry.detail, lower),
        entry.worker,
        entry.locale,
        entry.reference,
        entry.source_event,
        "" if entry.sequence is None else entry.sequence,
        "" if entry.latency_ms is None else entry.latency_ms,
        _header_domain(entry),
        registration,
        address_no,
        f"{status}|{kind}",
        "" if entry.latency_ms is None else latency_bucket(entry.latency_ms),
        {"failed": "add", "redriven": "del"}.get(status, ""),
    ]
    assert len(args) == APPEND_ARGS
    return keys, args


def _masked(text: str, lower: str) -> str:
    """The text without the recipient's address: forgetting it must not mean rewriting entries."""
    if not lower or lower not in text.lower():
        return text
    return re.sub(re.escape(lower), _MASK, text, flags=re.IGNORECASE)


def _header_domain(entry: LogEntry) -> str:
    """The Message-ID's domain if the header is the one mailer derives from the message id
    (it always is); the header is then rebuilt from the two when the entry is read."""
    header = entry.message_id_header
    if not header or "@" not in header or not entry.message_id:
        return ""
    domain = header.rsplit("@", 1)[1]
    try:
        derived = MessageRef.parse(entry.message_id).header_id(domain)
    except ValueError:
        return ""
    return domain if derived == header else ""


async def read_log(
    redis: RedisClient, *, newest_first: bool = True, batch: int = 1000, include_sending: bool = False
) -> AsyncIterator[LogEntry]:
    """Iterate over the whole log, newest entry first by default.

    `sending` entries (a message handed to the relay, not yet an outcome) only with
    `include_sending`: the callers here look for outcomes.
    """
    async for entry in scan_stream(redis, newest_first=newest_first, batch=batch):
        if include_sending or entry.status != "sending":
            yield entry


async def trim_log(redis: RedisClient, *, before_ms: int, budget: int) -> int:
    """Remove log entries older than `before_ms` (entry time) and their index members.

    At most `budget` entries per call, so one call never blocks Redis for long; call it
    again while it returns `budget`. Returns how many entries it removed. Counters (stats,
    latency) stay as anonymous aggregates until an event's last entry is trimmed; then that
    event's counters go too.
    """
    return await trim(redis, before_ms=before_ms, budget=budget)


async def forget_recipient(redis: RedisClient, address: str) -> int:
    """Erase `address` (any letter case) from the log and its indexes.

    Entries stay, anonymous (status, kind, event, time: the counts are kept); their recipient
    reads "" from then on. Entries never hold the address in their texts (it is masked when
    written), except refusals of bad input, which are deleted if they name it. Returns how
    many entries named the address. The log holds no attendee names.
    """
    return await forget(redis, address)


def registration_slot(registration_id: str) -> tuple[str, str]:
    """Where a registration's entries are listed: (hash key, field)."""
    return registration_bucket(registration_id), registration_id
