"""The delivery log: one entry per outcome, kept in a Redis stream and printed as JSON lines.

Every writer appends through one Lua function (LOG_APPEND_LUA: `DeliveryLog.add`, and the
send path's step script), which writes the entry and, in the same call, every index and
counter the readers need (mailer.state.logquery reads them):

- the entry's stream id in its registration's and its recipient's field of a hash bucket
  (a list or set per registration costs ~230 B of key overhead on Redis 6.2; a field in one
  of 16 384 shared hashes costs its name and its ids);
- its position in the lists by event, status, kind and event|status (long lists are cheap
  per member; a position is an integer, which a list stores in 10 bytes);
- counters per status|kind, a latency histogram and the dead letters, overall and per event.

An entry is 18 fixed fields in a fixed order, so Redis stores the field names once per stream
node and each entry costs only its values. Stream ids follow the writer's clock (clamped to
stay increasing; `z` keeps the difference), so time ranges and retention are id ranges and an
injected clock means the same in the log as everywhere else.
"""

from __future__ import annotations

import math
import re
import sys
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TextIO, get_args

import orjson

from mailer.clock import Clock, iso, ms, utc_now
from mailer.constants import (
    LOG_BY_RECIPIENT_KEY,
    LOG_BY_REFERENCE_KEY,
    LOG_BY_REGISTRATION_KEY,
    LOG_COUNTS_KEY,
    LOG_DEAD_KEY,
    LOG_INDEXED_FROM_KEY,
    LOG_LATENCY_KEY,
    LOG_LIST_KEY,
    LOG_STREAM,
)
from mailer.state.redis_types import Pipeline, RedisClient

# Every state change of a message is one entry with one of these; "rejected" is bad input,
# "ignored" a replay, "foreign" a stream entry mailer did not write (shown, not trusted).
# Stored entries hold the position in this tuple: append new statuses, never reorder.
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
STATUS_CODES: dict[str, int] = {status: code for code, status in enumerate(LOG_STATUSES)}


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of the delivery log: enough to answer "did Ms X get her mail, and if not, why?".

    Never a mail body, never a credential. `detail` holds the relay's reply text whenever
    `smtp_code` is set.
    """

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
    locale: str = ""
    reference: str = ""  # the registration's reference in the producer's system, if any
    message_id_header: str = ""  # the Message-ID the mail carried (without brackets)
    sequence: int | None = None  # the calendar file's SEQUENCE, where the mail had one
    latency_ms: int | None = None  # sent entries: from first planned to the relay's reply
    entry_id: str = ""  # the stream id, set on entries read back (a cursor for paging)

    def to_json(self) -> bytes:
        # Read the slots directly: dataclasses.asdict deep-copies and was a visible cost per mail.
        return orjson.dumps(
            {k: v for k in self.__slots__ if (v := getattr(self, k)) not in (None, "") and k != "entry_id"}
        )

    @classmethod
    def from_json(cls, raw: bytes) -> LogEntry:
        data: dict[str, Any] = orjson.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__slots__})


# The stored layout: these field names, always all of them, in this order. Never reorder.
FIELDS: tuple[str, ...] = (
    "s",  # status: its position in LOG_STATUSES
    "m",  # message id
    "g",  # registration id, where the message id does not start with it
    "k",  # kind, where there is no message id to read it from
    "e",  # event id
    "r",  # recipient address
    "a",  # attempt
    "c",  # SMTP reply code
    "x",  # enhanced status code
    "d",  # detail
    "w",  # worker
    "v",  # producer event id that caused it
    "l",  # locale
    "f",  # registration reference
    "h",  # Message-ID header
    "q",  # calendar SEQUENCE
    "y",  # latency ms (sent entries)
    "z",  # entry time minus stream id time, ms (<= 0; "" for 0): set by the Lua
)
# A position: the stream id "<ms>-<seq>" as ms * 1024 + seq (exact in Lua's doubles until 2248).
SEQ_RANGE = 1024

# Quarter-octave buckets of latency: percentiles within 19 % from a few dozen counters.
LATENCY_BUCKETS_PER_OCTAVE = 4

# KEYS k..k+14: stream, registration bucket, recipient bucket, lists by event, status, kind,
# event|status, counts overall and of the event, latency overall and of the event, dead letters
# overall and of the event, the indexed-from mark, the reference bucket; '' skips one. ARGV
# a..a+7: maxlen, entry ms, registration field, recipient field, counts field, latency bucket
# (''), dead-letter action (add|del|''), message id; then the values of FIELDS but the last;
# then the recipient bucket's number and the reference field.
LOG_KEYS = 15
LOG_ARGS = 9 + len(FIELDS)
LOG_APPEND_LUA = """
local function log_num(v) return string.format('%.0f', v) end
local function log_index(bucket, field, id)
  if bucket == '' or field == '' then return end
  local ids = redis.call('HGET', bucket, field)
  redis.call('HSET', bucket, field, ids and (ids .. ' ' .. id) or id)
end
local function log_next_id(stream, ms, last)
  if not last then
    local top = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
    if top then last = top[1] end
  end
  if not last then return ms, 0 end
  local lt, ls = string.match(last, '^(%d+)-(%d+)$')
  lt, ls = tonumber(lt), tonumber(ls)
  if lt < ms then return ms, 0 end
  if ls + 1 < 1024 then return lt, ls + 1 end
  return lt + 1, 0
end
-- The address lives once, in its recipient bucket: the field (lower-cased) holds its token and
-- its entries' ids, the token field the address as first written. Entries hold the token, so
-- forgetting an address deletes two fields and leaves no copy in the stream.
local function log_token(bucket, field, number, address)
  local value = redis.call('HGET', bucket, field)
  local first = value and string.match(value, '^(%S+)')
  if first and string.sub(first, 1, 1) == '~' then return first end
  local token = '~' .. log_num(redis.call('HINCRBY', bucket, '#', 1) * 16384 + tonumber(number))
  -- A field an older mailer wrote holds entry ids only: the token goes in front of them.
  redis.call('HSET', bucket, field, value and (token .. ' ' .. value) or token, token, address)
  return token
end
local function log_xadd(stream, maxlen, ms, t, seq, values)
  values[#values] = ms - t == 0 and '' or log_num(ms - t)
  return redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, log_num(t) .. '-' .. seq, unpack(values))
end
local function log_append(K, k, A, a)
  local stream, ms = K[k], tonumber(A[a + 1])
  local values = {}
  local names = {'s', 'm', 'g', 'k', 'e', 'r', 'a', 'c', 'x', 'd', 'w', 'v', 'l', 'f', 'h', 'q', 'y', 'z'}
  for i = 1, #names do
    values[2 * i - 1] = names[i]
    values[2 * i] = A[a + 7 + i] or ''
  end
  values[36] = ''  -- z, set with the id
  if K[k + 2] ~= '' and A[a + 3] ~= '' then
    values[12] = log_token(K[k + 2], A[a + 3], A[a + 25], values[12])
  end
  local t, seq = log_next_id(stream, ms, nil)
  local ok = log_xadd(stream, A[a], ms, t, seq, values)
  if type(ok) == 'table' and ok.err then
    -- The newest entries were deleted (an erasure): ids must stay above the last one given.
    local info = redis.call('XINFO', 'STREAM', stream)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then t, seq = log_next_id(stream, ms, info[i + 1]) end
    end
    ok = log_xadd(stream, A[a], ms, t, seq, values)
    if type(ok) == 'table' and ok.err then return redis.error_reply(ok.err) end
  end
  local id = log_num(t) .. '-' .. seq
  local position = log_num(t * 1024 + seq)
  log_index(K[k + 1], A[a + 2], id)
  log_index(K[k + 2], A[a + 3], id)
  log_index(K[k + 14], A[a + 26], id)
  for i = k + 3, k + 6 do
    if K[i] ~= '' then redis.call('RPUSH', K[i], position) end
  end
  for i = k + 7, k + 8 do
    if K[i] ~= '' then redis.call('HINCRBY', K[i], A[a + 4], 1) end
  end
  for i = k + 9, k + 10 do
    if K[i] ~= '' and A[a + 5] ~= '' then redis.call('HINCRBY', K[i], A[a + 5], 1) end
  end
  for i = k + 11, k + 12 do
    if K[i] ~= '' and A[a + 6] == 'add' then redis.call('HSET', K[i], A[a + 7], position) end
    if K[i] ~= '' and A[a + 6] == 'del' then redis.call('HDEL', K[i], A[a + 7]) end
  end
  -- The first indexed entry marks where the lists begin: below it, an older mailer's entries.
  if K[k + 13] ~= '' then redis.call('SET', K[k + 13], position, 'NX') end
  return id
end
"""

_APPEND_SCRIPT = LOG_APPEND_LUA + "return log_append(KEYS, 1, ARGV, 1)"

# A message is a dead letter while its newest state change is `failed`; these end that.
_LEAVES_DEAD = frozenset({"planned", "sent", "retrying", "held", "skipped", "uncertain", "redriven"})

# An index is a field ("reg-1001", or "maria@example.org") in one of INDEX_BUCKETS hashes:
# 16 384 buckets keep ~60 fields a bucket at a million registrations.
INDEX_BUCKETS = 16_384
IndexSlot = tuple[str, str]  # (hash key, field); ("", "") for none
NO_INDEX: IndexSlot = ("", "")
ALL_SCOPE = "*"
# A log append: its KEYS and ARGV for log_append (what the step script takes on).
LogAppend = tuple[list[str], list[str | int]]


def _slot(template: str, name: str) -> IndexSlot:
    bucket = zlib.crc32(name.encode()) % INDEX_BUCKETS
    return template.format(bucket=bucket), name


def registration_index(registration_id: str) -> IndexSlot:
    return _slot(LOG_BY_REGISTRATION_KEY, registration_id)


def reference_index(reference: str) -> IndexSlot:
    """A registration system's reference (booking code), matched exactly."""
    return _slot(LOG_BY_REFERENCE_KEY, reference)


def recipient_index(recipient: str) -> IndexSlot:
    """The recipient's index; addresses are matched case-insensitively."""
    return _slot(LOG_BY_RECIPIENT_KEY, recipient.strip().lower())


def list_key(dim: Literal["e", "s", "k", "es"], value: str) -> str:
    return LOG_LIST_KEY.format(dim=dim, value=value)


def scope_of(event_id: str | None) -> str:
    return "e:" + event_id if event_id else ALL_SCOPE


def position_of(entry_id: str) -> int:
    """A stream id's position in the lists."""
    millis, _, seq = entry_id.partition("-")
    return int(millis) * SEQ_RANGE + int(seq or 0)


def id_of(position: int) -> str:
    return f"{position // SEQ_RANGE}-{position % SEQ_RANGE}"


def latency_bucket(latency_ms: int) -> int:
    return int(LATENCY_BUCKETS_PER_OCTAVE * math.log2(max(latency_ms, 0) + 1))


def bucket_upper_ms(bucket: int) -> float:
    """The largest latency a bucket holds."""
    return float(2 ** ((bucket + 1) / LATENCY_BUCKETS_PER_OCTAVE) - 1)


def kind_of(entry: LogEntry) -> str:
    """The entry's kind, read from its message id where it has none of its own."""
    if entry.kind:
        return entry.kind
    parts = entry.message_id.split("/")
    return parts[1] if len(parts) > 1 else ""


def append_parts(entry: LogEntry, *, max_entries: int, indexed: bool = True) -> LogAppend:
    """The KEYS and ARGV of log_append for `entry`."""
    message = entry.message_id
    prefix, _, rest = message.partition("/")
    kind = entry.kind or (rest.split("/", 1)[0] if rest else "")
    registration = entry.registration_id or (prefix if rest else "")
    status = entry.status
    keys = [LOG_STREAM] + [""] * (LOG_KEYS - 1)
    counts_field = f"{status}|{kind}"
    # Delivery latency is planned -> sent: only a sent entry adds to the histogram.
    timed = status == "sent" and entry.latency_ms is not None
    bucket = str(latency_bucket(entry.latency_ms)) if timed and entry.latency_ms is not None else ""
    # A dead letter is a message: a failure logged without one (a refused job) is only counted.
    dead = "" if not message else "add" if status == "failed" else "del" if status in _LEAVES_DEAD else ""
    reg_field = rcpt_field = ref_field = ""
    rcpt_bucket = 0
    detail = entry.detail
    if entry.recipient and entry.recipient.lower() in detail.lower():
        # Relay replies quote the address; the log keeps it only in the recipient's bucket.
        detail = re.sub(re.escape(entry.recipient), "<recipient>", detail, flags=re.IGNORECASE)
    if indexed:
        scopes = [ALL_SCOPE] + ([scope_of(entry.event_id)] if entry.event_id else [""])
        if registration:
            keys[1], reg_field = registration_index(registration)
        if entry.recipient:
            keys[2], rcpt_field = recipient_index(entry.recipient)
            rcpt_bucket = int(keys[2].rsplit(":", 1)[1])
        keys[3] = list_key("e", entry.event_id) if entry.event_id else ""
        keys[4] = list_key("s", status)
        keys[5] = list_key("k", kind) if kind else ""
        keys[6] = list_key("es", f"{entry.event_id}|{status}") if entry.event_id else ""
        for offset, template in ((7, LOG_COUNTS_KEY), (9, LOG_LATENCY_KEY), (11, LOG_DEAD_KEY)):
            keys[offset : offset + 2] = [template.format(scope=s) if s else "" for s in scopes]
        keys[13] = LOG_INDEXED_FROM_KEY
        if entry.reference:
            keys[14], ref_field = reference_index(entry.reference)
    code = entry.smtp_code
    args: list[str | int] = [
        max_entries,
        ms(datetime.fromisoformat(entry.ts)),
        reg_field,
        rcpt_field,
        counts_field,
        bucket,
        dead,
        message,
        STATUS_CODES[status],
        message,
        "" if registration == prefix and rest else entry.registration_id,
        "" if rest else entry.kind,
        entry.event_id,
        entry.recipient,
        entry.attempt,
        "" if code is None else code,
        entry.enhanced_code or "",
        detail,
        entry.worker,
        entry.source_event,
        entry.locale,
        entry.reference,
        entry.message_id_header,
        "" if entry.sequence is None else entry.sequence,
        "" if entry.latency_ms is None else entry.latency_ms,
        rcpt_bucket,
        ref_field,
    ]
    return keys, args


class DeliveryLog:
    """Appends entries to the stream (trimmed to `max_entries`) and echoes them to stdout.

    `indexed=False` writes the entries alone (the benchmark's measure of what indexing costs).
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

    def parts(self, entry: LogEntry) -> LogAppend:
        return append_parts(entry, max_entries=self.max_entries, indexed=self.indexed)

    async def add(self, pipe: Pipeline, entry: LogEntry) -> None:
        """Queue the entry (its indexes and counters with it) on a pipeline the caller
        executes with its state writes."""
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
