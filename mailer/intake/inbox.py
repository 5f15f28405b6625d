"""Single events from publish(): a list in Redis that one worker at a time drains in batches.

An arq job per event costs the worker more than planning and sending the mail it yields
(arq's bookkeeping is several round trips per job), so at a few hundred registrations a
second one job per event would saturate a worker and queue up latency. Instead publish()
appends to `mailer:inbox` and, only if no drain is pending, enqueues one `drain` job, in a
single Lua call. The drainer takes whatever has arrived (up to a batch), plans and sends it
as one batch, trims it off the list, and looks again; under a backlog it hands whole
batches to ordinary `ingest` jobs so every worker helps.

Nothing is lost when a drainer dies: events leave the list only after they were applied,
and only by the holder of the lease; a lapsed lease is noticed by the per-second tick,
which starts a new drain. A drain that is cancelled (arq's job timeout, a shutdown) lets go
of the lease and queues the next one itself; a batch that raises becomes an ingest job,
which is retried with back-off, so one bad batch never holds up the events behind it.
Applying an event twice is harmless (the planner's `seen` keys and the per-message claims
make it a replay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from mailer.clock import Clock, ms, utc_now
from mailer.constants import INBOX_ARMED_KEY, INBOX_KEY, INBOX_LEASE_KEY, INBOX_SEQ_KEY, QUEUE_NAME
from mailer.state.queue import INGEST, JOB_EXPIRY_MS, REDIS_NOW_MS, batch_job_id, job_body, job_key
from mailer.state.store import RedisClient

logger = logging.getLogger("mailer.inbox")

# Events planned and sent per round; also the size of a batch handed to an ingest job.
DRAIN_BATCH = 100
# More than this many waiting: hand batches to ingest jobs instead of working alone.
SPILL_ABOVE = 3 * DRAIN_BATCH
LEASE_MS = 15_000
# A drain job hands over to a fresh one after this long, well inside arq's job timeout.
DRAIN_TURN_S = 30.0
# The tick starts a drain if the inbox has waited this long with nobody draining it.
STRANDED_MS = 3_000

# Enqueue a drain job (ids drain:<n>) and mark it pending. ARGV[1] queue, ARGV[2] job key
# prefix, ARGV[3] unused, ARGV[4] job expiry ms. Times come from Redis's clock (REDIS_NOW_MS).
_ENQUEUE_DRAIN = (
    REDIS_NOW_MS
    + """
now = string.format('%d', now)
local function enqueue_drain()
  redis.call('SET', KEYS[2], now)
  local id = 'drain:' .. redis.call('INCR', KEYS[3])
  local body = '{"t":1,"f":"drain","a":[],"k":{},"et":' .. now .. '}'
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

Process = Callable[[list[bytes]], Awaitable[Any]]


class Inbox:
    """Both ends of the inbox: `push` for producers, `drain` and `rearm` for workers."""

    def __init__(self, redis: RedisClient, *, clock: Clock = utc_now) -> None:
        self.redis = redis
        self.clock = clock
        self._push = redis.register_script(PUSH_SCRIPT)
        self._rearm = redis.register_script(REARM_SCRIPT)
        self._finish = redis.register_script(FINISH_SCRIPT)
        self._trim = redis.register_script(TRIM_SCRIPT)
        self._spill = redis.register_script(SPILL_SCRIPT)

    def _drain_args(self) -> list[Any]:
        return [QUEUE_NAME, job_key(""), "", JOB_EXPIRY_MS]

    async def push(self, events: list[bytes]) -> None:
        """Append events (JSON) and make sure a drain is pending; one round trip."""
        keys = [INBOX_KEY, INBOX_ARMED_KEY, INBOX_SEQ_KEY]
        await self._push(keys=keys, args=[*self._drain_args(), *events])

    async def rearm(self) -> bool:
        """From the per-second tick: start a drain if events wait and nobody drains them."""
        keys = [INBOX_KEY, INBOX_ARMED_KEY, INBOX_SEQ_KEY, INBOX_LEASE_KEY]
        started = await self._rearm(keys=keys, args=[*self._drain_args(), STRANDED_MS])
        if started:
            logger.warning("inbox had events and no drainer; started a new drain job")
        return bool(started)

    async def drain(self, process: Process, *, turn_s: float = DRAIN_TURN_S) -> int:
        """Apply waiting events batch by batch until the inbox is empty; returns how many.

        `process` gets one batch of events as pushed (JSON bytes, unchecked: anyone can
        write to Redis, so the caller validates and rejects with a log entry).
        """
        token = uuid.uuid4().hex
        if not await self.redis.set(INBOX_LEASE_KEY, token, nx=True, px=LEASE_MS):
            return 0  # another worker drains; it looks again before it lets go
        renewing = asyncio.create_task(self._renew(token))
        started, applied = time.monotonic(), 0
        try:
            while True:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.lrange(INBOX_KEY, 0, DRAIN_BATCH - 1)
                    pipe.llen(INBOX_KEY)
                    raws, waiting = await pipe.execute()
                if not raws:
                    if await self._end(token, handover=time.monotonic() - started > turn_s) != 0:
                        return applied
                    continue
                if waiting > SPILL_ABOVE:
                    if not await self._spill_batch(token, raws):
                        return applied
                    continue
                try:
                    await process(raws)
                except Exception:
                    # Not a reason to hold up every event behind this batch: it becomes an
                    # ingest job, which arq retries with back-off (and which logs the events
                    # as rejected if they can never be applied).
                    logger.exception("applying %d inbox events failed; moved to an ingest job", len(raws))
                    if not await self._spill_batch(token, raws):
                        return applied
                    continue
                applied += len(raws)
                if not await self._trim(keys=[INBOX_KEY, INBOX_LEASE_KEY], args=[token, len(raws), LEASE_MS]):
                    logger.warning("inbox lease lapsed while applying a batch; another drainer goes on")
                    return applied
                if time.monotonic() - started > turn_s and await self._end(token, handover=True) != 0:
                    return applied
        except BaseException:
            # Cancelled (arq's job timeout, shutdown) or Redis trouble: let go of the lease
            # and queue the next drain now, rather than after the lease and the tick.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._end(token, handover=True))
            raise
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing

    async def _end(self, token: str, *, handover: bool) -> int:
        """FINISH_SCRIPT: 1 inbox empty and released, 2 handed over, 0 go on, -1 not ours."""
        keys = [INBOX_KEY, INBOX_ARMED_KEY, INBOX_SEQ_KEY, INBOX_LEASE_KEY]
        args = [*self._drain_args(), token, "handover" if handover else ""]
        return int(await self._finish(keys=keys, args=args))

    async def _spill_batch(self, token: str, raws: list[bytes]) -> bool:
        job_id = batch_job_id("events:", raws)
        now = ms(self.clock())
        # As JSON text: the ingest job validates each (parse_event takes text), so a record
        # that is not JSON is rejected there with a log entry, not the whole batch here.
        payload = [raw.decode("utf-8", "replace") for raw in raws]
        body = job_body(INGEST, {"events": payload}, now)
        keys = [INBOX_KEY, INBOX_LEASE_KEY, job_key(job_id)]
        args = [token, len(raws), QUEUE_NAME, job_id, body, now, JOB_EXPIRY_MS]
        return bool(await self._spill(keys=keys, args=args))

    async def _renew(self, token: str) -> None:
        """Keep the lease while a batch is applied (sends to a slow relay take a while)."""
        while True:
            await asyncio.sleep(LEASE_MS / 3000)
            with contextlib.suppress(Exception):
                await self._trim(keys=[INBOX_KEY, INBOX_LEASE_KEY], args=[token, 0, LEASE_MS])
