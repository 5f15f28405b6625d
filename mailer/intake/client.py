"""The producer side: validate events and put them on the queue (async client and a sync wrapper)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from pydantic import BaseModel
from redis.exceptions import RedisError

from mailer.errors import FieldProblem, InvalidEvent, QueueUnavailable
from mailer.events import parse_event
from mailer.intake.inbox import Inbox
from mailer.state.connection import RedisTarget, where_connected
from mailer.state.queue import INGEST, Enqueuer, batch_job_id, connect
from mailer.state.replication import confirm_replicated, one_connection

EventInput = dict[str, Any] | str | bytes | BaseModel


@dataclass(slots=True)
class PublishReport:
    """What `publish_many` did: how many went on the queue, and which records were refused."""

    accepted: int = 0
    jobs: int = 0
    invalid: list[tuple[int, InvalidEvent]] = field(default_factory=list)  # (index, error)


def _as_raw(event: EventInput) -> dict[str, Any]:
    """The event as a dict; anything else is an InvalidEvent saying what it was instead."""
    if isinstance(event, BaseModel):
        dumped: dict[str, Any] = event.model_dump(mode="json")
        return dumped
    if isinstance(event, dict):
        return event
    if not isinstance(event, str | bytes):
        raise InvalidEvent([FieldProblem("(record)", f"must be a JSON object, not {type(event).__name__}")])
    try:
        loaded = orjson.loads(event)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent([FieldProblem("(record)", f"not valid JSON: {exc}")]) from None
    if not isinstance(loaded, dict):
        raise InvalidEvent([FieldProblem("(record)", "must be a JSON object")])
    return loaded


class MailerClient:
    """Publishes registration events for mailer's workers.

    ``async with MailerClient(url) as client: await client.publish(event)``; for Redis Sentinel
    or TLS client certificates pass a RedisTarget instead of the URL (or
    ``RedisTarget.from_settings(load_settings())`` to read the MAILER_REDIS_ variables). Events
    are validated here, so a bad record fails at the producer with field and reason, and again
    in the worker, which trusts nothing it reads from Redis.
    """

    def __init__(
        self,
        redis_url: RedisTarget | str,
        *,
        events_per_job: int = 100,
        log_max_entries: int = 1_000_000,
        name: str = "producer",
    ) -> None:
        self.target = RedisTarget.of(redis_url)
        self.redis_url = self.target.url  # kept for callers that read it; with Sentinel, no host
        self.events_per_job = events_per_job
        self.log_max_entries = log_max_entries
        self.name = name  # the `worker` field of the log entries this client writes
        self._redis: Any = None
        self._enqueuer: Enqueuer | None = None
        self._inbox: Inbox | None = None

    async def __aenter__(self) -> MailerClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        if self._redis is None:
            self._redis = await connect(self.target)  # QueueUnavailable if it cannot
            try:
                await self._redis.ping()
            except (RedisError, OSError) as exc:
                await self._redis.aclose()
                self._redis = None
                raise QueueUnavailable(f"cannot reach Redis at {self._where}: {exc}") from exc
            self._enqueuer = Enqueuer(self._redis)
            self._inbox = Inbox(self._redis)

    @property
    def _where(self) -> str:
        """Which Redis, passwords masked, for messages."""
        if self._redis is not None:
            return where_connected(self._redis.connection_pool, self.target)
        return self.target.describe()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def publish(self, event: EventInput) -> None:
        """Validate and enqueue one event, in one round trip.

        Single events go to mailer's inbox, which a worker drains in batches (see
        mailer.intake.inbox): a registration form's events then cost the worker far less than one
        queue job each. The same event id twice is applied once (the worker logs the replay).
        Raises InvalidEvent (with every field problem) or QueueUnavailable.
        """
        try:
            raw = _as_raw(event)
            parse_event(raw)
        except InvalidEvent as exc:
            await self.log_refusals([("publish", exc)])
            raise
        await self.push_valid(raw)

    async def push_valid(self, raw: dict[str, Any]) -> None:
        """Put one event that passed parse_event in the inbox (publish, and the HTTP intake)."""
        await self.connect()
        assert self._inbox is not None
        try:
            async with self._pinned() as conn:
                await (self._inbox if conn is self._redis else Inbox(conn)).push([orjson.dumps(raw)])
                await confirm_replicated(conn, replicas=self.target.min_replicas, what="the event")
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"publish to {self._where} failed: {exc}") from exc

    async def publish_many(self, events: Iterable[EventInput]) -> PublishReport:
        """Validate many events and enqueue the valid ones, several per job, in few round trips.

        Invalid records are reported by index in the result, not raised: one bad line in an
        import must not hold back the good ones.
        """
        report = PublishReport()
        valid: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            try:
                raw = _as_raw(event)
                parse_event(raw)
            except InvalidEvent as exc:
                report.invalid.append((index, exc))
                continue
            valid.append(raw)
        report.accepted = len(valid)
        report.jobs = await self.enqueue_valid(valid)
        await self.log_refusals((f"record {index + 1}", exc) for index, exc in report.invalid)
        return report

    async def enqueue_valid(self, raws: list[dict[str, Any]]) -> int:
        """Queue events that passed parse_event, several per job, in few round trips (publish_many,
        and the HTTP intake's batches); how many jobs that made."""
        jobs = [
            self._job(raws[i : i + self.events_per_job]) for i in range(0, len(raws), self.events_per_job)
        ]
        await self._enqueue(jobs)
        return len(jobs)

    async def log_refusals(self, refusals: Iterable[tuple[str, InvalidEvent]]) -> None:
        """Write each refused record to the delivery log as `rejected`, so ops see it next to
        the mail: "WHERE: FIELD: REASON; ..." in the detail, the record's event id where it
        had one. Every intake (publish, publish_many, `mailer enqueue`) refuses through here.
        """
        from mailer.clock import iso, utc_now
        from mailer.state.deliverylog import DeliveryLog, LogEntry

        entries = [
            LogEntry(
                ts=iso(utc_now()),
                status="rejected",
                detail=f"{where}: {exc}",
                source_event=exc.event_id or "",
                worker=self.name,
            )
            for where, exc in refusals
        ]
        if not entries:
            return
        await self.connect()  # publish() refuses before it needs a connection of its own
        log = DeliveryLog(self._redis, max_entries=self.log_max_entries, echo=None, worker=self.name)
        try:
            await log.write(entries)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"logging refusals to {self._where} failed: {exc}") from exc

    @staticmethod
    def _job(batch: list[dict[str, Any]]) -> tuple[str, str, dict[str, object]]:
        return (batch_job_id("events:", [str(e.get("id")) for e in batch]), INGEST, {"events": batch})

    async def _enqueue(self, jobs: list[tuple[str, str, dict[str, object]]]) -> int:
        await self.connect()
        assert self._enqueuer is not None
        try:
            async with self._pinned() as conn:
                added = await (self._enqueuer if conn is self._redis else Enqueuer(conn)).enqueue(jobs)
                await confirm_replicated(conn, replicas=self.target.min_replicas, what="the events")
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(
                f"enqueue to {self._where} failed; nothing was enqueued by this call after the error: {exc}"
            ) from exc
        return added

    def _pinned(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """The client's pool; with RedisTarget.min_replicas (MAILER_REDIS_MIN_REPLICAS) one of
        its connections, on which the write and the WAIT for it run: nothing a failover could
        lose is acknowledged."""
        return one_connection(self._redis, replicas=self.target.min_replicas)


class SyncMailerClient:
    """The same for registration systems that are not async (Django, Flask, scripts)."""

    def __init__(
        self,
        redis_url: RedisTarget | str,
        *,
        events_per_job: int = 100,
        log_max_entries: int = 1_000_000,
        name: str = "producer",
    ) -> None:
        self._runner = asyncio.Runner()
        self._client = MailerClient(
            redis_url, events_per_job=events_per_job, log_max_entries=log_max_entries, name=name
        )

    def publish(self, event: EventInput) -> None:
        return self._runner.run(self._client.publish(event))

    def publish_many(self, events: Iterable[EventInput]) -> PublishReport:
        return self._runner.run(self._client.publish_many(events))

    def log_refusals(self, refusals: Iterable[tuple[str, InvalidEvent]]) -> None:
        return self._runner.run(self._client.log_refusals(refusals))

    def close(self) -> None:
        self._runner.run(self._client.close())
        self._runner.close()

    def __enter__(self) -> SyncMailerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
