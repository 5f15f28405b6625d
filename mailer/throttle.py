"""Limits shared by all workers through Redis: a relay's back-off after 421/432, and the rate limit."""

from __future__ import annotations

from mailer.constants import RATE_KEY, RELAY_BACKOFF_KEY
from mailer.store import RedisClient

# Codes with which a relay says "you, slow down" rather than "this message is bad": 421
# (service closing, often throttling) and 432 (Exchange Online's concurrent-connection limit).
RELAY_BACKOFF_CODES = frozenset({421, 432})

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
    """What the send path asks before handing messages to a relay."""

    def __init__(self, redis: RedisClient, *, relay: str, per_minute: int | None) -> None:
        self.redis = redis
        self.per_minute = per_minute
        self._backoff_key = RELAY_BACKOFF_KEY.format(relay=relay)
        self._grant = redis.register_script(_GRANT_SCRIPT)

    async def relay_blocked_until(self, now_ms: int) -> int | None:
        """The end of a back-off some worker set for this relay, if it is still running."""
        raw = await self.redis.get(self._backoff_key)
        if raw is None or int(raw) <= now_ms:
            return None
        return int(raw)

    async def back_off_relay(self, until_ms: int, now_ms: int) -> None:
        """Make every worker hold its sends to this relay until `until_ms`."""
        await self.redis.set(self._backoff_key, until_ms, px=max(1, until_ms - now_ms))

    async def grant(self, wanted: int, now_ms: int) -> tuple[int, int]:
        """(how many may go now, when the next window opens) under MAILER_RATE_LIMIT."""
        window = now_ms // 60_000
        next_window_ms = (window + 1) * 60_000
        if self.per_minute is None or wanted == 0:
            return wanted, next_window_ms
        granted = await self._grant(keys=[RATE_KEY.format(window=window)], args=[wanted, self.per_minute])
        return int(granted), next_window_ms
