"""The delivery log: one entry per outcome, kept in a Redis stream and printed as JSON lines.

Each entry's stream id is also pushed onto a list per registration and per recipient, in the
same Lua call as the XADD (LOG_APPEND_LUA), so "what happened to this registration / this
address" reads a few ids instead of scanning the stream, and an entry never exists without
its index members.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TextIO, get_args

import orjson

from mailer.clock import Clock, from_ms, iso, utc_now
from mailer.constants import LOG_BY_RECIPIENT_KEY, LOG_BY_REGISTRATION_KEY, LOG_STREAM
from mailer.state.redis_types import Pipeline, RedisClient

# Every state change of a message is one entry with one of these; "rejected" is bad input,
# "ignored" a replay, "foreign" a stream entry mailer did not write (shown, not trusted).
LogStatus = Literal[
    "planned",
    "sent",
    "retrying",
    "held",
    "failed",
    "skipped",
    "rejected",
    "uncertain",
    "redriven",
    "ignored",
    "foreign",
]
LOG_STATUSES: tuple[LogStatus, ...] = get_args(LogStatus)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of the delivery log: enough to answer "did Ms X get her mail, and if not, why?"."""

    ts: str
    status: LogStatus
    message_id: str = ""
    kind: str = ""
    registration_id: str = ""
    event_id: str = ""
    recipient: str = ""
    attempt: int = 0
    detail: str = ""
    worker: str = ""
    smtp_code: int | None = None
    enhanced_code: str | None = None
    source_event: str = ""  # the producer event id that caused it, where there is one

    def to_json(self) -> bytes:
        # Read the slots directly: dataclasses.asdict deep-copies and was a visible cost per mail.
        return orjson.dumps({k: v for k in self.__slots__ if (v := getattr(self, k)) not in (None, "")})

    @classmethod
    def from_json(cls, raw: bytes) -> LogEntry:
        data: dict[str, Any] = orjson.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__slots__})


# Every writer of the log appends through this (DeliveryLog.add, the send path's step script):
# the entry, then its id appended to each index field whose bucket is not "". Approximate
# trimming (~) keeps XADD O(1); index members of trimmed entries are skipped by the readers.
LOG_APPEND_LUA = """
local function log_index(bucket, field, id)
  if bucket == '' then return end
  local ids = redis.call('HGET', bucket, field)
  redis.call('HSET', bucket, field, ids and (ids .. ' ' .. id) or id)
end
local function log_append(stream, maxlen, json, reg_bucket, reg_field, rcpt_bucket, rcpt_field)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'j', json)
  log_index(reg_bucket, reg_field, id)
  log_index(rcpt_bucket, rcpt_field, id)
  return id
end
"""

_APPEND_SCRIPT = (
    LOG_APPEND_LUA + "return log_append(KEYS[1], ARGV[1], ARGV[2], KEYS[2], ARGV[3], KEYS[3], ARGV[4])"
)

# An index is a field ("reg-1001", or "maria@example.org") in one of INDEX_BUCKETS hashes.
# A list or a set per registration costs ~230 B of key overhead on Redis 6.2 (quicklists and
# hashtable sets even when small: measured, bench Redis bytes/registration 409 -> 867 B);
# a field in a shared hash costs its name and its ids. 16 384 buckets keep ~60 fields a
# bucket at a million registrations.
INDEX_BUCKETS = 16_384
IndexSlot = tuple[str, str]  # (hash key, field); ("", "") for none
NO_INDEX: IndexSlot = ("", "")


def _slot(template: str, name: str) -> IndexSlot:
    bucket = zlib.crc32(name.encode()) % INDEX_BUCKETS
    return template.format(bucket=bucket), name


def registration_index(registration_id: str) -> IndexSlot:
    return _slot(LOG_BY_REGISTRATION_KEY, registration_id)


def recipient_index(recipient: str) -> IndexSlot:
    """The recipient's index; addresses are matched case-insensitively."""
    return _slot(LOG_BY_RECIPIENT_KEY, recipient.strip().lower())


def index_slots(entry: LogEntry) -> tuple[IndexSlot, IndexSlot]:
    """Where this entry is indexed (NO_INDEX where it has no registration or recipient)."""
    return (
        registration_index(entry.registration_id) if entry.registration_id else NO_INDEX,
        recipient_index(entry.recipient) if entry.recipient else NO_INDEX,
    )


class DeliveryLog:
    """Appends entries to the stream (trimmed to `max_entries`) and echoes them to stdout."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        max_entries: int,
        echo: TextIO | None = sys.stdout,
        worker: str = "",
        clock: Clock = utc_now,
    ) -> None:
        self.redis = redis
        self.max_entries = max_entries
        self.echo = echo
        self.worker = worker
        self.clock = clock
        self._append = redis.register_script(_APPEND_SCRIPT)

    def now(self) -> str:
        """The timestamp for an entry written now."""
        return iso(self.clock())

    async def add(self, pipe: Pipeline, entry: LogEntry) -> None:
        """Queue the entry (and its index members) on a pipeline the caller executes with its
        state writes. The stream keeps one JSON field, so new fields need no migration."""
        (reg_bucket, reg_field), (rcpt_bucket, rcpt_field) = index_slots(entry)
        keys = [LOG_STREAM, reg_bucket, rcpt_bucket]
        args = [self.max_entries, entry.to_json(), reg_field, rcpt_field]
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


async def read_log(
    redis: RedisClient, *, newest_first: bool = True, batch: int = 1000
) -> AsyncIterator[LogEntry]:
    """Iterate over the whole log, newest entry first by default."""
    last = "+" if newest_first else "-"
    while True:
        if newest_first:
            rows = await redis.xrevrange(LOG_STREAM, max=last, min="-", count=batch + 1)
        else:
            rows = await redis.xrange(LOG_STREAM, min=last, max="+", count=batch + 1)
        if last not in ("+", "-") and rows:
            rows = rows[1:]  # the boundary entry was returned last time
        if not rows:
            return
        for entry_id, fields in rows:
            yield _decode(entry_id, fields)
        last = rows[-1][0].decode()


async def indexed_entries(
    redis: RedisClient, index: IndexSlot, *, limit: int | None = None
) -> list[LogEntry]:
    """The entries an index lists, newest first (the newest `limit` of them if given).

    One HGET and one pipelined XRANGE per entry, whatever the size of the whole log; ids
    whose entry the stream has trimmed away are skipped.
    """
    raw = await redis.hget(*index)
    if not raw:
        return []
    ids = raw.split()[-limit:] if limit else raw.split()
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in reversed(ids):
            pipe.xrange(LOG_STREAM, min=entry_id, max=entry_id, count=1)
        rows = await pipe.execute()
    return [_decode(found[0][0], found[0][1]) for found in rows if found]


_INT_FIELDS = frozenset({"attempt"})
_OPTIONAL_FIELDS = {"smtp_code": int, "enhanced_code": str}


def _decode(entry_id: bytes, fields: dict[bytes, bytes]) -> LogEntry:
    """The entry as mailer wrote it, or a `foreign` one that says what was found instead.

    Anyone with access to Redis can XADD to the stream; one odd entry must not stop every
    reader of the log (`mailer log`, `mailer retry --status`) at that point.
    """
    raw = fields.get(b"j")
    if raw is not None:
        try:
            entry = LogEntry.from_json(raw)
        except (ValueError, TypeError, AttributeError):  # not JSON, not an object, no ts/status
            pass
        else:
            if _well_formed(entry):
                return entry
    shown = ", ".join(
        f"{key.decode(errors='replace')}={value.decode(errors='replace')!r}" for key, value in fields.items()
    )
    millis = int(entry_id.split(b"-", 1)[0])
    return LogEntry(
        ts=iso(from_ms(millis)),
        status="foreign",
        detail=f"stream entry {entry_id.decode()} was not written by mailer: {shown[:200]}",
    )


def _well_formed(entry: LogEntry) -> bool:
    """Every field of the type mailer writes, and an aware timestamp readers can compare."""
    for name in LogEntry.__slots__:
        value = getattr(entry, name)
        if name in _OPTIONAL_FIELDS:
            ok = value is None or (isinstance(value, _OPTIONAL_FIELDS[name]) and not isinstance(value, bool))
        elif name in _INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            return False
    if entry.status not in LOG_STATUSES:
        return False
    try:
        return datetime.fromisoformat(entry.ts).tzinfo is not None
    except ValueError:
        return False


async def trim_log(redis: RedisClient, *, before_ms: int, budget: int) -> int:
    """Remove log entries older than `before_ms` (stream time) and their index members.

    At most `budget` entries per call, so one call never blocks Redis for long; call it
    again while it returns `budget`. Returns how many entries it removed.
    (Stub: the real trimming follows; it removes nothing yet.)
    """
    del redis, before_ms, budget
    return 0


async def forget_recipient(redis: RedisClient, address: str) -> int:
    """Erase `address` (any letter case) and its attendee name from the log and its indexes.

    Entries stay as anonymous counts (status, kind, event, time); returns how many entries
    named the address. (Stub: the real erasure follows; it removes nothing yet.)
    """
    del redis, address
    return 0
