"""Reading the delivery log: filters, cursor pages from the right index, and the counters.

A query reads from the most selective index its filter names and checks the rest on each
entry it reads: a message or registration from the registration's field, an address from the
recipient's, then the lists by event|status, event, status, kind, and with no filter at all
the stream itself. Every source is read newest first from a position (the cursor), so the
first page costs the same at a thousand entries as at a million.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from mailer.clock import from_ms, iso, ms
from mailer.constants import (
    DUE_KEY,
    LOG_BY_RECIPIENT_KEY,
    LOG_COUNTS_KEY,
    LOG_DEAD_KEY,
    LOG_INDEXED_FROM_KEY,
    LOG_LATENCY_KEY,
    LOG_STREAM,
)
from mailer.state.deliverylog import (
    FIELDS,
    INDEX_BUCKETS,
    LOG_STATUSES,
    SEQ_RANGE,
    IndexSlot,
    LogEntry,
    bucket_upper_ms,
    id_of,
    kind_of,
    list_key,
    position_of,
    recipient_index,
    reference_index,
    registration_index,
    scope_of,
)
from mailer.state.redis_types import RedisClient

# Entries of one stream are in id order, and an id is never before its entry's time; but a
# writer whose clock ran behind the newest entry gets an id after its time. `until` therefore
# reads this far past itself and checks each entry's own time.
CLOCK_SKEW = timedelta(seconds=60)

# KEYS[1] a list of positions, KEYS[2] the stream; ARGV: upper position (exclusive, '' for the
# newest), lower position (inclusive, '' for none), count. Returns {more, lowest position read,
# id1, fields1, id2, fields2, ...} newest first; fields are false for an entry trimmed away.
_LIST_PAGE = """
local n = redis.call('LLEN', KEYS[1])
-- Redis before 7 walks a list from its head for any index >= 0 (LRANGE converts negative
-- ones first), which costs a quarter of a millisecond at 500 000 positions; LINDEX with a
-- negative index walks from the tail, where the newest positions are.
local function at(i)
  if i >= n / 2 then return redis.call('LINDEX', KEYS[1], i - n) end
  return redis.call('LINDEX', KEYS[1], i)
end
local hi = n
if ARGV[1] ~= '' then
  local upper, lo = tonumber(ARGV[1]), 0
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if tonumber(at(mid)) < upper then lo = mid + 1 else hi = mid end
  end
end
local out = {0, ''}
if hi == 0 then return out end
local start = math.max(0, hi - tonumber(ARGV[3]))
local lower = nil
if ARGV[2] ~= '' then lower = tonumber(ARGV[2]) end
if start > 0 then out[1] = 1 end
for i = hi - 1, start, -1 do
  local member = at(i)
  local p = tonumber(member)
  if lower and p < lower then out[1] = 0; break end
  out[2] = member
  local seq = p % 1024
  local id = string.format('%.0f', (p - seq) / 1024) .. '-' .. string.format('%.0f', seq)
  local found = redis.call('XRANGE', KEYS[2], id, id)
  out[#out + 1] = id
  out[#out + 1] = found[1] and found[1][2] or false
end
return out
"""


@dataclass(frozen=True, slots=True)
class LogFilter:
    """Which entries to read: every given field must match; `since` inclusive, `until` not."""

    recipient: str | None = None
    registration: str | None = None
    reference: str | None = None  # the registration system's booking code, exactly
    message: str | None = None
    event: str | None = None
    status: str | None = None
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, entry: LogEntry) -> bool:
        moment = datetime.fromisoformat(entry.ts)
        return not (
            (self.recipient and entry.recipient.lower() != self.recipient.strip().lower())
            or (self.registration and entry.registration_id != self.registration)
            or (self.reference and entry.reference != self.reference)
            or (self.message and entry.message_id != self.message)
            or (self.event and entry.event_id != self.event)
            or (self.status and entry.status != self.status)
            or (self.kind and kind_of(entry) != self.kind)
            or (self.since and moment < self.since)
            or (self.until and moment >= self.until)
        )

    @property
    def lower(self) -> int | None:
        """The lowest position an entry at or after `since` can have."""
        return position_at(self.since) if self.since else None

    @property
    def upper(self) -> int | None:
        """The position above every entry before `until` (clock skew included)."""
        return position_at(self.until, later=CLOCK_SKEW) if self.until else None


def position_at(moment: datetime, *, later: timedelta = timedelta(0)) -> int:
    """The log position of a moment, clamped to what stream ids can say: a time before 1970
    is position 0, one past year 9999 (the skew added to 9999-12-31) the last of that year."""
    try:
        moment += later
    except OverflowError:
        moment = (
            datetime.min.replace(tzinfo=UTC) if later < timedelta(0) else datetime.max.replace(tzinfo=UTC)
        )
    return max(0, ms(moment)) * SEQ_RANGE


@dataclass(frozen=True, slots=True)
class LogPage:
    """Entries newest first, and the cursor for the older ones (None: there are none)."""

    entries: list[LogEntry]
    cursor: str | None


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> LogEntry:
    """An entry as stored: mailer's layout, an older mailer's JSON, or `foreign` (shown as found).

    Anyone with access to Redis can XADD to the stream; one odd entry must not stop every
    reader of the log (`mailer log`, `mailer retry --status`) at that point.
    """
    ident = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        if len(fields) == len(FIELDS) and b"s" in fields:
            return _decode_fields(ident, fields)
        if b"j" in fields:
            entry = LogEntry.from_json(fields[b"j"])
            if _well_formed(entry):
                return _with_id(entry, ident)
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        pass
    shown = ", ".join(
        f"{key.decode(errors='replace')}={value.decode(errors='replace')!r}" for key, value in fields.items()
    )
    return LogEntry(
        ts=iso(from_ms(position_of(ident) // SEQ_RANGE)),
        status="foreign",
        detail=f"stream entry {ident} was not written by mailer: {shown[:200]}",
        entry_id=ident,
    )


def _decode_fields(ident: str, raw: dict[bytes, bytes]) -> LogEntry:
    v = {name: raw[name.encode()].decode() for name in FIELDS}
    message = v["m"]
    prefix, _, rest = message.partition("/")
    millis = position_of(ident) // SEQ_RANGE + int(v["z"] or 0)
    return LogEntry(
        ts=iso(from_ms(millis)),
        status=LOG_STATUSES[int(v["s"])],
        message_id=message,
        kind=v["k"] or (rest.split("/", 1)[0] if rest else ""),
        registration_id=v["g"] or (prefix if rest else ""),
        event_id=v["e"],
        recipient=v["r"],
        attempt=int(v["a"] or 0),
        detail=v["d"],
        worker=v["w"],
        smtp_code=int(v["c"]) if v["c"] else None,
        enhanced_code=v["x"] or None,
        source_event=v["v"],
        locale=v["l"],
        reference=v["f"],
        message_id_header=v["h"],
        sequence=int(v["q"]) if v["q"] else None,
        latency_ms=int(v["y"]) if v["y"] else None,
        entry_id=ident,
    )


def _with_id(entry: LogEntry, ident: str) -> LogEntry:
    data = {name: getattr(entry, name) for name in LogEntry.__slots__}
    return LogEntry(**data | {"entry_id": ident})


_INT_FIELDS = frozenset({"attempt"})
_OPTIONAL_FIELDS = {"smtp_code": int, "enhanced_code": str, "sequence": int, "latency_ms": int}


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
    return datetime.fromisoformat(entry.ts).tzinfo is not None


async def log_page(
    redis: RedisClient, flt: LogFilter, *, cursor: str | None = None, limit: int = 50
) -> LogPage:
    """Up to `limit` matching entries older than `cursor` (an entry id), newest first."""
    slot = _slot_for(flt)
    if slot is not None:
        return await _slot_page(redis, slot, flt, cursor, limit)
    upper = position_of(cursor) if cursor else flt.upper
    found: list[LogEntry] = []
    source = _list_for(flt)
    floor = await indexed_from(redis)
    if floor is not None and (upper is None or upper > floor):
        lower = max(flt.lower or 0, floor)

        def rows(up: int | None, count: int) -> Awaitable[tuple[list[LogEntry], int | None]]:
            if source is None:
                return _stream_rows(redis, up, lower, count)
            return _list_rows(redis, source, up, lower, count)

        if await _fill(rows, flt, found, limit, upper):
            return LogPage(found, found[-1].entry_id)
        upper = floor
    # Below the first indexed entry lie only entries an older mailer wrote: walked, as it did.
    # Their ids are Redis's clock, not the writer's, so `since` allows for the skew between.
    older = None if flt.since is None else position_at(flt.since, later=-CLOCK_SKEW)
    full = await _fill(lambda up, count: _stream_rows(redis, up, older, count), flt, found, limit, upper)
    return LogPage(found, found[-1].entry_id if full else None)


async def _fill(
    rows: Callable[[int | None, int], Awaitable[tuple[list[LogEntry], int | None]]],
    flt: LogFilter,
    found: list[LogEntry],
    limit: int,
    upper: int | None,
) -> bool:
    """Add matching rows below `upper` to `found` until it holds `limit`; whether it does."""
    while True:
        batch, upper = await rows(upper, max(limit - len(found), 50))
        for entry in batch:
            if flt.matches(entry):
                found.append(entry)
                if len(found) == limit:
                    return True
        if upper is None:
            return False


async def indexed_from(redis: RedisClient) -> int | None:
    """The position of the first entry this mailer indexed (None: none yet). The lists and
    counters hold every entry from there on; below it lie entries an older mailer wrote."""
    raw = await redis.get(LOG_INDEXED_FROM_KEY)
    return int(raw) if raw is not None else None


async def iter_log(
    redis: RedisClient, flt: LogFilter | None = None, *, page: int = 500
) -> AsyncIterator[LogEntry]:
    """Every matching entry, newest first, a page at a time (constant memory)."""
    flt = flt or LogFilter()
    cursor: str | None = None
    while True:
        result = await log_page(redis, flt, cursor=cursor, limit=page)
        for entry in result.entries:
            yield entry
        if result.cursor is None:
            return
        cursor = result.cursor


async def read_log(
    redis: RedisClient, *, newest_first: bool = True, batch: int = 1000
) -> AsyncIterator[LogEntry]:
    """The whole log, newest entry first by default."""
    if newest_first:
        async for entry in iter_log(redis, page=batch):
            yield entry
        return
    bottom = "-"
    while True:
        rows = await redis.xrange(LOG_STREAM, min=bottom, max="+", count=batch)
        for entry in await resolve(redis, [decode(entry_id, fields) for entry_id, fields in rows]):
            yield entry
        if len(rows) < batch:
            return
        bottom = "(" + rows[-1][0].decode()


async def indexed_entries(
    redis: RedisClient, index: IndexSlot, *, limit: int | None = None
) -> list[LogEntry]:
    """The entries an index field lists, newest first (the newest `limit` of them if given)."""
    ids = entry_ids(await redis.hget(*index))
    return await entries_at(redis, list(reversed(ids[-limit:] if limit else ids)))


async def top_position(redis: RedisClient) -> int:
    """The position of the newest entry (0 for an empty log): every later one lies above it."""
    rows = await redis.xrevrange(LOG_STREAM, count=1)
    return position_of(rows[0][0].decode()) if rows else 0


def entry_ids(raw: bytes | None) -> list[str]:
    """The entry ids of an index field, oldest first (a recipient's starts with its token)."""
    return [i for i in raw.decode().split() if not i.startswith("~")] if raw else []


def _slot_for(flt: LogFilter) -> IndexSlot | None:
    registration = flt.registration or (flt.message.split("/", 1)[0] if flt.message else None)
    if registration:
        return registration_index(registration)
    if flt.reference:
        return reference_index(flt.reference)
    return recipient_index(flt.recipient) if flt.recipient else None


def _list_for(flt: LogFilter) -> str | None:
    if flt.event and flt.status:
        return list_key("es", f"{flt.event}|{flt.status}")
    if flt.event:
        return list_key("e", flt.event)
    if flt.status:
        return list_key("s", flt.status)
    return list_key("k", flt.kind) if flt.kind else None


async def _slot_page(
    redis: RedisClient, slot: IndexSlot, flt: LogFilter, cursor: str | None, limit: int
) -> LogPage:
    raw = await redis.hget(*slot)
    upper = position_of(cursor) if cursor else flt.upper
    lower = flt.lower
    ids = [
        i
        for i in reversed(entry_ids(raw))
        if (upper is None or position_of(i) < upper) and (lower is None or position_of(i) >= lower)
    ]
    found: list[LogEntry] = []
    for start in range(0, len(ids), limit):
        for entry in await entries_at(redis, ids[start : start + limit]):
            if flt.matches(entry):
                found.append(entry)
                if len(found) == limit:
                    return LogPage(found, entry.entry_id)
    return LogPage(found, None)


async def entries_at(redis: RedisClient, ids: list[str]) -> list[LogEntry]:
    """The entries of these ids, in this order; ids whose entry was trimmed are skipped."""
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in ids:
            pipe.xrange(LOG_STREAM, min=entry_id, max=entry_id, count=1)
        rows = await pipe.execute()
    return await resolve(redis, [decode(found[0][0], found[0][1]) for found in rows if found])


async def resolve(redis: RedisClient, entries: list[LogEntry]) -> list[LogEntry]:
    """The entries with their recipient's address in place of its token ("" once forgotten)."""
    tokens = sorted({e.recipient for e in entries if e.recipient.startswith("~")})
    if not tokens:
        return entries
    async with redis.pipeline(transaction=False) as pipe:
        for token in tokens:
            pipe.hget(LOG_BY_RECIPIENT_KEY.format(bucket=int(token[1:]) % INDEX_BUCKETS), token)
        found = await pipe.execute()
    address = {t: (a or b"").decode() for t, a in zip(tokens, found, strict=True)}
    return [replace(e, recipient=address[e.recipient]) if e.recipient.startswith("~") else e for e in entries]


async def _stream_rows(
    redis: RedisClient, upper: int | None, lower: int | None, count: int
) -> tuple[list[LogEntry], int | None]:
    """A page of the stream below `upper`, and where the next one starts (None: no more)."""
    if upper == 0:
        return [], None  # nothing lies below the first position ("(0-0" is no range to Redis)
    top = "(" + id_of(upper) if upper is not None else "+"
    bottom = id_of(lower) if lower is not None else "-"
    rows = await redis.xrevrange(LOG_STREAM, max=top, min=bottom, count=count)
    entries = await resolve(redis, [decode(entry_id, fields) for entry_id, fields in rows])
    return entries, position_of(entries[-1].entry_id) if len(rows) == count else None


async def _list_rows(
    redis: RedisClient, key: str, upper: int | None, lower: int | None, count: int
) -> tuple[list[LogEntry], int | None]:
    """A page of a list below `upper`, and where the next one starts (None: no more)."""
    script = redis.register_script(_LIST_PAGE)
    args: list[Any] = ["" if upper is None else upper, "" if lower is None else lower, count]
    out = await script(keys=[key, LOG_STREAM], args=args)
    rows = out[2:]
    entries = [
        decode(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        for entry_id, flat in zip(rows[::2], rows[1::2], strict=True)
        if flat  # trimmed away since
    ]
    return await resolve(redis, entries), int(out[1]) if out[0] else None


# --- counters -------------------------------------------------------------------------


@dataclass(slots=True)
class LogCounts:
    """What the append counted for one scope (all events, or one): no entry is read."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, kind) -> entries
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p90, p99, max (bucket tops)
    sent: int = 0  # sent entries with a latency: the percentiles' sample
    dead_letters: int = 0
    oldest_due: tuple[str, datetime] | None = None  # over all events: (message id, due)
    # Entries older than this were written by an older mailer, before the counters (None: none).
    uncounted_before: datetime | None = None


async def log_counts(redis: RedisClient, event_id: str | None = None) -> LogCounts:
    """Counts, latency percentiles and dead letters of one event (or all), and the oldest due message."""
    scope = scope_of(event_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(LOG_COUNTS_KEY.format(scope=scope))
        pipe.hgetall(LOG_LATENCY_KEY.format(scope=scope))
        pipe.hlen(LOG_DEAD_KEY.format(scope=scope))
        pipe.zrange(DUE_KEY, 0, 0, withscores=True)
        pipe.get(LOG_INDEXED_FROM_KEY)
        pipe.xrange(LOG_STREAM, count=1)
        counts, latency, dead, due, floor, bottom = await pipe.execute()
    result = LogCounts(dead_letters=int(dead))
    if bottom and (floor is None or position_of(bottom[0][0].decode()) < int(floor)):
        result.uncounted_before = from_ms(
            (int(floor) if floor else position_of(bottom[0][0].decode()) + 1) // SEQ_RANGE
        )
    for name, value in counts.items():
        status, _, kind = name.decode().partition("|")
        result.counts[(status, kind)] = int(value)
    histogram = {int(bucket): int(n) for bucket, n in latency.items()}
    result.sent = sum(histogram.values())
    result.latency_ms = histogram_percentiles(histogram)
    if due:
        message, score = due[0]
        result.oldest_due = (message.decode(), from_ms(int(score)))
    return result


def histogram_percentiles(histogram: dict[int, int]) -> dict[str, float]:
    """Nearest-rank p50, p90, p99 and the maximum, each the upper edge of its bucket."""
    total = sum(histogram.values())
    if not total:
        return {}
    ordered = sorted(histogram.items())
    out: dict[str, float] = {}
    for name, p in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        rank, seen = max(1, math.ceil(p * total)), 0
        for bucket, n in ordered:
            seen += n
            if seen >= rank:
                out[name] = round(bucket_upper_ms(bucket))
                break
    out["max"] = round(bucket_upper_ms(ordered[-1][0]))
    return out
