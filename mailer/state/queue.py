"""The job queue in Redis: arq's keys and job layout, its client, and enqueueing many jobs at once.

arq is maintenance-only, so everything it is used for goes through here and through
mailer.intake.job_bodies (what a body read back must hold before anything runs it): arq's
client on mailer's own connection pool (mailer.state.connection: Sentinel, TLS), JSON job
bodies (never pickle), and one round trip for many jobs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mailer.clock import Clock, ms, utc_now
from mailer.constants import JOB_WAITS_KEY, QUEUE_NAME
from mailer.state.connection import RedisTarget, open_pool
from mailer.state.redis_types import RedisClient, as_client

# Job functions the worker knows; anything else in the queue is recorded as rejected.
INGEST, DRAIN, SEND, FAN_OUT, REJECT = "ingest", "drain", "send", "fan_out", "reject"
KNOWN_FUNCTIONS = frozenset({INGEST, DRAIN, SEND, FAN_OUT, REJECT, "cron:tick"})
# Stands in for a job of a newer format (mailer.intake.job_bodies); no body may name it.
NEWER_FORMAT = "newer_format"

# The job body format this release writes ("v"; a body without one is format 1). What each
# format holds, and which a worker reads, is in mailer.intake.job_bodies.
JOB_FORMAT = 1

_ARQ_JOB_PREFIX = "arq:job:"
_ARQ_RESULT_PREFIX = "arq:result:"
_ARQ_RETRY_PREFIX = "arq:retry:"
# Job keys expire a day after they were due, as arq's own enqueue_job does.
JOB_EXPIRY_MS = 86_400_000


def job_key(job_id: str) -> str:
    """Where arq keeps a job's body."""
    return _ARQ_JOB_PREFIX + job_id


def job_body(function: str, kwargs: dict[str, object], enqueued_ms: int) -> bytes:
    """A job as arq stores it (in mailer's JSON format, marked with its format version)."""
    return serialize({"v": JOB_FORMAT, "t": 1, "f": function, "a": [], "k": kwargs, "et": enqueued_ms})


async def leave_for_newer(redis: RedisClient, job_id: str) -> int:
    """Keep a job this worker cannot read in the queue as it is, for a worker that can: its body
    lives another JOB_EXPIRY_MS, and arq's count of its tries is given back (this was no try,
    and a newer worker must not find them used up). Returns how often it was left so far."""
    waits = JOB_WAITS_KEY.format(job_id=job_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(waits)
        pipe.pexpire(waits, JOB_EXPIRY_MS)
        pipe.pexpire(job_key(job_id), JOB_EXPIRY_MS)
        pipe.decr(_ARQ_RETRY_PREFIX + job_id)
        left, *_ = await pipe.execute()
    return int(left)


def job_body_before_time(function: str, kwargs: dict[str, object]) -> str:
    """A job body up to its enqueue time, for Lua that appends Redis's clock and the closing brace."""
    # job_body writes "et" last (orjson keeps the dict's order), so the body ends `"et":0}`.
    return job_body(function, kwargs, 0).decode().removesuffix("0}")


def batch_job_id(prefix: str, parts: list[str] | list[bytes], digest_size: int = 12) -> str:
    """A job id naming a batch by its content, so enqueueing the same batch twice is a no-op."""
    joined = b"\n".join(p if isinstance(p, bytes) else p.encode() for p in parts)
    return prefix + hashlib.blake2b(joined, digest_size=digest_size).hexdigest()


# Lua: `now`, milliseconds by Redis's clock. Jobs due now are scored with it rather than the
# caller's clock: a producer host whose clock runs fast must not park its jobs in the future.
REDIS_NOW_MS = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
"""


def serialize(obj: Any) -> bytes:
    """JSON, never pickle: whoever can write to Redis must not be able to run code in the worker."""
    return orjson.dumps(obj, default=repr)


async def untimed_entries(redis: RedisClient, *, limit: int = 100) -> list[tuple[bytes, float]]:
    """Queue entries scored below 1 ms (0, negative, -inf): arq skips or chokes on them."""
    rows = await redis.zrangebyscore(QUEUE_NAME, "-inf", "(1", start=0, num=limit, withscores=True)
    return [(member, float(score)) for member, score in rows]


async def replace_entries(
    redis: RedisClient, *, remove: list[bytes], add: list[tuple[str, dict[str, Any]]], atomic: bool = False
) -> None:
    """Take queue entries out and put jobs in (id, arq job dict due at its "et"), one round trip."""
    async with redis.pipeline(transaction=atomic) as pipe:
        for member in remove:
            pipe.zrem(QUEUE_NAME, member)
        for job_id, job in add:
            pipe.set(job_key(job_id), serialize(job), px=JOB_EXPIRY_MS)
            pipe.zadd(QUEUE_NAME, {job_id: job["et"]})
        await pipe.execute()


# What a Redis that went away raises (redis-py's errors, and sockets'); QueueUnavailable is a
# ConnectionError too. The worker reconnects after these; a job hit by one is not a bug. A
# ReadOnlyError comes from a master that was demoted in a failover and still holds the
# connection (a Sentinel-managed connection turns it into a ConnectionError itself; a URL that
# points at whichever node a DNS name or a load balancer picks does not).
REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    ConnectionError,
    OSError,
)


async def connect(where: RedisTarget | str) -> ArqRedis:
    """A Redis pool that speaks mailer's job format (JSON, mailer's queue), for a URL or a
    RedisTarget (Sentinel, TLS).

    The one place where a Redis that cannot be reached (refused, timed out, wrong password, no
    master known to the Sentinels) becomes QueueUnavailable; its message says which Redis was
    tried, passwords masked.
    """
    from redis.exceptions import RedisError

    from mailer.errors import QueueUnavailable

    target = RedisTarget.of(where)
    # arq's client on mailer's pool (ArqRedis is a redis.asyncio.Redis): the same connections
    # serve arq's queue and mailer's own keys.
    pool = ArqRedis(
        open_pool(target),
        job_serializer=serialize,
        # The worker reads bodies through mailer.intake.job_bodies; this pool runs no job.
        job_deserializer=orjson.loads,
        default_queue_name=QUEUE_NAME,
    )
    pool.auto_close_connection_pool = True  # closing the client closes its pool
    try:
        await pool.ping()
    except (RedisError, OSError) as exc:  # OSError includes TimeoutError
        await pool.aclose()
        reason = exc or type(exc).__name__
        raise QueueUnavailable(f"cannot reach Redis at {target.describe()}: {reason}") from exc
    return pool


async def connect_client(where: RedisTarget | str) -> RedisClient:
    """A connection for mailer's own state (typed; see mailer.state.redis_types), same pool kind."""
    return as_client(await connect(where))


# Enqueue one job unless a job (or a kept result) with its id exists: arq's enqueue_job
# does the same with WATCH/MULTI in three round trips; this does it for many in one. A job
# due "now" (empty score) is scored with Redis's clock.
_ENQUEUE_SCRIPT = (
    REDIS_NOW_MS
    + """
local added = 0
for i = 1, #KEYS, 2 do
  local n = (i + 1) / 2
  local id = ARGV[3 + 3 * (n - 1)]
  if redis.call('EXISTS', KEYS[i], KEYS[i + 1]) == 0 then
    local score = ARGV[5 + 3 * (n - 1)]
    if score == '' then score = now end
    redis.call('SET', KEYS[i], ARGV[4 + 3 * (n - 1)], 'PX', ARGV[2])
    redis.call('ZADD', ARGV[1], score, id)
    added = added + 1
  end
end
return added
"""
)


class Enqueuer:
    """Puts jobs on the queue, many per round trip; returns how many were new."""

    def __init__(self, redis: RedisClient, *, clock: Clock = utc_now) -> None:
        self.redis = redis
        self.clock = clock
        self._script = redis.register_script(_ENQUEUE_SCRIPT)

    async def enqueue(
        self,
        jobs: list[tuple[str, str, dict[str, object]]],
        *,
        run_at_ms: int | None = None,
        chunk: int = 200,
    ) -> int:
        """Enqueue (job_id, function, kwargs) triples, due now or at `run_at_ms`."""
        now = ms(self.clock())
        score: int | str = run_at_ms if run_at_ms is not None else ""
        added = 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for start in range(0, len(jobs), chunk):
                keys: list[str] = []
                args: list[Any] = [QUEUE_NAME, max((run_at_ms or now) - now, 0) + JOB_EXPIRY_MS]
                for job_id, function, kwargs in jobs[start : start + chunk]:
                    keys += [_ARQ_JOB_PREFIX + job_id, _ARQ_RESULT_PREFIX + job_id]
                    body = job_body(function, kwargs, now)
                    args += [job_id, body, score]
                await self._script(keys=keys, args=args, client=pipe)
            results = await pipe.execute()
        for result in results:
            added += int(result)
        return added
