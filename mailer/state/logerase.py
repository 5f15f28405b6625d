"""Removing from the delivery log: entries past the retention, an ended event's indexes, an address.

All of it runs in bounded slices (the retention's per-second tick), so sends never wait:
`trim_log` trims the stream by id (ids are times), `trim_indexes` trims the index keys one
SCAN page of the retention's walk met, `drop_event_log` removes an ended event's lists and
counters, and `forget_recipient` erases an address (the GDPR request behind `mailer forget`).
"""

from __future__ import annotations

from mailer.constants import LOG_COUNTS_KEY, LOG_DEAD_KEY, LOG_LATENCY_KEY, LOG_STREAM
from mailer.state.deliverylog import LOG_STATUSES, list_key, recipient_index, scope_of
from mailer.state.logquery import entry_ids
from mailer.state.redis_types import RedisClient

# KEYS: index keys; ARGV[1] the cutoff in ms, then per key its form: 'list' (positions, oldest
# first), 'bucket' (fields of ids, a recipient's led by its token) or 'dead' (message ->
# position). Removes what is older than the cutoff; returns how many ids it removed.
_TRIM_INDEXES = """
local cutoff_ms = tonumber(ARGV[1])
local cutoff = cutoff_ms * 1024
local removed = 0
for i = 1, #KEYS do
  local key, form = KEYS[i], ARGV[i + 1]
  if form == 'list' then
    local lo, hi = 0, redis.call('LLEN', key)
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if tonumber(redis.call('LINDEX', key, mid)) < cutoff then lo = mid + 1 else hi = mid end
    end
    if lo > 0 then redis.call('LTRIM', key, lo, -1); removed = removed + lo end
  elseif form == 'bucket' then
    local flat = redis.call('HGETALL', key)
    for j = 1, #flat, 2 do
      local name, value = flat[j], flat[j + 1]
      if name ~= '#' and string.sub(name, 1, 1) ~= '~' then
        local kept, token, dropped = {}, nil, 0
        for part in string.gmatch(value, '%S+') do
          if string.sub(part, 1, 1) == '~' then
            token = part
          elseif tonumber(string.match(part, '^(%d+)')) >= cutoff_ms then
            kept[#kept + 1] = part
          else
            dropped = dropped + 1
          end
        end
        removed = removed + dropped
        if #kept == 0 then
          redis.call('HDEL', key, name)
          if token then redis.call('HDEL', key, token) end
        elseif dropped > 0 then
          if token then table.insert(kept, 1, token) end
          redis.call('HSET', key, name, table.concat(kept, ' '))
        end
      end
    end
  elseif form == 'dead' then
    local flat = redis.call('HGETALL', key)
    for j = 1, #flat, 2 do
      if tonumber(flat[j + 1]) < cutoff then redis.call('HDEL', key, flat[j]); removed = removed + 1 end
    end
  end
end
return removed
"""


async def trim_log(redis: RedisClient, *, before_ms: int, budget: int) -> int:
    """Remove log entries older than `before_ms` (stream ids are the writers' times).

    At most about `budget` entries per call, so one call never blocks Redis for long: whole
    stream nodes first, then (once the old part is down to its last node) exactly.
    """
    minid = f"{before_ms}-0"
    removed = await redis.xtrim(LOG_STREAM, minid=minid, approximate=True, limit=budget)
    if removed < budget:
        removed += await redis.xtrim(LOG_STREAM, minid=minid, approximate=False)
    return removed


async def trim_indexes(redis: RedisClient, keys: list[tuple[str, str]], *, before_ms: int) -> int:
    """Trim ids older than `before_ms` from these (key, form) index keys; how many went."""
    if not keys:
        return 0
    script = redis.register_script(_TRIM_INDEXES)
    return int(await script(keys=[k for k, _ in keys], args=[before_ms, *(form for _, form in keys)]))


def event_log_keys(event_id: str) -> list[str]:
    """The keys named after an event: its lists and its counters."""
    scope = scope_of(event_id)
    return [
        list_key("e", event_id),
        *(list_key("es", f"{event_id}|{status}") for status in LOG_STATUSES),
        LOG_COUNTS_KEY.format(scope=scope),
        LOG_LATENCY_KEY.format(scope=scope),
        LOG_DEAD_KEY.format(scope=scope),
    ]


async def drop_event_log(redis: RedisClient, event_ids: set[str]) -> None:
    """Remove the lists and counters of events whose data is gone (the overall counts stay)."""
    if event_ids:
        await redis.delete(*(key for event_id in sorted(event_ids) for key in event_log_keys(event_id)))


async def forget_recipient(redis: RedisClient, address: str) -> int:
    """Erase `address` (any letter case) from the log and its indexes; how many entries named it.

    Entries hold the address's token, never the address (relay texts quoting it are masked
    when written): deleting the address's field and its token's field leaves them anonymous,
    counted and in their registration's timeline. Entries an older mailer wrote as JSON still
    spell the address out; those are deleted.
    """
    bucket, field = recipient_index(address)
    raw = await redis.hget(bucket, field)
    if raw is None:
        return 0
    ids = entry_ids(raw)
    token = next((part for part in raw.decode().split() if part.startswith("~")), None)
    spelled = []
    for start in range(0, len(ids), 500):
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id in ids[start : start + 500]:
                pipe.xrange(LOG_STREAM, min=entry_id, max=entry_id, count=1)
            rows = await pipe.execute()
        spelled += [found[0][0] for found in rows if found and b"j" in found[0][1]]
    async with redis.pipeline(transaction=False) as pipe:
        if spelled:
            pipe.xdel(LOG_STREAM, *spelled)
        pipe.hdel(bucket, field, *([token] if token else []))
        await pipe.execute()
    return len(ids)
