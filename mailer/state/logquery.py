"""Reading the delivery log: filtered pages newest first, with a cursor, and a registration's timeline.

Every read is one read-only Lua call that walks the narrowest source the filter allows (a
registration's or address's own entries, the list of an event|status, an event, a status or
a kind, else the stream), checks the other filters inside Redis, and returns at most `limit`
matches having looked at no more than `_BUDGET` entries, so no read blocks Redis for long
however sparse its matches; `query_log` calls again from the cursor until the page is full.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from mailer.clock import ms
from mailer.constants import LOG_BY_REGISTRATION_KEY, LOG_NAMES_KEY, LOG_STREAM
from mailer.state.logentry import STATUS_CODES, LogEntry, decode_raw, decode_stored
from mailer.state.loglua import (
    ADDRESS_PREFIX,
    HELPERS_LUA,
    RESOLVE_LUA,
    address_bucket,
    index_key,
    registration_bucket,
)
from mailer.state.redis_types import RedisClient

# Entries one call may look at (each an XRANGE of one id inside Redis, about a microsecond).
_BUDGET = 2000

# KEYS: stream, names, then the candidate lists (mode list) or the registration's bucket
# (mode slots). ARGV: mode, upper (exclusive member or ''), lower (inclusive member or ''),
# limit, budget, statuses (",code,code," or ''), kind, event, registration, message id,
# recipient lower-cased, its address bucket, '1' if nothing is filtered (foreign entries
# shown), the address bucket prefix, the registration (mode slots).
# Returns {cursor, exhausted, {id, 'v'|'raw', values...}...}.
_QUERY_SCRIPT = (
    HELPERS_LUA
    + RESOLVE_LUA
    + """
local stream, names = KEYS[1], KEYS[2]
local mode = ARGV[1]
local upper, lower = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
local want_status, want_kind, want_event = ARGV[6], ARGV[7], ARGV[8]
local want_reg, want_msg, want_lower = ARGV[9], ARGV[10], ARGV[11]
local plain, address_prefix = ARGV[13] == '1', ARGV[14]
local event_code, token = '', ''
if want_event ~= '' then
  event_code = redis.call('HGET', names, '=' .. want_event)
  if not event_code then return {'', 1} end
end
local address_value = nil
if want_lower ~= '' then
  address_value = redis.call('HGET', ARGV[12], want_lower)
  if not address_value then return {'', 1} end
  token = string.match(address_value, '^(%d+)')
end

local function matches(v)
  if want_status ~= '' and not string.find(want_status, ',' .. v[1] .. ',', 1, true) then return false end
  if event_code ~= '' and v[5] ~= event_code then return false end
  if token ~= '' and v[6] ~= token then return false end
  if want_msg ~= '' and v[2] ~= want_msg then return false end
  if want_kind ~= '' and log_kind_of(v) ~= want_kind then return false end
  if want_reg ~= '' and log_registration_of(v) ~= want_reg then return false end
  return true
end

local out = {'', 0}
local examined, last = 0, nil
local function finish() if last then out[1] = log_num(last) end return out end
-- Look at one entry; true when the page is full or the budget spent.
local function consider(member, row)
  examined = examined + 1
  last = member
  if row then
    local v = log_values(row[2])
    if v then
      if matches(v) then
        local item = log_resolved(v, names, address_prefix)
        table.insert(item, 1, 'v')
        table.insert(item, 1, row[1])
        out[#out + 1] = item
      end
    elseif plain then
      local item = {row[1], 'raw'}
      for i = 1, #row[2] do item[#item + 1] = row[2][i] end
      out[#out + 1] = item
    end
  end
  return #out - 2 >= limit or examined >= budget
end

local function walk_members(members)
  for _, member in ipairs(members) do
    if (not upper or member < upper) then
      if lower and member < lower then out[2] = 1 return end
      local row = redis.call('XRANGE', stream, log_id(member), log_id(member))[1]
      if consider(member, row) then return end
    end
  end
  out[2] = 1
end

local function slot_members(key, field, members)
  local packed = redis.call('HGET', key, field)
  if not packed then return end
  for pos = 1, #packed - 6, 7 do members[#members + 1] = log_unb7(packed, pos) end
end

if mode == 'oldest' then
  -- The whole stream oldest first, after `lower` (exclusive here).
  local lo = '-'
  if lower then lo = '(' .. log_id(lower) end
  local rows = redis.call('XRANGE', stream, lo, '+', 'COUNT', limit)
  for _, row in ipairs(rows) do consider(log_member(row[1]), row) end
  if #rows < limit then out[2] = 1 end
  if last then out[1] = log_num(last) end
  return finish()
elseif mode == 'stream' then
  local hi, lo = '+', '-'
  if upper then hi = '(' .. log_id(upper) end
  if lower then lo = log_id(lower) end
  while true do
    local rows = redis.call('XREVRANGE', stream, hi, lo, 'COUNT', 200)
    for _, row in ipairs(rows) do
      if consider(log_member(row[1]), row) then return finish() end
    end
    if #rows < 200 then out[2] = 1 return finish() end
    hi = '(' .. rows[#rows][1]
  end
elseif mode == 'list' then
  local key, n = nil, nil
  for i = 3, #KEYS do
    local len = redis.call('LLEN', KEYS[i])
    if not n or len < n then key, n = KEYS[i], len end
  end
  local pos = n - 1
  if upper then
    local lo, hi = 0, n - 1
    pos = -1
    while lo <= hi do
      local mid = math.floor((lo + hi) / 2)
      if tonumber(redis.call('LINDEX', key, mid)) < upper then pos = mid lo = mid + 1 else hi = mid - 1 end
    end
  end
  while pos >= 0 do
    local from = math.max(0, pos - 99)
    local chunk = redis.call('LRANGE', key, from, pos)
    for i = #chunk, 1, -1 do
      local member = tonumber(chunk[i])
      if lower and member < lower then out[2] = 1 return finish() end
      local id = log_id(member)
      if consider(member, redis.call('XRANGE', stream, id, id)[1]) then return finish() end
    end
    pos = from - 1
  end
  out[2] = 1
  return finish()
else
  local members = {}
  if mode == 'slots' then
    slot_members(KEYS[3], ARGV[15], members)
  else
    -- recipient: the address's own field and each of its registrations' (buckets as in Python)
    slot_members(ARGV[12], '@' .. token, members)
    local first = true
    for reg in string.gmatch(address_value, '%S+') do
      if not first then
        slot_members(string.gsub(ARGV[16], '{bucket}', log_bucket(reg)), reg, members)
      end
      first = false
    end
  end
  table.sort(members, function(a, b) return a > b end)
  local unique = {}
  for i, member in ipairs(members) do
    if i == 1 or member ~= members[i - 1] then unique[#unique + 1] = member end
  end
  walk_members(unique)
  return finish()
end
"""
)


@dataclass(frozen=True, slots=True)
class LogFilter:
    """Which entries a query wants; every given field must match (None: any).

    `recipient` matches in any letter case; `since` is inclusive, `until` exclusive;
    `statuses` any of them.
    """

    recipient: str | None = None
    registration: str | None = None
    message: str | None = None
    event: str | None = None
    statuses: tuple[str, ...] = ()
    kind: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        unknown = [s for s in self.statuses if s not in STATUS_CODES]
        if unknown:
            raise ValueError(f"unknown log status {unknown[0]!r}")

    @property
    def empty(self) -> bool:
        return self == LogFilter()


@dataclass(frozen=True, slots=True)
class LogPage:
    """Entries newest first; `cursor` fetches the page after this one (None: there is none).

    A full page may be followed by an empty one.
    """

    entries: list[LogEntry]
    cursor: str | None


async def query_log(
    redis: RedisClient, where: LogFilter | None = None, *, limit: int = 50, cursor: str | None = None
) -> LogPage:
    """One page of the entries that match `where`, newest first, after `cursor` if given.

    Needs the log's indexes (a DeliveryLog with indexing on); without them only an empty
    filter, `since`/`until` alone, or a registration, address or message finds anything.
    """
    where = where or LogFilter()
    keys, args = _plan(where)
    upper = _decode_cursor(cursor) if cursor else None
    if where.until is not None:
        bound = ms(where.until) * 1024
        upper = bound if upper is None else min(upper, bound)
    lower = ms(where.since) * 1024 if where.since is not None else None
    script = redis.register_script(_QUERY_SCRIPT)
    entries: list[LogEntry] = []
    while True:
        call = [args[0], "" if upper is None else upper, "" if lower is None else lower]
        call += [limit - len(entries), _BUDGET, *args[1:]]
        reply = await script(keys=keys, args=call)
        entries += [_decode(item) for item in reply[2:]]
        exhausted = int(reply[1]) == 1
        if exhausted:
            return LogPage(entries, None)
        upper = int(reply[0])
        if len(entries) >= limit:
            return LogPage(entries, _encode_cursor(upper))


async def iter_log(
    redis: RedisClient, where: LogFilter | None = None, *, batch: int = 500
) -> AsyncIterator[LogEntry]:
    """Every entry that matches, newest first, a page at a time (constant memory: exports)."""
    cursor: str | None = None
    while True:
        page = await query_log(redis, where, limit=batch, cursor=cursor)
        for entry in page.entries:
            yield entry
        if page.cursor is None:
            return
        cursor = page.cursor


async def scan_stream(
    redis: RedisClient, *, newest_first: bool = True, batch: int = 1000
) -> AsyncIterator[LogEntry]:
    """The whole log in stream order (oldest first if not `newest_first`), foreign entries too."""
    if newest_first:
        async for entry in iter_log(redis, batch=batch):
            yield entry
        return
    keys, args = _plan(LogFilter())
    args[0] = "oldest"
    script = redis.register_script(_QUERY_SCRIPT)
    after = ""
    while True:
        reply = await script(keys=keys, args=[args[0], "", after, batch, batch, *args[1:]])
        for item in reply[2:]:
            yield _decode(item)
        if int(reply[1]) == 1 or not reply[0]:
            return
        after = reply[0].decode()


def _plan(where: LogFilter) -> tuple[list[str], list[str | int]]:
    """The source to walk (keys and mode) and the filter arguments, narrowest source first."""
    keys = [LOG_STREAM, LOG_NAMES_KEY]
    statuses = "," + ",".join(str(STATUS_CODES[s]) for s in where.statuses) + "," if where.statuses else ""
    lower = where.recipient.strip().lower() if where.recipient else ""
    registration = where.registration or ""
    if where.message and not registration:
        registration = where.message.split("/", 1)[0]
    bucket = address_bucket(lower)[0] if lower else ""
    mode, slot = "stream", ""
    if registration:
        mode, slot = "slots", registration
        keys.append(registration_bucket(registration))
    elif lower:
        mode = "recipient"
    else:
        lists = _lists(where)
        if lists:
            mode = "list"
            keys += lists
    args: list[str | int] = [
        mode,
        statuses,
        where.kind or "",
        where.event or "",
        registration,
        where.message or "",
        lower,
        bucket,
        "1" if where.empty else "0",
        ADDRESS_PREFIX,
        slot,
        LOG_BY_REGISTRATION_KEY,
    ]
    return keys, args


def _lists(where: LogFilter) -> list[str]:
    """The index lists that hold every match; the script walks the shortest."""
    single = where.statuses[0] if len(where.statuses) == 1 else None
    if where.event and single:
        return [index_key("es", f"{where.event}|{single}")]
    lists = []
    if where.event:
        lists.append(index_key("e", where.event))
    if single:
        lists.append(index_key("s", single))
    if where.kind:
        lists.append(index_key("k", where.kind))
    return lists


def _decode(item: list[bytes]) -> LogEntry:
    if item[1] == b"v":
        return decode_stored(item[0], item[2:])
    return decode_raw(item[0], item[2:])


def _encode_cursor(member: int) -> str:
    return f"v1.{member:x}"


def _decode_cursor(cursor: str) -> int:
    """The position a cursor stands for; ValueError if it is not one query_log gave out."""
    version, _, value = cursor.partition(".")
    if version != "v1" or not value:
        raise ValueError(f"{cursor!r} is not a log cursor")
    return int(value, 16)


@dataclass(slots=True)
class MessageStory:
    """One message of a registration: every entry (attempts included) oldest first."""

    message_id: str
    kind: str
    entries: list[LogEntry] = field(default_factory=list)
    calendar_uid: str | None = None  # where its mail carried a calendar file
    sequence: int | None = None  # the SEQUENCE of the last calendar file sent

    @property
    def status(self) -> str:
        return self.entries[-1].status if self.entries else ""

    @property
    def attempts(self) -> int:
        return max((e.attempt for e in self.entries), default=0)


@dataclass(slots=True)
class Timeline:
    """A registration's story: its messages in the order they began, and entries of no message."""

    registration_id: str
    event_id: str = ""
    reference: str = ""
    recipient: str = ""
    messages: list[MessageStory] = field(default_factory=list)
    other: list[LogEntry] = field(default_factory=list)


async def registration_timeline(
    redis: RedisClient,
    registration_id: str,
    *,
    calendar_uid: Callable[[str, str], str] | None = None,
) -> Timeline:
    """Every entry of a registration, grouped by message, oldest first.

    `calendar_uid(event_id, registration_id)` gives the calendar file's UID (the content
    layer's `ics.calendar_uid` with the sender's domain); the state layer does not know it.
    """
    entries = [e async for e in iter_log(redis, LogFilter(registration=registration_id))]
    entries.reverse()
    timeline = Timeline(registration_id)
    stories: dict[str, MessageStory] = {}
    for entry in entries:
        timeline.event_id = entry.event_id or timeline.event_id
        timeline.reference = entry.reference or timeline.reference
        timeline.recipient = entry.recipient or timeline.recipient
        if not entry.message_id:
            timeline.other.append(entry)
            continue
        story = stories.get(entry.message_id)
        if story is None:
            story = stories[entry.message_id] = MessageStory(entry.message_id, entry.kind_name)
            timeline.messages.append(story)
        story.entries.append(entry)
        if entry.sequence is not None:
            story.sequence = entry.sequence
            if calendar_uid is not None and entry.event_id:
                story.calendar_uid = calendar_uid(entry.event_id, registration_id)
    return timeline
