"""Retention and erasure in the delivery log: trimming old entries with their index members, and
forgetting an address, each in bounded Lua calls.

These scripts derive the keys of an entry's indexes from the entry itself (as Python does when
writing), so they touch keys they could not declare beforehand: fine on the single Redis
(or Sentinel primary) mailer runs on; Redis Cluster is unsupported anyway (arq).
"""

from __future__ import annotations

from mailer.constants import (
    LOG_BY_REGISTRATION_KEY,
    LOG_DEAD_KEY,
    LOG_INDEX_KEY,
    LOG_LATENCY_KEY,
    LOG_NAMES_KEY,
    LOG_STATS_KEY,
    LOG_STREAM,
)
from mailer.state.logentry import LOG_STATUSES
from mailer.state.loglua import ADDRESS_PREFIX, HELPERS_LUA, RESOLVE_LUA, address_bucket
from mailer.state.redis_types import RedisClient

_PREFIXES = [
    LOG_INDEX_KEY.split("{", 1)[0],
    LOG_BY_REGISTRATION_KEY.split("{", 1)[0],
    ADDRESS_PREFIX,
    LOG_STATS_KEY.split("{", 1)[0],
    LOG_LATENCY_KEY.split("{", 1)[0],
]

# Shared by trim and forget: strip members up to `member` from the front of a registration's
# (or an address's own) field; true if the field is now gone.
_SLOT_LUA = """
local function log_strip(key, field, member)
  local packed = redis.call('HGET', key, field)
  if not packed then return true end
  local pos = 1
  while pos + 6 <= #packed and log_unb7(packed, pos) <= member do pos = pos + 7 end
  if pos > #packed then
    redis.call('HDEL', key, field)
    return true
  end
  if pos > 1 then redis.call('HSET', key, field, string.sub(packed, pos)) end
  return false
end
"""

# KEYS: stream, names, dead letters. ARGV: before (ms), budget, statuses (comma-separated, in
# code order), then the key prefixes of _PREFIXES. Returns how many entries it removed.
_TRIM_SCRIPT = (
    HELPERS_LUA
    + RESOLVE_LUA
    + _SLOT_LUA
    + """
local stream, names, dead = KEYS[1], KEYS[2], KEYS[3]
local statuses = {}
for s in string.gmatch(ARGV[3], '[^,]+') do statuses[#statuses + 1] = s end
local ix, regs, addrs, stats, latency = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]

local function pop_heads(key, member)
  while true do
    local head = redis.call('LINDEX', key, 0)
    if not head or tonumber(head) > member then return end
    redis.call('LPOP', key)
  end
end

local function drop_registration(token, reg)
  -- The registration has no entries left: the address no longer lists it.
  local bucket = addrs .. (tonumber(token) % 16384)
  local shown = redis.call('HGET', bucket, token)
  if not shown then return end
  local lower = string.match(shown, '^([^\\t]+)')
  local value = redis.call('HGET', bucket, lower)
  if not value then return end
  local kept = {}
  for part in string.gmatch(value, '%S+') do
    if part ~= reg or #kept == 0 then kept[#kept + 1] = part end
  end
  if #kept == 1 and not redis.call('HGET', bucket, '@' .. token) then
    redis.call('HDEL', bucket, lower, token)
  else
    redis.call('HSET', bucket, lower, table.concat(kept, ' '))
  end
end

local rows = redis.call('XRANGE', stream, '-', log_num(tonumber(ARGV[1]) - 1), 'COUNT', tonumber(ARGV[2]))
local ids = {}
for _, row in ipairs(rows) do
  ids[#ids + 1] = row[1]
  local v = log_values(row[2])
  if v then
    local member = log_member(row[1])
    local status = statuses[tonumber(v[1]) + 1] or ''
    local kind, reg, token = log_kind_of(v), log_registration_of(v), v[6]
    local event = log_name(names, v[5])
    pop_heads(ix .. 's:' .. status, member)
    if kind ~= '' then pop_heads(ix .. 'k:' .. kind, member) end
    if event ~= '' then
      pop_heads(ix .. 'e:' .. event, member)
      pop_heads(ix .. 'es:' .. event .. '|' .. status, member)
      if redis.call('EXISTS', ix .. 'e:' .. event) == 0 then
        redis.call('DEL', stats .. 'e:' .. event, latency .. 'e:' .. event)
      end
    end
    if reg ~= '' then
      local gone = log_strip(regs .. log_bucket(reg), reg, member)
      if gone and token ~= '' then drop_registration(token, reg) end
    elseif token ~= '' then
      local bucket = addrs .. (tonumber(token) % 16384)
      if log_strip(bucket, '@' .. token, member) then drop_registration(token, '') end
    end
    if status == 'failed' and redis.call('HGET', dead, v[2]) == event .. ' ' .. log_num(member) then
      redis.call('HDEL', dead, v[2])
    end
  end
end
for i = 1, #ids, 500 do
  redis.call('XDEL', stream, unpack(ids, i, math.min(i + 499, #ids)))
end
return #ids
"""
)

# Forget, step 1. KEYS: stream, the address's bucket. ARGV: the address lower-cased, the
# registration bucket template. Deletes the address's mappings; returns how many entries
# carried its token.
_FORGET_SCRIPT = (
    HELPERS_LUA
    + RESOLVE_LUA
    + """
local stream, bucket, lower = KEYS[1], KEYS[2], ARGV[1]
local value = redis.call('HGET', bucket, lower)
if not value then return 0 end
local token, count = nil, 0
local function count_slot(key, field)
  local packed = redis.call('HGET', key, field)
  if not packed then return end
  for pos = 1, #packed - 6, 7 do
    local id = log_id(log_unb7(packed, pos))
    local row = redis.call('XRANGE', stream, id, id)[1]
    local v = row and log_values(row[2])
    if v and v[6] == token then count = count + 1 end
  end
end
for part in string.gmatch(value, '%S+') do
  if not token then
    token = part
    count_slot(bucket, '@' .. token)
  else
    count_slot((string.gsub(ARGV[2], '{bucket}', log_bucket(part))), part)
  end
end
redis.call('HDEL', bucket, lower, token, '@' .. token)
return count
"""
)

# Forget, step 2: refusals of bad input may quote an address (they have no recipient to mask
# it against). KEYS: stream, the list of one status. ARGV: the address lower-cased, the
# position to go on from ('' for the end), how many to look at. Deletes the entries whose
# detail names the address; returns {deleted, next position or -1}.
_FORGET_TEXTS_SCRIPT = (
    HELPERS_LUA
    + RESOLVE_LUA
    + """
local stream, key, lower = KEYS[1], KEYS[2], ARGV[1]
local pos = tonumber(ARGV[2]) or (redis.call('LLEN', key) - 1)
local stop = math.max(0, pos - tonumber(ARGV[3]) + 1)
local deleted = 0
if pos < 0 then return {0, -1} end
for _, raw in ipairs(redis.call('LRANGE', key, stop, pos)) do
  local id = log_id(tonumber(raw))
  local row = redis.call('XRANGE', stream, id, id)[1]
  local v = row and log_values(row[2])
  if v and string.find(string.lower(v[11] .. ' ' .. v[10]), lower, 1, true) then
    redis.call('XDEL', stream, id)
    deleted = deleted + 1
  end
end
return {deleted, stop - 1}
"""
)


async def trim(redis: RedisClient, *, before_ms: int, budget: int) -> int:
    """mailer.state.deliverylog.trim_log: one bounded call."""
    script = redis.register_script(_TRIM_SCRIPT)
    args = [before_ms, budget, ",".join(LOG_STATUSES), *_PREFIXES]
    return int(await script(keys=[LOG_STREAM, LOG_NAMES_KEY, LOG_DEAD_KEY], args=args))


async def forget(redis: RedisClient, address: str) -> int:
    """mailer.state.deliverylog.forget_recipient: the mappings, then the refusals' texts."""
    lower = address.strip().lower()
    if not lower:
        return 0
    bucket, _ = address_bucket(lower)
    mapping = redis.register_script(_FORGET_SCRIPT)
    count = int(await mapping(keys=[LOG_STREAM, bucket], args=[lower, LOG_BY_REGISTRATION_KEY]))
    texts = redis.register_script(_FORGET_TEXTS_SCRIPT)
    for status in ("rejected", "ignored"):
        key = LOG_INDEX_KEY.format(dim="s", value=status)
        position: int | str = ""
        while position != -1:
            deleted, position = await texts(keys=[LOG_STREAM, key], args=[lower, position, 2000])
            count += int(deleted)
            position = int(position)
    return count
