"""What a job body read from the queue must hold before arq runs it; anything else is rejected.

Whoever can write to Redis can write any bytes into a job body or the queue itself. arq
trusts what it reads, so a bad body raised inside its run loop and took every worker down
with it. Here each body is checked field by field and each queue entry screened; what
fails becomes a `reject` job that logs the job, the field and the reason.

Job formats. A body is JSON: "v" (its format), then arq's "t" (try), "f" (function), "a"
(positional arguments, always none), "k" (keyword arguments, exactly JOB_ARGUMENTS[f]) and
"et" (enqueue time, ms). Format 1 is that; a body without "v" (mailer before the marker) is
format 1 too. Any change to what a body holds or means is a new format. A worker reads the
formats from OLDEST_JOB_FORMAT to JOB_FORMAT:
- a body of a newer format is never run, rejected or dropped: it stays in the queue as it is
  (mailer.state.queue.leave_for_newer) for a worker that reads it, looked at again after 1, 2,
  4 ... 60 s, with a warning line the 1st, 2nd, 4th, 8th ... time;
- a body of a format older than OLDEST_JOB_FORMAT, or with a "v" that is not a whole number
  from 1 up, is rejected like any other malformed body.
A release that brings in format N+1 reads N and N+1 and still writes N; the release after it
writes N+1. Upgraded one release at a time, old and new workers side by side never meet a body
they cannot read; a skipped release or a rollback only delays jobs, it loses none. arq writes
the per-second tick's body itself, without "v": format 1 stays readable for as long as mailer
runs on arq. Mailer before the marker ignores "v" (it reads only arq's fields), so it reads
this release's format 1 bodies too.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Annotated, Any

import orjson
from arq.worker import Worker
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from mailer.constants import ID_PATTERN, QUEUE_NAME
from mailer.durations import reminder_offset
from mailer.lifecycle.kinds import FANNED_OUT
from mailer.state.queue import (
    DRAIN,
    FAN_OUT,
    INGEST,
    JOB_FORMAT,
    KNOWN_FUNCTIONS,
    NEWER_FORMAT,
    REJECT,
    SEND,
    replace_entries,
    serialize,
    untimed_entries,
)
from mailer.state.redis_types import as_client

logger = logging.getLogger("mailer.queue")


# What arq reads from a job body and trusts: `t` (compared with its try counter), `et`
# (turned into a datetime, subtracted from clocks), `f`, `a` and `k` (the call). Each is
# checked here, so a body anyone wrote to Redis can never raise inside arq's run_job,
# which would take the whole worker down (and every restarted one with it).
MAX_ENQUEUE_TRY = 100  # well under worker_options' max_tries: a body cannot exhaust them
EARLIEST_MS = 946_684_800_000  # 2000-01-01 UTC, as in the event contract
LATEST_MS = 4_102_444_800_000  # 2100-01-01 UTC
MAX_BATCH = 10_000  # events per ingest job, message ids per send job
# The oldest job format this release reads (format 1: the bodies of every mailer so far).
OLDEST_JOB_FORMAT = 1


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
    version = data.get("v", 1)
    if not (_is_int(version) and version >= OLDEST_JOB_FORMAT):
        reads = f"this worker reads {OLDEST_JOB_FORMAT} to {JOB_FORMAT}"
        return _rejection(f"v: the job format must be a whole number ({reads}), not {_short(version)}", raw)
    if version > JOB_FORMAT:
        return _newer_format(version, data)
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
    return {"v": JOB_FORMAT, "t": 1, "f": REJECT, "a": [], "k": kwargs, "et": int(time.time() * 1000)}


def _newer_format(version: int, data: dict[str, Any]) -> dict[str, Any]:
    """The job that leaves a body of a newer format in the queue. Nothing else in the body is
    read: a newer format may have changed any of it (arq's fields included)."""
    written = data.get("et", 0)
    enqueued = int(time.time() * 1000)  # only for arq's log line ("queued for ...")
    if _is_int(written) and EARLIEST_MS <= written < LATEST_MS:
        enqueued = written
    return {"v": JOB_FORMAT, "t": 1, "f": NEWER_FORMAT, "a": [], "k": {"version": version}, "et": enqueued}


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
        try:
            await super().start_jobs(job_ids)
        except WatchError as exc:
            # arq WATCHes each job's in-progress key; redis-py reports a connection lost while
            # watching as WatchError, which arq only expects for a job taken elsewhere. Seen
            # killing the worker when Redis died under it: say what it is, so the worker
            # reconnects as for any other lost connection.
            if isinstance(exc.__context__, (RedisConnectionError, RedisTimeoutError, OSError)):
                raise RedisConnectionError(f"lost Redis while starting jobs: {exc.__context__}") from exc
            raise

    async def _screen(self, job_ids: list[bytes]) -> list[bytes]:
        unusable: dict[bytes, str] = {}
        for job_id in job_ids:
            try:
                job_id.decode()
            except UnicodeDecodeError:
                unusable[job_id] = "its queue entry is not UTF-8"
        for job_id, score in await untimed_entries(as_client(self.pool)):
            unusable.setdefault(job_id, f"its queue score {score!r} is not a time in milliseconds")
        if not unusable:
            return job_ids
        rejections = []
        for job_id, reason in unusable.items():
            name = job_id.decode("utf-8", "replace")[:100]
            logger.warning("removed queue entry %r: %s", name, reason)
            rejection = _rejection(f"job {name!r} cannot be run: {reason}", b"")
            rejections.append((f"{_REJECTED_PREFIX}{uuid.uuid4().hex}", rejection))
        await replace_entries(as_client(self.pool), remove=list(unusable), add=rejections)
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
        await replace_entries(as_client(self.pool), remove=[], add=[(rejection_id, rejection)], atomic=True)


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
