"""The job queue in Redis: arq's keys and job layout, the connection, and enqueueing many jobs at once.

arq is maintenance-only, so everything it is used for goes through here and through
mailer.intake.job_bodies (what a body read back must hold before anything runs it):
connection settings, JSON job bodies (never pickle), and one round trip for many jobs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any

import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

from mailer.clock import Clock, ms, utc_now
from mailer.constants import JOB_WAITS_KEY, QUEUE_NAME
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


def redis_settings(url: str) -> RedisSettings:
    """arq's connection settings for `url`; a URL it cannot read is a ConfigError."""
    from mailer.errors import ConfigError

    try:
        settings = RedisSettings.from_dsn(url)
    except (ValueError, RuntimeError) as exc:  # arq raises RuntimeError for an unknown scheme
        raise ConfigError(f"MAILER_REDIS_URL: {exc}", setting="MAILER_REDIS_URL") from None
    # Fail fast on a dead server; the worker's own loop does the patient retrying.
    settings.conn_timeout = 2
    settings.conn_retries = 0
    return settings


# What a Redis that went away raises (redis-py's errors, and sockets'); QueueUnavailable is a
# ConnectionError too. The worker reconnects after these; a job hit by one is not a bug.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    OSError,
)


def masked_url(url: str) -> str:
    """A Redis URL with any password masked, for logs and messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


async def connect(url: str) -> ArqRedis:
    """A Redis pool that speaks mailer's job format (JSON, mailer's queue).

    The one place where a Redis that cannot be reached (refused, timed out, wrong password)
    becomes QueueUnavailable; the URL in its message has any password masked.
    """
    from redis.exceptions import RedisError

    from mailer.errors import QueueUnavailable

    try:
        pool = await create_pool(
            redis_settings(url),
            job_serializer=serialize,
            # The worker reads bodies through mailer.intake.job_bodies; this pool runs no job.
            job_deserializer=orjson.loads,
            default_queue_name=QUEUE_NAME,
        )
    except (RedisError, OSError) as exc:  # OSError includes TimeoutError
        reason = exc or type(exc).__name__
        raise QueueUnavailable(f"cannot reach Redis at {masked_url(url)}: {reason}") from exc
    connections = pool.connection_pool
    faster = _HIREDIS_PACKING.get(connections.connection_class)
    if faster is not None:
        connections.connection_class = faster
        await connections.disconnect()  # the one create_pool opened to ping; reopened on use
    return pool


async def connect_client(url: str) -> RedisClient:
    """A connection for mailer's own state (typed; see mailer.state.redis_types), same pool kind."""
    return as_client(await connect(url))


class _HiredisPacking:
    """Commands packed by hiredis (C), as redis-py's sync connections do when it is installed.

    redis-py 5's asyncio connections pack every command in Python, re-joining the buffer
    per argument: with a few hundred commands per batch that was ~8 % of a worker's CPU
    (py-spy); hiredis packs a 15-argument HSET in 1.5 us instead of 13.6 us.
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self._packer.pack(*command)[0] for command in commands)]


class _HiredisConnection(_HiredisPacking, Connection):
    pass


class _HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class _HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


_HIREDIS_PACKING: dict[type[Any], type[Any]] = (
    {
        Connection: _HiredisConnection,
        UnixDomainSocketConnection: _HiredisUnixConnection,
        SSLConnection: _HiredisSSLConnection,
    }
    if HIREDIS_AVAILABLE
    else {}
)


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
