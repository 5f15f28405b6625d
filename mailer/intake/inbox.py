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
from mailer.state.inbox import InboxStore
from mailer.state.redis_types import RedisClient

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

Process = Callable[[list[bytes]], Awaitable[Any]]


class Inbox:
    """Both ends of the inbox: `push` for producers, `drain` and `rearm` for workers."""

    def __init__(self, redis: RedisClient, *, clock: Clock = utc_now) -> None:
        self.store = InboxStore(redis)
        self.clock = clock

    async def push(self, events: list[bytes]) -> None:
        """Append events (JSON) and make sure a drain is pending; one round trip."""
        await self.store.push(events)

    async def rearm(self) -> bool:
        """From the per-second tick: start a drain if events wait and nobody drains them."""
        started = await self.store.rearm(stranded_ms=STRANDED_MS)
        if started:
            logger.warning("inbox had events and no drainer; started a new drain job")
        return started

    async def drain(
        self, process: Process, *, turn_s: float = DRAIN_TURN_S, stopping: Callable[[], bool] = lambda: False
    ) -> int:
        """Apply waiting events batch by batch until the inbox is empty; returns how many.

        `process` gets one batch of events as pushed (JSON bytes, unchecked: anyone can
        write to Redis, so the caller validates and rejects with a log entry). After `turn_s`,
        or once `stopping()` (the worker got SIGTERM), a new drain job takes over.
        """
        token = uuid.uuid4().hex
        if not await self.store.take_lease(token, lease_ms=LEASE_MS):
            return 0  # another worker drains; it looks again before it lets go
        renewing = asyncio.create_task(self._renew(token))
        started, applied = time.monotonic(), 0
        try:
            while True:
                raws, waiting = await self.store.peek(DRAIN_BATCH)
                if not raws:
                    turn_over = stopping() or time.monotonic() - started > turn_s
                    if await self._end(token, handover=turn_over) != 0:
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
                if not await self.store.trim(token, len(raws), lease_ms=LEASE_MS):
                    logger.warning("inbox lease lapsed while applying a batch; another drainer goes on")
                    return applied
                turn_over = stopping() or time.monotonic() - started > turn_s
                if turn_over and await self._end(token, handover=True) != 0:
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
        """1 inbox empty and released, 2 handed over, 0 go on, -1 not ours."""
        return await self.store.finish(token, handover=handover)

    async def _spill_batch(self, token: str, raws: list[bytes]) -> bool:
        return await self.store.spill(token, raws, now_ms=ms(self.clock()))

    async def _renew(self, token: str) -> None:
        """Keep the lease while a batch is applied (sends to a slow relay take a while)."""
        while True:
            await asyncio.sleep(LEASE_MS / 3000)
            with contextlib.suppress(Exception):
                await self.store.trim(token, 0, lease_ms=LEASE_MS)
