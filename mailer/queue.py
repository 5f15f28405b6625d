"""The job queue: arq on Redis with a JSON serializer, and the only module that knows arq's layout.

arq is maintenance-only, so everything it is used for goes through here: connection
settings, (de)serialising jobs without pickle, and enqueueing many jobs in one round trip.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Annotated, Any

import orjson
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

from mailer.clock import Clock, ms, utc_now
from mailer.constants import ID_PATTERN, QUEUE_NAME
from mailer.durations import reminder_offset
from mailer.kinds import FANNED_OUT
from mailer.redis_types import RedisClient, as_client

logger = logging.getLogger("mailer.queue")

# Job functions the worker knows; anything else in the queue is recorded as rejected.
INGEST, DRAIN, SEND, FAN_OUT, REJECT = "ingest", "drain", "send", "fan_out", "reject"
KNOWN_FUNCTIONS = frozenset({INGEST, DRAIN, SEND, FAN_OUT, REJECT, "cron:tick"})

_ARQ_JOB_PREFIX = "arq:job:"
_ARQ_RESULT_PREFIX = "arq:result:"
# Job keys expire a day after they were due, as arq's own enqueue_job does.
JOB_EXPIRY_MS = 86_400_000


def job_key(job_id: str) -> str:
    """Where arq keeps a job's body."""
    return _ARQ_JOB_PREFIX + job_id


def job_body(function: str, kwargs: dict[str, object], enqueued_ms: int) -> bytes:
    """A job as arq stores it (in mailer's JSON format)."""
    return serialize({"t": 1, "f": function, "a": [], "k": kwargs, "et": enqueued_ms})


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


# What arq reads from a job body and trusts: `t` (compared with its try counter), `et`
# (turned into a datetime, subtracted from clocks), `f`, `a` and `k` (the call). Each is
# checked here, so a body anyone wrote to Redis can never raise inside arq's run_job,
# which would take the whole worker down (and every restarted one with it).
MAX_ENQUEUE_TRY = 100  # well under worker_options' max_tries: a body cannot exhaust them
EARLIEST_MS = 946_684_800_000  # 2000-01-01 UTC, as in the event contract
LATEST_MS = 4_102_444_800_000  # 2100-01-01 UTC
MAX_BATCH = 10_000  # events per ingest job, message ids per send job


class _JobArguments(BaseModel):
    # Strict: validated values are the very values in the body, so the body's dict is
    # passed on unchanged (no copy per job).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _schedule_member(value: str) -> str:
    parts = value.split("|")
    if len(parts) != 3 or not re.fullmatch(ID_PATTERN, parts[0]):
        raise ValueError("must be EVENT_ID|KIND|DETAIL")
    _, kind, disc = parts
    if kind == "reminder":
        reminder_offset(disc)
    elif kind not in FANNED_OUT or len(disc) > 40 or "/" in disc:
        raise ValueError(f"{kind!r} is not a kind that is fanned out ({', '.join(sorted(FANNED_OUT))})")
    return value


Millis = Annotated[int, Field(ge=EARLIEST_MS, lt=LATEST_MS)]


class IngestArguments(_JobArguments):
    # Each event is validated on its own by the job, so one bad one is one rejection.
    events: list[Any] = Field(max_length=MAX_BATCH)


class SendArguments(_JobArguments):
    messages: list[Annotated[str, StringConstraints(max_length=400)]] = Field(max_length=MAX_BATCH)


class FanOutArguments(_JobArguments):
    member: Annotated[str, StringConstraints(max_length=300), AfterValidator(_schedule_member)]
    due_ms: Millis
    cursor: int = Field(default=0, ge=0, lt=2**64)  # a Redis SSCAN cursor


class RejectArguments(_JobArguments):
    reason: str = ""
    preview: str = ""


class NoArguments(_JobArguments):
    pass


# The keyword arguments each job function takes; none takes positional ones.
JOB_ARGUMENTS: dict[str, type[_JobArguments]] = {
    INGEST: IngestArguments,
    DRAIN: NoArguments,
    SEND: SendArguments,
    FAN_OUT: FanOutArguments,
    REJECT: RejectArguments,
    "cron:tick": NoArguments,
}
assert JOB_ARGUMENTS.keys() == KNOWN_FUNCTIONS


def deserialize(raw: bytes) -> dict[str, Any]:
    """Decode a job; anything arq or the job could trip over becomes a `reject` job that logs why.

    Nothing read from Redis is trusted: a job is run only if every field arq reads has the
    type and range arq assumes and its arguments are exactly what its function takes.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _rejection(f"job is not valid JSON: {exc}", raw)
    if not isinstance(data, dict):
        return _rejection("job is not an arq job object", raw)
    problem = _envelope_problem(data)
    if problem is None:
        problem = _arguments_problem(data["f"], data["k"])
    if problem is not None:
        return _rejection(problem, raw)
    data.setdefault("t", 1)
    data.setdefault("et", int(time.time() * 1000))
    if data["f"] == REJECT:
        data["t"] = 1  # a rejection runs once (max_tries=1); a higher try would fail it unlogged
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _envelope_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the fields arq itself reads, or None."""
    function = data.get("f")
    if not isinstance(function, str) or function not in KNOWN_FUNCTIONS:
        return f"f: unknown job function {_short(function)}"
    tries = data.get("t", 1)
    if tries is not None and not (_is_int(tries) and 0 <= tries <= MAX_ENQUEUE_TRY):
        return f"t: the job try must be a whole number from 0 to {MAX_ENQUEUE_TRY}, not {_short(tries)}"
    enqueued = data.get("et", EARLIEST_MS)
    if not (_is_int(enqueued) and EARLIEST_MS <= enqueued < LATEST_MS):
        return f"et: the enqueue time must be whole milliseconds from 2000 to 2100, not {_short(enqueued)}"
    if data.get("a") != []:
        return f"a: {function} takes no positional arguments, got {_short(data.get('a'))}"
    if not isinstance(data.get("k"), dict):
        return f"k: the keyword arguments must be an object, not {_short(data.get('k'))}"
    return None


def _arguments_problem(function: str, kwargs: dict[str, Any]) -> str | None:
    try:
        JOB_ARGUMENTS[function].model_validate(kwargs)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False, include_input=False)[:5]:
            where = ".".join(str(p) for p in error["loc"]) or "(arguments)"
            problems.append(f"{where}: {str(error['msg']).removeprefix('Value error, ')}")
        return f"{function}: " + "; ".join(problems)
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rejection(reason: str, raw: bytes) -> dict[str, Any]:
    preview = raw[:200].decode("utf-8", "replace")
    kwargs = {"reason": reason[:1000], "preview": preview}
    return {"t": 1, "f": REJECT, "a": [], "k": kwargs, "et": int(time.time() * 1000)}


class QueueWorker(Worker):
    """arq's Worker, except that a job it gives up on without running it is not dropped unseen.

    arq drops a job whose body is gone or empty ("expired"), or whose tries are used up,
    with a line in its own log only. Here each becomes a `reject` job, so the delivery log
    says which job was lost and why, and it counts as rejected, not as a job that raised.
    """

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """Start the jobs arq found due, after taking out queue entries it cannot handle.

        arq decodes each member as UTF-8 and turns its score into an int: a member that is
        not UTF-8, or a score of -inf, raises in its poll loop and kills the worker, and a
        score of 0 is skipped forever (enough of those fill every poll and starve the queue).
        arq reads the lowest scores first, so such entries lead its list; one range query per
        poll (not one per job) finds them.
        """
        if job_ids:
            job_ids = await self._screen(job_ids)
        await super().start_jobs(job_ids)

    async def _screen(self, job_ids: list[bytes]) -> list[bytes]:
        unusable: dict[bytes, str] = {}
        for job_id in job_ids:
            try:
                job_id.decode()
            except UnicodeDecodeError:
                unusable[job_id] = "its queue entry is not UTF-8"
        untimed = await self.pool.zrangebyscore(
            self.queue_name, "-inf", "(1", start=0, num=100, withscores=True
        )
        for job_id, score in untimed:
            unusable.setdefault(job_id, f"its queue score {score!r} is not a time in milliseconds")
        if not unusable:
            return job_ids
        async with self.pool.pipeline(transaction=False) as pipe:
            for job_id, reason in unusable.items():
                pipe.zrem(self.queue_name, job_id)
                name = job_id.decode("utf-8", "replace")[:100]
                logger.warning("removed queue entry %r: %s", name, reason)
                rejection = _rejection(f"job {name!r} cannot be run: {reason}", b"")
                rejection_id = f"{_REJECTED_PREFIX}{uuid.uuid4().hex}"
                pipe.set(job_key(rejection_id), serialize(rejection), px=JOB_EXPIRY_MS)
                pipe.zadd(self.queue_name, {rejection_id: rejection["et"]})
            await pipe.execute()
        return [job_id for job_id in job_ids if job_id not in unusable]

    async def finish_failed_job(self, job_id: str, result_data: bytes | None) -> None:
        await super().finish_failed_job(job_id, result_data)
        self.jobs_failed -= 1
        reason = _arq_reason(result_data)
        if job_id.startswith(_REJECTED_PREFIX):
            logger.error("the rejection job %s was not run either (%s)", job_id, reason)
            return
        rejection = _rejection(f"job {job_id[:100]!r} was not run by arq: {reason}", b"")
        rejection_id = f"{_REJECTED_PREFIX}{job_id[:100]}:{uuid.uuid4().hex[:12]}"
        async with self.pool.pipeline(transaction=True) as pipe:
            pipe.set(job_key(rejection_id), serialize(rejection), px=JOB_EXPIRY_MS)
            pipe.zadd(self.queue_name, {rejection_id: rejection["et"]})
            await pipe.execute()


_REJECTED_PREFIX = "rejected:"


def _arq_reason(result_data: bytes | None) -> str:
    try:
        result = orjson.loads(result_data or b"{}").get("r")
    except (orjson.JSONDecodeError, AttributeError):
        result = None
    if isinstance(result, str) and "job expired" in result:
        return "the job has no body (expired before it ran, or written empty)"
    return str(result or "unknown reason")[:300]


def worker_options(*, max_jobs: int, poll_delay: float, job_timeout: int) -> dict[str, Any]:
    """The arq Worker settings of every mailer worker (the benchmark's queue ceiling uses them too)."""
    return {
        "queue_name": QUEUE_NAME,
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "max_jobs": max_jobs,
        "poll_delay": poll_delay,
        "job_timeout": job_timeout,
        # mailer keeps its own state; arq's result keys would only cost memory.
        "keep_result": 0,
        # A crash re-runs a job (arq counts that as a try); mailer's per-message state, not
        # arq's try counter, decides what is sent, so tries are effectively unlimited.
        "max_tries": 1000,
        "handle_signals": False,
    }


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
            job_deserializer=deserialize,
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
    """A connection for mailer's own state (typed; see mailer.redis_types), same pool kind."""
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
