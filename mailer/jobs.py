"""The arq job functions: thin adapters from a queue job to the planner, sender and scheduler."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from arq.worker import Retry

from mailer.delivery.sender import Sender
from mailer.errors import InvalidEvent
from mailer.events import IncomingEvent, parse_event
from mailer.intake.inbox import Inbox
from mailer.lifecycle.planner import Planner
from mailer.lifecycle.scheduler import Scheduler
from mailer.ops.alerts import AlertMonitor
from mailer.state.deliverylog import DeliveryLog, LogEntry, LogStatus
from mailer.state.messages import MessageRef
from mailer.state.queue import JOB_FORMAT, REDIS_DOWN, leave_for_newer
from mailer.state.redis_types import as_client
from mailer.state.retention import Retention

logger = logging.getLogger("mailer.jobs")

# With delays of 2, 4, ... 60 s: about nine minutes of retrying before the events of an
# ingest job that keeps failing are written off as rejected in the delivery log.
INGEST_TRIES = 12


@dataclass(slots=True)
class App:
    """What every job needs, built once per worker start and kept in arq's ctx."""

    planner: Planner
    sender: Sender
    scheduler: Scheduler
    inbox: Inbox
    log: DeliveryLog
    retention: Retention
    alerts: AlertMonitor

    def stop(self) -> None:
        """SIGTERM: running jobs end after their sends in flight and hand back the rest."""
        self.sender.stop()


Job = Callable[..., Coroutine[Any, Any, Any]]


def _outlasts_redis(then: Literal["retry", "skip"]) -> Callable[[Job], Job]:
    """Redis vanishing under a job is an outage, not a bug: one warning line, no traceback.

    "retry": arq runs the job again (once Redis is back); "skip": the next tick does the work
    anyway (the tick itself, an inbox drain whose events stay in the inbox).
    """

    def wrap(job: Job) -> Job:
        @functools.wraps(job)
        async def outlasting(ctx: dict[str, Any], **kwargs: Any) -> Any:
            try:
                return await job(ctx, **kwargs)
            except REDIS_DOWN as exc:
                logger.warning(
                    "%s job %s interrupted, Redis went away: %r", job.__name__, ctx.get("job_id"), exc
                )
                if then == "retry":
                    raise Retry(defer=2) from exc
                return None

        return outlasting

    return wrap


def _app(ctx: dict[str, Any]) -> App:
    app: App = ctx["app"]
    return app


def _rejected(log: DeliveryLog, detail: str, **fields: Any) -> LogEntry:
    return LogEntry(ts=log.now(), status="rejected", detail=detail, worker=log.worker, **fields)


async def ingest(ctx: dict[str, Any], *, events: list[Any]) -> dict[str, int]:
    """Apply a batch of producer events (publish_many, enqueue, the inbox) and send what they yield.

    The job's arguments were checked by mailer.intake.job_bodies.deserialize; each event is checked here.
    """
    app = _app(ctx)
    try:
        return await _apply_and_send(app, events)
    except Exception as exc:
        # The events exist nowhere else: arq would drop a job that raised, so retry it.
        tries = int(ctx.get("job_try", 1))
        if tries >= INGEST_TRIES:
            detail = f"could not be applied in {tries} tries, giving up: {type(exc).__name__}: {exc}"
            await app.log.write([_rejected(app.log, detail, source_event=_event_id(e)) for e in events])
            logger.exception("ingest job gave up after %d tries", tries)
            return {"rejected": len(events)}
        logger.warning("ingest job failed (try %d of %d), retrying: %r", tries, INGEST_TRIES, exc)
        raise Retry(defer=_retry_delay(tries)) from exc


@_outlasts_redis("skip")
async def drain(ctx: dict[str, Any]) -> dict[str, int]:
    """Apply the single events publish() put in the inbox, batch by batch (mailer.intake.inbox)."""
    app = _app(ctx)
    # Hand over to a fresh drain job well before arq's job timeout would cancel this one.
    turn_s = app.sender.settings.job_timeout / 4
    applied = await app.inbox.drain(
        lambda events: _apply_and_send(app, events), turn_s=turn_s, stopping=lambda: app.sender.stopping
    )
    return {"events": applied}


async def _apply_and_send(app: App, events: list[Any]) -> dict[str, int]:
    """Plan the events and send right away what they yield (confirmations, notices)."""
    valid: list[IncomingEvent] = []
    rejected: list[LogEntry] = []
    for raw in events:
        try:
            valid.append(parse_event(raw))
        except InvalidEvent as exc:
            # Producers validate too, but anyone can write to the queue: never trust it.
            event_id = (exc.event_id or "")[:200]
            rejected.append(_rejected(app.log, f"invalid event: {exc}", source_event=event_id))
        except Exception as exc:
            # A validator that raised something else is a bug: loud, but only this event's.
            logger.exception("validating an event raised")
            detail = f"invalid event: internal error {type(exc).__name__}: {exc}"
            rejected.append(_rejected(app.log, detail, source_event=_event_id(raw)))
    plan = await app.planner.apply(valid)
    await app.log.write(rejected + plan.notes)
    outcomes = await app.sender.deliver(
        plan.deliver_now, registrations=plan.registrations, events=plan.events
    )
    return {"events": len(valid), "rejected": len(rejected), "sent": _count(outcomes, "sent")}


@_outlasts_redis("retry")
async def send(ctx: dict[str, Any], *, messages: list[str]) -> dict[str, int]:
    """Deliver a batch of messages by id (from a fan-out, a retry, or `mailer retry`)."""
    app = _app(ctx)
    refs: list[MessageRef] = []
    rejected: list[LogEntry] = []
    for message_id in messages:
        try:
            refs.append(MessageRef.parse(message_id))
        except ValueError as exc:
            rejected.append(_rejected(app.log, str(exc), message_id=message_id[:200]))
    await app.log.write(rejected)
    outcomes = await app.sender.deliver(refs)
    return {"messages": len(refs), "sent": _count(outcomes, "sent"), "rejected": len(rejected)}


async def fan_out(ctx: dict[str, Any], *, member: str, due_ms: int, cursor: int = 0) -> int:
    """One slice of a reminder or notice for all of an event's active registrations."""
    try:
        return await _app(ctx).scheduler.fan_out(member, due_ms, cursor)
    except Exception as exc:
        # The schedule entry is gone once its fan-out started: a slice dropped here is a
        # reminder nobody gets, so retry for as long as arq allows (max_tries).
        tries = int(ctx.get("job_try", 1))
        logger.warning("fan-out %s slice %s failed (try %d), retrying: %r", member, cursor, tries, exc)
        raise Retry(defer=_retry_delay(tries)) from exc


@_outlasts_redis("skip")
async def reject(ctx: dict[str, Any], *, reason: str = "", preview: str = "") -> None:
    """Stands in for a job that could not be read (see intake.job_bodies.deserialize); never retried."""
    app = _app(ctx)
    job_id = str(ctx.get("job_id", ""))[:200]
    logger.warning("rejected malformed job %r: %s", job_id, reason)
    detail = f"malformed job: {reason}; job {job_id!r} starts with {preview[:80]!r}"
    await app.log.write([_rejected(app.log, detail)])


# A job of a newer format is looked at again after 1, 2, 4 ... seconds, at most this long.
NEWER_FORMAT_MAX_DELAY_S = 60


@_outlasts_redis("retry")
async def newer_format(ctx: dict[str, Any], *, version: int) -> None:
    """Stands in for a job written in a newer format than this worker reads: the job stays in the
    queue untouched, for a worker of the release that wrote it (see intake.job_bodies)."""
    job_id = str(ctx.get("job_id", ""))
    waits = await leave_for_newer(as_client(ctx["redis"]), job_id)
    delay = min(NEWER_FORMAT_MAX_DELAY_S, 2 ** min(waits - 1, 6))
    if waits & (waits - 1) == 0:  # the 1st, 2nd, 4th, 8th ... time: a line per doubling
        logger.warning(
            "job %r is in job format %d, this worker reads up to %d: left in the queue for a newer "
            "worker (%d time(s) so far; next look in %d s). Finish rolling out the release that "
            "wrote it; nothing is lost meanwhile",
            job_id[:200],
            version,
            JOB_FORMAT,
            waits,
            delay,
        )
    raise Retry(defer=delay)


@_outlasts_redis("skip")
async def tick(ctx: dict[str, Any]) -> dict[str, int]:
    """Every second: start due fan-outs, re-drive due or stranded messages, unstick the inbox,
    remove one bounded slice of what outlived MAILER_RETENTION_DAYS, and (every 30 s, one
    worker) tell ops of trouble by mail (MAILER_ALERT_EMAIL)."""
    app = _app(ctx)
    result = await app.scheduler.tick()
    result["drains_started"] = int(await app.inbox.rearm())
    result |= (await app.retention.run()).counts()
    result["alerts_sent"] = await app.alerts.check()
    return result


def _retry_delay(tries: int) -> float:
    return float(min(60, 2**tries))


def _event_id(raw: Any) -> str:
    if isinstance(raw, str | bytes):  # spilled from the inbox as JSON text
        with contextlib.suppress(ValueError):
            raw = orjson.loads(raw)
    return str(raw.get("id", ""))[:200] if isinstance(raw, dict) else ""


def _count(entries: list[LogEntry], status: LogStatus) -> int:
    return sum(1 for e in entries if e.status == status)
