"""Each worker process's heartbeat: one member per worker in a sorted set, scored with the time
of its last beat. arq keeps one health key for all workers, so one worker stopping made every
worker look dead; here each is seen on its own (`/readyz`, and later metrics)."""

from __future__ import annotations

from mailer.constants import WORKERS_KEY
from mailer.state.redis_types import RedisClient

BEAT_MS = 5_000  # how often a worker beats
FRESH_MS = 30_000  # a worker is alive while its last beat is younger than this
FORGET_MS = 86_400_000  # a worker silent for a day is dropped from the set


async def beat(redis: RedisClient, worker: str, *, now_ms: int) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(WORKERS_KEY, {worker: now_ms})
        pipe.zremrangebyscore(WORKERS_KEY, 0, now_ms - FORGET_MS)
        await pipe.execute()


async def fresh_workers(redis: RedisClient, *, now_ms: int) -> list[str]:
    """The workers whose last beat is fresh, by name."""
    names = await redis.zrangebyscore(WORKERS_KEY, now_ms - FRESH_MS, "+inf")
    return sorted(n.decode() for n in names)
