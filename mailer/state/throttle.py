"""The rate limit shared by all workers through Redis (MAILER_RATE_LIMIT, messages per minute).

The relay's own health (421, refused connections, failed logins) is mailer.state.circuit.
"""

from __future__ import annotations

from mailer.constants import RATE_KEY
from mailer.state.store import RedisClient

# Grant up to ARGV[1] sends from this window's remaining ARGV[2] allowance.
_GRANT_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local grant = math.min(tonumber(ARGV[1]), tonumber(ARGV[2]) - used)
if grant <= 0 then return 0 end
redis.call('INCRBY', KEYS[1], grant)
redis.call('PEXPIRE', KEYS[1], 120000)
return grant
"""


class Throttle:
    """How many sends the rate limit allows now, across all workers."""

    def __init__(self, redis: RedisClient, *, per_minute: int | None) -> None:
        self.redis = redis
        self.per_minute = per_minute
        self._grant = redis.register_script(_GRANT_SCRIPT)

    async def grant(self, wanted: int, now_ms: int) -> tuple[int, int]:
        """(how many may go now, when the next window opens) under MAILER_RATE_LIMIT."""
        window = now_ms // 60_000
        next_window_ms = (window + 1) * 60_000
        if self.per_minute is None or wanted == 0:
            return wanted, next_window_ms
        granted = await self._grant(keys=[RATE_KEY.format(window=window)], args=[wanted, self.per_minute])
        return int(granted), next_window_ms
