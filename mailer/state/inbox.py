"""The inbox in Redis: the list single events wait in, the drain lease, and its Lua scripts.

mailer.intake.inbox says why the inbox exists and drives it; this module owns its keys and
commands. Every script is one round trip and checks the lease token before it changes the
list, so a drainer whose lease lapsed never trims events another drainer has read.
"""

from __future__ import annotations

from typing import Any

from mailer.constants import INBOX_ARMED_KEY, INBOX_KEY, INBOX_LEASE_KEY, INBOX_SEQ_KEY, QUEUE_NAME
from mailer.state.queue import (
    DRAIN,
    INGEST,
    JOB_EXPIRY_MS,
    REDIS_NOW_MS,
    batch_job_id,
    job_body,
    job_body_before_time,
    job_key,
)
from mailer.state.redis_types import RedisClient

# Enqueue a drain job (ids drain:<n>) and mark it pending. ARGV[1] queue, ARGV[2] job key
# prefix, ARGV[3] the job body up to its enqueue time (state.queue.job_body_before_time: the
# body's layout is defined once, there), ARGV[4] job expiry ms. Times come from Redis's clock.
_ENQUEUE_DRAIN = (
    REDIS_NOW_MS
    + """
now = string.format('%d', now)
local function enqueue_drain()
  redis.call('SET', KEYS[2], now)
  local id = 'drain:' .. redis.call('INCR', KEYS[3])
  local body = ARGV[3] .. now .. '}'
  redis.call('SET', ARGV[2] .. id, body, 'PX', ARGV[4])
  redis.call('ZADD', ARGV[1], now, id)
end
"""
)

# KEYS inbox, armed, seq. ARGV[5..] events. Append; start a drain unless one is pending.
PUSH_SCRIPT = (
    _ENQUEUE_DRAIN
    + """
if #ARGV >= 5 then redis.call('RPUSH', KEYS[1], unpack(ARGV, 5)) end
if redis.call('EXISTS', KEYS[2]) == 0 then enqueue_drain() return 1 end
return 0
"""
)

# KEYS inbox, armed, seq, lease. ARGV[5] stranded ms. Start a drain if events wait with no
# lease held and no drain started recently (a dead drainer, or a lost job).
REARM_SCRIPT = (
    _ENQUEUE_DRAIN
    + """
if redis.call('LLEN', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local armed = tonumber(redis.call('GET', KEYS[2]) or '0')
if armed > tonumber(now) - tonumber(ARGV[5]) then return 0 end
enqueue_drain()
return 1
"""
)

# KEYS inbox, armed, seq, lease. ARGV[5] token, ARGV[6] "handover" or "". End a drain:
# 1 = inbox empty (pending mark cleared, lease released); 0 = events arrived meanwhile, go
# on (or, with "handover", a new drain job takes over); -1 = the lease is not ours.
FINISH_SCRIPT = (
    _ENQUEUE_DRAIN
    + """
if redis.call('GET', KEYS[4]) ~= ARGV[5] then return -1 end
if redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[4])
  return 1
end
if ARGV[6] == 'handover' then
  redis.call('DEL', KEYS[4])
  enqueue_drain()
  return 2
end
return 0
"""
)

# KEYS inbox, lease. ARGV token, n, lease ms. Drop the first n events (applied) and renew
# the lease, only while the lease is ours: a drainer whose lease lapsed must not trim
# events another drainer has read since.
TRIM_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > 0 then redis.call('LTRIM', KEYS[1], ARGV[2], -1) end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# KEYS inbox, lease, job. ARGV token, n, queue, job id, body, now ms, expiry ms. Move the
# first n events into one ingest job, atomically.
SPILL_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('LTRIM', KEYS[1], ARGV[2], -1)
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[7])
  redis.call('ZADD', ARGV[3], ARGV[6], ARGV[4])
end
return 1
"""


_DRAIN_BODY = job_body_before_time(DRAIN, {})


class InboxStore:
    """The inbox's commands: push, rearm, lease, read a batch, trim, spill to a job, finish."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._push = redis.register_script(PUSH_SCRIPT)
        self._rearm = redis.register_script(REARM_SCRIPT)
        self._finish = redis.register_script(FINISH_SCRIPT)
        self._trim = redis.register_script(TRIM_SCRIPT)
        self._spill = redis.register_script(SPILL_SCRIPT)

    def _drain_args(self) -> list[Any]:
        return [QUEUE_NAME, job_key(""), _DRAIN_BODY, JOB_EXPIRY_MS]

    async def push(self, events: list[bytes]) -> None:
        """Append events (JSON) and make sure a drain is pending; one round trip."""
        keys = [INBOX_KEY, INBOX_ARMED_KEY, INBOX_SEQ_KEY]
        await self._push(keys=keys, args=[*self._drain_args(), *events])

    async def rearm(self, *, stranded_ms: int) -> bool:
        """Start a drain if events waited `stranded_ms` with no lease held; True if it did."""
        keys = [INBOX_KEY, INBOX_ARMED_KEY, INBOX_SEQ_KEY, INBOX_LEASE_KEY]
        return bool(await self._rearm(keys=keys, args=[*self._drain_args(), stranded_ms]))

    async def take_lease(self, token: str, *, lease_ms: int) -> bool:
        """Become the one drainer, unless another worker holds the lease."""
        return bool(await self.redis.set(INBOX_LEASE_KEY, token, nx=True, px=lease_ms))

    async def peek(self, batch: int) -> tuple[list[bytes], int]:
        """The first `batch` events waiting, and how many wait in all."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(INBOX_KEY, 0, batch - 1)
            pipe.llen(INBOX_KEY)
            raws, waiting = await pipe.execute()
        return list(raws), int(waiting)

    async def trim(self, token: str, applied: int, *, lease_ms: int) -> bool:
        """Drop the first `applied` events and renew the lease; False if the lease is not ours."""
        return bool(await self._trim(keys=[INBOX_KEY, INBOX_LEASE_KEY], args=[token, applied, lease_ms]))

    async def finish(self, token: str, *, handover: bool) -> int:
        """FINISH_SCRIPT: 1 inbox empty and released, 2 handed over, 0 go on, -1 not ours."""
        keys = [INBOX_KEY, INBOX_ARMED_KEY, INBOX_SEQ_KEY, INBOX_LEASE_KEY]
        args = [*self._drain_args(), token, "handover" if handover else ""]
        return int(await self._finish(keys=keys, args=args))

    async def spill(self, token: str, raws: list[bytes], *, now_ms: int) -> bool:
        """Move these first events into one ingest job, atomically; False if the lease is not ours."""
        job_id = batch_job_id("events:", raws)
        # As JSON text: the ingest job validates each (parse_event takes text), so a record
        # that is not JSON is rejected there with a log entry, not the whole batch here.
        payload = [raw.decode("utf-8", "replace") for raw in raws]
        body = job_body(INGEST, {"events": payload}, now_ms)
        keys = [INBOX_KEY, INBOX_LEASE_KEY, job_key(job_id)]
        args = [token, len(raws), QUEUE_NAME, job_id, body, now_ms, JOB_EXPIRY_MS]
        return bool(await self._spill(keys=keys, args=args))
