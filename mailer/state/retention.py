"""Retention and erasure: what mailer stores about attendees, removed when its time is up or on request.

`Retention.run()` does a bounded amount of work each time (the worker's per-second tick calls
it, so sends never wait behind it): it trims delivery-log entries older than
MAILER_RETENTION_DAYS (`trim_log`, at most LOG_TRIM_BUDGET entries), then takes one SCAN page
of mailer's keys from a cursor kept in Redis. On that page:

- an event that ended more than the retention period ago is deleted with its set of active
  registrations and its schedule entries;
- a registration of such an event is deleted: attendee name and address, reference, the
  state of every message, and those messages' entries in the due index. A registration whose
  event is no longer stored (met after its event in the walk, or a cancellation that arrived
  before its registration) goes when its own last change is older than the retention period;
- a `seen:` key (a producer event id, kept against replays) that never expires is given the
  retention period as its time to live.

A finished walk rests for WALK_PAUSE_MS before the next starts. `erase_address` is the GDPR
erasure behind `mailer forget`: the address and name go from every registration that has them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

import orjson

from mailer.clock import Clock, ms, utc_now
from mailer.constants import (
    DUE_KEY,
    EVENT_KEY,
    EVENT_REGISTRATIONS_KEY,
    LOG_BY_RECIPIENT_KEY,
    LOG_BY_REFERENCE_KEY,
    LOG_BY_REGISTRATION_KEY,
    LOG_DEAD_KEY,
    LOG_LIST_KEY,
    PREFIX,
    REGISTRATION_KEY,
    SCHEDULE_KEY,
    SEEN_KEY,
)
from mailer.state.logerase import drop_event_log, trim_indexes, trim_log
from mailer.state.redis_types import RedisClient
from mailer.state.store import event_key, registration_key, registrations_key

logger = logging.getLogger("mailer.retention")

# Hash: cursor (of the walk through the keyspace), resume (ms: when the next walk may start).
RETENTION_KEY = PREFIX + "retention"
# One run at a time across all workers: two would read and write the same cursor.
RETENTION_LOCK_KEY = PREFIX + "retention:lock"

# Keys looked at per run: one SCAN page and a few pipelined reads and deletes, a few ms of Redis.
# At one run a second, a walk through a million keys takes about half an hour.
SCAN_COUNT = 500
# Log entries trimmed per run at most: more than mail is sent per second on the machines measured.
LOG_TRIM_BUDGET = 2000
WALK_PAUSE_MS = 3_600_000
LOCK_MS = 30_000
DAY_MS = 86_400_000

_EVENT_PREFIX = EVENT_KEY.format(event_id="")
_REGS_SUFFIX = EVENT_REGISTRATIONS_KEY.format(event_id="").removeprefix(_EVENT_PREFIX)
_REGISTRATION_PREFIX = REGISTRATION_KEY.format(registration_id="")
_SEEN_PREFIX = SEEN_KEY.format(event_id="")
# The log's index keys a page may hold, by the form trim_indexes needs to know.
_LOG_INDEX_FORMS = (
    (LOG_LIST_KEY.split("{", 1)[0], "list"),
    (LOG_BY_REGISTRATION_KEY.format(bucket=""), "bucket"),
    (LOG_BY_RECIPIENT_KEY.format(bucket=""), "bucket"),
    (LOG_BY_REFERENCE_KEY.format(bucket=""), "bucket"),
    (LOG_DEAD_KEY.format(scope=""), "dead"),
)

# KEYS[1]: the due index, then registration hashes; ARGV: per registration its id and the event id
# it was judged by ('' for none). A registration that names another event by now is kept.
# A message's state field "m:<kind>[/<disc>]" is message "<registration>/<kind>[/<disc>]".
_DELETE_REGISTRATIONS = """
local removed = 0
for i = 2, #KEYS do
  local rid, event = ARGV[2 * i - 3], ARGV[2 * i - 2]
  if (redis.call('HGET', KEYS[i], 'e') or '') == event then
    for _, f in ipairs(redis.call('HKEYS', KEYS[i])) do
      if string.sub(f, 1, 2) == 'm:' then redis.call('ZREM', KEYS[1], rid .. '/' .. string.sub(f, 3)) end
    end
    redis.call('DEL', KEYS[i])
    removed = removed + 1
  end
end
return removed
"""

# KEYS: seen keys; ARGV[1]: time to live (ms), set only where none is.
_BOUND_SEEN = """
local bounded = 0
for i = 1, #KEYS do
  if redis.call('PTTL', KEYS[i]) == -1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    bounded = bounded + 1
  end
end
return bounded
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# KEYS: pairs of (registration hash, its event's set of active registrations, or the hash again
# when it has no event); ARGV: per pair the address as read and the registration id. Only while
# the address is still the one read: name, address, reference and manage link go, the
# registration ends as cancelled and leaves the event's fan-out set, so nothing more is sent
# to it (a message already due is skipped: no address). Its status and message states stay.
# Name, reference and link may be stored in pieces ("rm", "rm.1", ...: store.pieces).
_ERASE = """
local erased = {}
for i = 1, #KEYS, 2 do
  local address, rid = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[i], 'ae') == address then
    redis.call('HDEL', KEYS[i], 'ae', 'an', 'rr', 'rm')
    for _, f in ipairs(redis.call('HKEYS', KEYS[i])) do
      if string.find(f, '^an%.%d+$') or string.find(f, '^r[rm]%.%d+$') then redis.call('HDEL', KEYS[i], f) end
    end
    redis.call('HSET', KEYS[i], 's', 'cancelled')
    if KEYS[i + 1] ~= KEYS[i] then redis.call('SREM', KEYS[i + 1], rid) end
    erased[#erased + 1] = rid
  end
end
return erased
"""


@dataclass(slots=True)
class RetentionReport:
    """What one run did; `walk_done` when its page ended a walk through the keyspace."""

    log_entries: int = 0
    log_indexes: int = 0  # ids trimmed from the log's indexes
    scanned: int = 0
    events: int = 0
    registrations: int = 0
    seen_bounded: int = 0
    walk_done: bool = False
    resting: bool = False  # between walks: only the log was trimmed
    busy: bool = False  # another worker's run holds the lock: nothing done

    def counts(self) -> dict[str, int]:
        """For the tick job's result: what was removed."""
        return {
            "retention_log_entries": self.log_entries,
            "retention_events": self.events,
            "retention_registrations": self.registrations,
        }


@dataclass(slots=True)
class _Page:
    """The keys of one SCAN page, by what they are."""

    events: set[str] = field(default_factory=set)  # ids of events met as a hash or a registration set
    registrations: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)
    log_indexes: list[tuple[str, str]] = field(default_factory=list)  # (key, form)


class Retention:
    """Removes, a bounded slice per `run()`, what outlived MAILER_RETENTION_DAYS."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        days: int,
        clock: Clock = utc_now,
        scan_count: int = SCAN_COUNT,
        log_budget: int = LOG_TRIM_BUDGET,
    ) -> None:
        self.redis = redis
        self.days = days
        self.clock = clock
        self.scan_count = scan_count
        self.log_budget = log_budget
        self._delete = redis.register_script(_DELETE_REGISTRATIONS)
        self._bound = redis.register_script(_BOUND_SEEN)
        self._release = redis.register_script(_RELEASE)

    async def run(self) -> RetentionReport:
        """One bounded slice: trim the log, then one page of the walk (unless resting)."""
        report = RetentionReport()
        token = secrets.token_hex(8)
        if not await self.redis.set(RETENTION_LOCK_KEY, token, px=LOCK_MS, nx=True):
            report.busy = True
            return report
        try:
            now_ms = ms(self.clock())
            cutoff_ms = now_ms - self.days * DAY_MS
            report.log_entries = await trim_log(self.redis, before_ms=cutoff_ms, budget=self.log_budget)
            await self._walk(now_ms, cutoff_ms, report)
        finally:
            await self._release(keys=[RETENTION_LOCK_KEY], args=[token])
        return report

    async def _walk(self, now_ms: int, cutoff_ms: int, report: RetentionReport) -> None:
        state = await self.redis.hgetall(RETENTION_KEY)
        cursor = int(state.get(b"cursor", 0))
        if cursor == 0 and now_ms < int(state.get(b"resume", 0)):
            report.resting = True
            return
        cursor, keys = await self.redis.scan(cursor, match=PREFIX + "*", count=self.scan_count)
        report.scanned = len(keys)
        await self._page(_sort(keys), cutoff_ms=cutoff_ms, report=report)
        fields = {"cursor": cursor}
        if cursor == 0:
            fields["resume"] = now_ms + WALK_PAUSE_MS
            report.walk_done = True
        await self.redis.hset(RETENTION_KEY, mapping=fields)

    async def _page(self, page: _Page, *, cutoff_ms: int, report: RetentionReport) -> None:
        if page.seen:
            report.seen_bounded = int(await self._bound(keys=page.seen, args=[self.days * DAY_MS]))
        report.log_indexes = await trim_indexes(self.redis, page.log_indexes, before_ms=cutoff_ms)
        owners = await self._owners(page.registrations)
        ended, missing = await self._ended(page.events | {e for e, _ in owners.values() if e}, cutoff_ms)
        await self._purge_events(ended)
        report.events = len(ended)
        doomed = [
            (registration_id, event)
            for registration_id, (event, changed_ms) in owners.items()
            # With its event gone (or never stored), a registration's own age decides.
            if event in ended or ((not event or event in missing) and changed_ms < cutoff_ms)
        ]
        report.registrations = await self._delete_registrations(doomed)

    async def _owners(self, registration_ids: list[str]) -> dict[str, tuple[str, int]]:
        """registration id -> (its event id or "", its last change in ms)."""
        if not registration_ids:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for registration_id in registration_ids:
                pipe.hget(registration_key(registration_id), "e")
                pipe.hget(registration_key(registration_id), "t")
            rows = await pipe.execute()
        owners: dict[str, tuple[str, int]] = {}
        for at, registration_id in enumerate(registration_ids):
            event, changed = rows[2 * at], rows[2 * at + 1]
            if event is None and changed is None:
                continue  # deleted since the scan
            owners[registration_id] = ((event or b"").decode(), int(changed or 0))
        return owners

    async def _ended(self, event_ids: set[str], cutoff_ms: int) -> tuple[set[str], set[str]]:
        """(events that ended before `cutoff_ms`, events not stored)."""
        ids = sorted(event_ids)
        if not ids:
            return set(), set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for event_id in ids:
                pipe.hget(event_key(event_id), "data")
            rows = await pipe.execute()
        ended: set[str] = set()
        missing: set[str] = set()
        for event_id, data in zip(ids, rows, strict=True):
            if data is None:
                missing.add(event_id)
                continue
            try:
                ends_ms = ms(datetime.fromisoformat(orjson.loads(data)["ends_at"]))
            except (ValueError, KeyError, TypeError) as exc:  # kept: unreadable is not "ended"
                logger.warning("retention: event %s cannot be read, kept: %r", event_id, exc)
                continue
            if ends_ms < cutoff_ms:
                ended.add(event_id)
        return ended, missing

    async def _purge_events(self, event_ids: set[str]) -> None:
        if not event_ids:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for event_id in sorted(event_ids):
                pipe.delete(event_key(event_id), registrations_key(event_id))
            await pipe.execute()
        await drop_event_log(self.redis, event_ids)
        for event_id in sorted(event_ids):
            await self._unschedule(event_id)

    async def _unschedule(self, event_id: str) -> None:
        """Remove the event's schedule entries ("<event>|<kind>|<detail>"; ids hold no glob characters)."""
        cursor = 0
        while True:
            cursor, rows = await self.redis.zscan(SCHEDULE_KEY, cursor, match=f"{event_id}|*", count=1000)
            if rows:
                await self.redis.zrem(SCHEDULE_KEY, *(member for member, _ in rows))
            if cursor == 0:
                return

    async def _delete_registrations(self, doomed: list[tuple[str, str]]) -> int:
        if not doomed:
            return 0
        keys = [DUE_KEY, *(registration_key(registration_id) for registration_id, _ in doomed)]
        args = [part for pair in doomed for part in pair]
        return int(await self._delete(keys=keys, args=args))


def _sort(raw_keys: list[bytes]) -> _Page:
    page = _Page()
    for raw in raw_keys:
        try:
            key = raw.decode()
        except UnicodeDecodeError:
            continue  # not a key mailer writes
        if key.startswith(_REGISTRATION_PREFIX):
            page.registrations.append(key.removeprefix(_REGISTRATION_PREFIX))
        elif key.startswith(_SEEN_PREFIX):
            page.seen.append(key)
        elif key.startswith(_EVENT_PREFIX):
            page.events.add(key.removeprefix(_EVENT_PREFIX).removesuffix(_REGS_SUFFIX))
        else:
            page.log_indexes += [(key, form) for prefix, form in _LOG_INDEX_FORMS if key.startswith(prefix)]
    return page


async def _holders(
    redis: RedisClient, address: str, *, page: int
) -> AsyncIterator[list[tuple[str, str, str]]]:
    """Pages of (registration id, the address as stored, event id or "") of the registrations
    holding `address` in any letter case. There is no index by address: this walks them all,
    one SCAN page a round trip (seconds at a million)."""
    wanted = address.strip().lower()
    cursor = 0
    while True:
        cursor, keys = await redis.scan(cursor, match=_REGISTRATION_PREFIX + "*", count=page)
        ids = _sort(keys).registrations
        async with redis.pipeline(transaction=False) as pipe:
            for registration_id in ids:
                pipe.hget(registration_key(registration_id), "ae")
                pipe.hget(registration_key(registration_id), "e")
            rows = await pipe.execute()
        found = []
        for at, registration_id in enumerate(ids):
            stored, event = rows[2 * at], rows[2 * at + 1]
            if stored is not None and stored.decode().strip().lower() == wanted:
                found.append((registration_id, stored.decode(), (event or b"").decode()))
        yield found
        if cursor == 0:
            return


async def registrations_holding(redis: RedisClient, address: str, *, page: int = 1000) -> list[str]:
    """The ids of the registrations that hold `address` (any letter case): an access request."""
    return [rid async for found in _holders(redis, address, page=page) for rid, _, _ in found]


async def erase_address(redis: RedisClient, address: str, *, page: int = 1000) -> list[tuple[str, str]]:
    """Remove `address` (any letter case) and its name from every registration; GDPR erasure.

    Returns (registration id, event id or "") of each one erased.
    """
    erase = redis.register_script(_ERASE)
    erased: list[tuple[str, str]] = []
    async for found in _holders(redis, address, page=page):
        if not found:
            continue
        keys: list[str] = []
        args: list[str] = []
        for registration_id, stored, event in found:
            own = registration_key(registration_id)
            keys += [own, registrations_key(event) if event else own]
            args += [stored, registration_id]
        events = {registration_id: event for registration_id, _, event in found}
        erased += [(rid.decode(), events[rid.decode()]) for rid in await erase(keys=keys, args=args)]
    return erased
