"""Counts of log entries over recent time windows (the last hour, day, each of the last
minutes), read from the status lists without reading an entry.

Each status list holds its entries' positions in increasing order (a position is the entry's
time in ms × 1024 plus a sequence), so the entries since a moment are the list's tail from the
first position at or above it: a binary search with LINDEX, twenty probes at a million, each
walked from the nearer end. No counter per minute is kept in the send path for this.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from mailer.clock import ms
from mailer.state.deliverylog import LOG_STATUSES, SEQ_RANGE, list_key
from mailer.state.redis_types import RedisClient

# KEYS: lists of positions; ARGV: positions, ascending. Returns, per key, how many of its
# members are at or above each position (flattened: key 1's counts, then key 2's, ...).
_SINCE_COUNTS = """
local out = {}
for k = 1, #KEYS do
  local n = redis.call('LLEN', KEYS[k])
  -- Redis before 7 walks from the head for any index >= 0: probe the far half from the tail.
  local function at(i)
    if i >= n / 2 then return tonumber(redis.call('LINDEX', KEYS[k], i - n)) end
    return tonumber(redis.call('LINDEX', KEYS[k], i))
  end
  local lo = 0
  for a = 1, #ARGV do
    local cutoff, hi = tonumber(ARGV[a]), n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      if at(mid) < cutoff then lo = mid + 1 else hi = mid end
    end
    out[#out + 1] = n - lo
  end
end
return out
"""

CHART_MINUTES = 60
# The statuses the sends-per-minute chart draws: what went out, and what did not yet.
CHART_STATUSES = ("sent", "retrying", "failed")


@dataclass(frozen=True, slots=True)
class RecentCounts:
    """Entries per status in the last hour and day, and per minute for the chart's statuses
    (oldest minute first; the last is the minute now running)."""

    last_hour: dict[str, int]
    last_day: dict[str, int]
    per_minute: dict[str, list[int]]
    minutes_from: datetime  # the start of the chart's first minute


def _position(moment: datetime) -> int:
    return ms(moment) * SEQ_RANGE


async def recent_counts(redis: RedisClient, *, now: datetime) -> RecentCounts:
    """Counts over the windows ending `now`; two script calls in one round trip."""
    script = redis.register_script(_SINCE_COUNTS)
    statuses: list[str] = [s for s in LOG_STATUSES if s != "foreign"]  # never indexed: not mailer's
    minute = now.replace(second=0, microsecond=0)
    first = minute - timedelta(minutes=CHART_MINUTES - 1)
    edges = [first + timedelta(minutes=i) for i in range(CHART_MINUTES)]
    async with redis.pipeline(transaction=False) as pipe:
        await script(
            keys=[list_key("s", s) for s in statuses],
            args=[_position(now - timedelta(days=1)), _position(now - timedelta(hours=1))],
            client=pipe,
        )
        chart_keys = [list_key("s", s) for s in CHART_STATUSES]
        await script(keys=chart_keys, args=[_position(e) for e in edges], client=pipe)
        windows, chart = await pipe.execute()
    day = {s: int(windows[2 * i]) for i, s in enumerate(statuses)}
    hour = {s: int(windows[2 * i + 1]) for i, s in enumerate(statuses)}
    per_minute: dict[str, list[int]] = {}
    for i, status in enumerate(CHART_STATUSES):
        since = [int(n) for n in chart[i * CHART_MINUTES : (i + 1) * CHART_MINUTES]]
        # At or above each edge, minus at or above the next: the entries of that minute.
        per_minute[status] = [a - b for a, b in zip(since, [*since[1:], 0], strict=True)]
    return RecentCounts(last_hour=hour, last_day=day, per_minute=per_minute, minutes_from=first)
