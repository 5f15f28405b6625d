"""The delivery log's Lua: the entry layout, the append every writer runs, and shared helpers.

One stream entry holds FIELDS, always all of them in this order, so Redis stores the field
names once per stream node and each entry costs only its values (small integers and empty
strings take two bytes). Event ids, worker names and Message-ID domains are interned to small
integers (LOG_NAMES_KEY); the recipient is a token whose address lives in its address bucket,
so forgetting an address deletes a mapping instead of rewriting entries.

An entry's position ("member") is its stream id packed as ms * 1024 + seq: an integer that
lists store in 10 bytes and the per-registration fields in 7 (`log_b7`). The append keeps seq
below 1024 by moving to the next millisecond, and stores the entry's own clock time as an
offset (`z`) from its stream id.
"""

from __future__ import annotations

import math

from mailer.constants import (
    LOG_ADDRESS_KEY,
    LOG_BY_REGISTRATION_KEY,
    LOG_INDEX_KEY,
    LOG_LATENCY_KEY,
    LOG_STATS_KEY,
)

# Field name -> what it holds. Never reorder: stored entries are read by position.
FIELDS: tuple[tuple[str, str], ...] = (
    ("s", "status code (index in LOG_STATUSES)"),
    ("m", "message id"),
    ("g", "registration id, when the message id does not already start with it"),
    ("k", "kind, when there is no message id to read it from"),
    ("e", "event id (interned)"),
    ("r", "recipient token"),
    ("a", "attempt"),
    ("c", "SMTP reply code"),
    ("x", "enhanced status code"),
    ("t", "SMTP reply text (the recipient's address masked)"),
    ("d", "detail (the recipient's address masked)"),
    ("w", "worker (interned)"),
    ("l", "locale"),
    ("f", "registration reference"),
    ("v", "producer event id that caused it"),
    ("q", "calendar SEQUENCE, where the mail carried a calendar file"),
    ("y", "planned -> sent latency in ms (sent entries)"),
    ("h", "Message-ID domain (interned; the header is derived from it and the message id)"),
    ("z", "entry time minus stream id time, ms (<= 0)"),
)
NFIELDS = len(FIELDS)

# The buckets of per-registration and per-address hashes, and the bucket function, which
# Python (deliverylog.bucket_of) and Lua (log_bucket) compute alike.
INDEX_BUCKETS = 16_384
ADDRESS_PREFIX = LOG_ADDRESS_KEY.format(bucket="")
ALL = "*"  # the scope of the overall stats and latency


def bucket_of(name: str) -> int:
    """The hash bucket of a registration id or a lower-cased address (as `log_bucket` in Lua)."""
    h = 0
    for byte in name.encode():
        h = (h * 131 + byte) % 1_000_003
    return h % INDEX_BUCKETS


def registration_bucket(registration_id: str) -> str:
    return LOG_BY_REGISTRATION_KEY.format(bucket=bucket_of(registration_id))


def address_bucket(lower: str) -> tuple[str, int]:
    """The bucket key and number of a lower-cased address."""
    number = bucket_of(lower)
    return ADDRESS_PREFIX + str(number), number


def index_key(dim: str, value: str) -> str:
    """A list of entry members: dim "e" (event), "s" (status), "k" (kind), "es" (event|status)."""
    return LOG_INDEX_KEY.format(dim=dim, value=value)


def stats_key(event_id: str = ALL) -> str:
    return LOG_STATS_KEY.format(scope=event_id if event_id == ALL else "e:" + event_id)


def latency_key(event_id: str = ALL) -> str:
    return LOG_LATENCY_KEY.format(scope=event_id if event_id == ALL else "e:" + event_id)


HELPERS_LUA = """
local function log_num(v) return string.format('%.0f', v) end
local function log_bucket(name)
  local h = 0
  for i = 1, #name do h = (h * 131 + string.byte(name, i)) % 1000003 end
  return h % 16384
end
local function log_member(id)
  local t, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(t) * 1024 + tonumber(seq)
end
local function log_id(member)
  local seq = member % 1024
  return log_num((member - seq) / 1024) .. '-' .. log_num(seq)
end
local function log_b7(v)
  local out = {}
  for i = 7, 1, -1 do
    local byte = v % 256
    out[i] = string.char(byte)
    v = (v - byte) / 256
  end
  return table.concat(out)
end
local function log_unb7(packed, pos)
  local v = 0
  for i = pos, pos + 6 do v = v * 256 + string.byte(packed, i) end
  return v
end
"""

# Every writer appends through log_append (DeliveryLog.add, the send path's step script).
# K[k..k+12]: stream, names, registration bucket, address bucket, the lists by event, status,
# kind and event|status, stats overall and of the event, latency overall and of the event,
# dead letters; '' skips that one (no registration, indexing off, ...).
# A[a..a+25]: maxlen, entry ms, the FIELDS values s m g k, event id, address, address
# lower-cased, then a c x t d, worker, l f v q y, domain; registration field, address bucket
# number, stats field ("status|kind"), latency bucket, dead-letter action (add|del|'').
APPEND_LUA = (
    HELPERS_LUA
    + """
local function log_intern(names, name)
  if name == '' then return '' end
  local code = redis.call('HGET', names, '=' .. name)
  if not code then
    code = redis.call('HINCRBY', names, '#', 1)
    redis.call('HSET', names, '=' .. name, code, code, name)
  end
  return code
end
local function log_token(bucket, number, address, lower, reg)
  local value = redis.call('HGET', bucket, lower)
  if not value then
    local token = log_num(redis.call('HINCRBY', bucket, '#', 1) * 16384 + number)
    local shown = lower
    if address ~= lower then shown = lower .. '\\t' .. address end
    value = token
    if reg ~= '' then value = token .. ' ' .. reg end
    redis.call('HSET', bucket, lower, value, token, shown)
    return token
  end
  local token = string.match(value, '^(%d+)')
  if reg ~= '' and not string.find(value .. ' ', ' ' .. reg .. ' ', 1, true) then
    redis.call('HSET', bucket, lower, value .. ' ' .. reg)
  end
  return token
end
local function log_next_id(stream, ms)
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)[1]
  if not last then return ms, 0 end
  local lt, ls = string.match(last[1], '^(%d+)-(%d+)$')
  lt, ls = tonumber(lt), tonumber(ls)
  if lt < ms then return ms, 0 end
  if ls + 1 < 1024 then return lt, ls + 1 end
  return lt + 1, 0
end
local function log_xadd(stream, maxlen, t, seq, values)
  local ok = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, log_num(t) .. '-' .. seq, unpack(values))
  if type(ok) == 'table' and ok.err then
    -- The newest entries were deleted (forget): the stream's last id is above its top entry.
    local info = redis.call('XINFO', 'STREAM', stream)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        local lt = tonumber(string.match(info[i + 1], '^(%d+)-')) + 1
        if lt > t then t = lt end
      end
    end
    seq = 0
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, log_num(t) .. '-0', unpack(values))
  end
  return t, seq
end
local function log_append_index(K, k, A, a, member, token)
  -- K[k + 2] is the registration's bucket, or the address's for an entry with no registration.
  local field = A[a + 21]
  if field == '' and token ~= '' then field = '@' .. token end
  if K[k + 2] ~= '' and field ~= '' then
    redis.call('HSET', K[k + 2], field, (redis.call('HGET', K[k + 2], field) or '') .. log_b7(member))
  end
  for i = k + 4, k + 7 do
    if K[i] ~= '' then redis.call('RPUSH', K[i], log_num(member)) end
  end
  for i = k + 8, k + 9 do
    if K[i] ~= '' then redis.call('HINCRBY', K[i], A[a + 23], 1) end
  end
  if A[a + 24] ~= '' then
    for i = k + 10, k + 11 do
      if K[i] ~= '' then redis.call('HINCRBY', K[i], A[a + 24], 1) end
    end
  end
  if K[k + 12] ~= '' and A[a + 25] == 'add' then
    redis.call('HSET', K[k + 12], A[a + 3], A[a + 6] .. ' ' .. log_num(member))
  elseif K[k + 12] ~= '' and A[a + 25] == 'del' then
    redis.call('HDEL', K[k + 12], A[a + 3])
  end
end
local function log_append(K, k, A, a)
  local stream, names = K[k], K[k + 1]
  local token = ''
  if K[k + 3] ~= '' then
    local reg = ''
    if K[k + 2] ~= '' then reg = A[a + 21] end
    token = log_token(K[k + 3], tonumber(A[a + 22]), A[a + 7], A[a + 8], reg)
  end
  local ms = tonumber(A[a + 1])
  local t, seq = log_next_id(stream, ms)
  local values = {
    's', A[a + 2], 'm', A[a + 3], 'g', A[a + 4], 'k', A[a + 5], 'e', log_intern(names, A[a + 6]),
    'r', token, 'a', A[a + 9], 'c', A[a + 10], 'x', A[a + 11], 't', A[a + 12], 'd', A[a + 13],
    'w', log_intern(names, A[a + 14]), 'l', A[a + 15], 'f', A[a + 16], 'v', A[a + 17],
    'q', A[a + 18], 'y', A[a + 19], 'h', log_intern(names, A[a + 20]), 'z', log_num(ms - t)
  }
  t, seq = log_xadd(stream, A[a], t, seq, values)
  log_append_index(K, k, A, a, t * 1024 + seq, token)
  return log_num(t) .. '-' .. seq
end
"""
)
APPEND_KEYS = 13
APPEND_ARGS = 26

# Readers: an entry as stored -> the values of FIELDS with names and the address resolved
# (event, address, worker, domain in place of their codes), or nil if it is not mailer's.
RESOLVE_LUA = """
local log_names_cache = {}
local function log_name(names, code)
  if code == '' then return '' end
  local v = log_names_cache[code]
  if v == nil then
    v = redis.call('HGET', names, code) or ''
    log_names_cache[code] = v
  end
  return v
end
local function log_address(address_prefix, token)
  if token == '' then return '' end
  local shown = redis.call('HGET', address_prefix .. (tonumber(token) % 16384), token)
  if not shown then return '' end
  local tab = string.find(shown, '\\t', 1, true)
  if tab then return string.sub(shown, tab + 1) end
  return shown
end
local function log_values(fields)
  if #fields ~= 38 or fields[1] ~= 's' or fields[37] ~= 'z' then return nil end
  local v = {}
  for i = 2, 38, 2 do v[#v + 1] = fields[i] end
  return v
end
local function log_resolved(v, names, address_prefix)
  local out = {}
  for i = 1, #v do out[i] = v[i] end
  out[5] = log_name(names, v[5])
  out[6] = log_address(address_prefix, v[6])
  out[12] = log_name(names, v[12])
  out[18] = log_name(names, v[18])
  return out
end
local function log_registration_of(v)
  if v[3] ~= '' then return v[3] end
  return string.match(v[2], '^([^/]+)/') or ''
end
local function log_kind_of(v)
  if v[4] ~= '' then return v[4] end
  return string.match(v[2], '^[^/]+/([^/]+)') or ''
end
"""


def latency_bucket(latency_ms: int) -> int:
    """Quarter-octave buckets: percentiles to within 19 % in a few dozen counters."""
    return int(4 * math.log2(max(latency_ms, 0) + 1))


def bucket_upper_ms(bucket: int) -> float:
    """The largest latency a bucket holds."""
    return float(2 ** ((bucket + 1) / 4) - 1)
