"""Delivery-log statistics per event and overall, from counters the append keeps: constant time.

Counts are of log entries (every state change) per status and kind; latency is planned ->
sent of every sent message, in quarter-octave buckets (percentiles within 19 %); dead letters
are messages whose last word was `failed` (until re-driven); the oldest due message comes
from the due index of message states.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mailer.constants import DUE_KEY, LOG_DEAD_KEY
from mailer.state.loglua import ALL, bucket_upper_ms, latency_key, stats_key
from mailer.state.redis_types import RedisClient
from mailer.state.store import registration_key

# How many of the oldest due messages an event's stats look through for one of that event.
DUE_LOOKAHEAD = 500

# KEYS: stats, latency, dead letters, due index. ARGV: event ('' overall), the registration
# key template, the lookahead. Returns {stats pairs, latency pairs, dead count, due id, due score}.
_STATS_SCRIPT = """
local event = ARGV[1]
local dead = 0
if event == '' then
  dead = redis.call('HLEN', KEYS[3])
else
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', KEYS[3], cursor, 'COUNT', 1000)
    cursor = page[1]
    for i = 2, #page[2], 2 do
      if string.match(page[2][i], '^(%S*)') == event then dead = dead + 1 end
    end
  until cursor == '0'
end
local due_id, due_at = '', ''
local due = redis.call('ZRANGE', KEYS[4], 0, tonumber(ARGV[3]) - 1, 'WITHSCORES')
for i = 1, #due, 2 do
  local match = event == ''
  if not match then
    local reg = string.match(due[i], '^([^/]+)/')
    local key = string.gsub(ARGV[2], '{registration_id}', reg or '')
    match = reg and redis.call('HGET', key, 'e') == event
  end
  if match then
    due_id, due_at = due[i], due[i + 1]
    break
  end
  if event == '' then break end
end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2]), dead, due_id, due_at}
"""


@dataclass(slots=True)
class LogStats:
    """What the log says about an event (or everything)."""

    event_id: str | None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # status -> kind -> entries
    sent: int = 0  # sent messages with a latency
    latency_ms: dict[str, float] = field(default_factory=dict)  # "p50", "p90", "p99", "max" (upper bounds)
    dead_letters: int = 0
    oldest_due: tuple[str, int] | None = None  # (message id, due at ms): not yet in a final state

    def total(self, status: str) -> int:
        return sum(self.counts.get(status, {}).values())


async def log_stats(redis: RedisClient, event_id: str | None = None) -> LogStats:
    """Counts, latency percentiles, dead letters and the oldest due message, of one event or all.

    An event's oldest due message is looked for among the DUE_LOOKAHEAD oldest of all (None if
    none of those is the event's).
    """
    scope = event_id or ALL
    script = redis.register_script(_STATS_SCRIPT)
    reply = await script(
        keys=[stats_key(scope), latency_key(scope), LOG_DEAD_KEY, DUE_KEY],
        args=[event_id or "", registration_key("{registration_id}"), DUE_LOOKAHEAD],
    )
    stats = LogStats(event_id)
    raw_counts, raw_latency, dead, due_id, due_at = reply
    for name, value in zip(raw_counts[::2], raw_counts[1::2], strict=True):
        status, _, kind = name.decode().partition("|")
        stats.counts.setdefault(status, {})[kind] = int(value)
    buckets = sorted((int(b), int(n)) for b, n in zip(raw_latency[::2], raw_latency[1::2], strict=True))
    stats.sent = sum(n for _, n in buckets)
    stats.latency_ms = _percentiles(buckets, stats.sent)
    stats.dead_letters = int(dead)
    if due_id:
        stats.oldest_due = (due_id.decode(), int(float(due_at)))
    return stats


def _percentiles(buckets: list[tuple[int, int]], total: int) -> dict[str, float]:
    if not total:
        return {}
    out: dict[str, float] = {}
    wanted = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)]
    seen = 0
    for bucket, count in buckets:
        seen += count
        while wanted and seen >= wanted[0][1] * total:
            out[wanted.pop(0)[0]] = bucket_upper_ms(bucket)
    out["max"] = bucket_upper_ms(buckets[-1][0])
    return out
