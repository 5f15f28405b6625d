"""Time-driven work: due reminders fanned out to an event's registrations, and messages re-driven."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from mailer.clock import Clock, ms, utc_now
from mailer.durations import Offset
from mailer.lifecycle.kinds import reminder_disc
from mailer.state.circuit import RelayCircuit
from mailer.state.message_states import MessageStore
from mailer.state.messages import MessageRef
from mailer.state.queue import FAN_OUT, SEND, Enqueuer, batch_job_id
from mailer.state.schedule import ScheduleMember, ScheduleStore
from mailer.state.store import RedisClient

logger = logging.getLogger("mailer.scheduler")

# Registrations read per fan-out slice; each slice is one short job, so a killed worker
# repeats at most one slice, and no job runs long enough to outlive its lease.
FAN_OUT_SLICE = 5000


class Scheduler:
    """Turns due schedule entries into fan-out jobs and due messages into send jobs."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        batch_size: int,
        clock: Clock = utc_now,
        circuit: RelayCircuit | None = None,
    ) -> None:
        # While the relay circuit holds the mail, re-driving held messages would only claim
        # and hold them again, every second, all of them: wait for the hold to end instead.
        self.circuit = circuit
        self.batch_size = batch_size
        self.clock = clock
        self.enqueuer = Enqueuer(redis, clock=clock)
        self.store = MessageStore(redis)
        self.schedule = ScheduleStore(redis)

    async def tick(self) -> dict[str, int]:
        """One pass; run every second by the worker's cron. Safe to run on several workers."""
        now_ms = ms(self.clock())
        fan_outs = 0
        for member, due_ms in await self.schedule.due(now_ms=now_ms, limit=100):
            # The job id names the entry and its due time: enqueueing twice is a no-op, and
            # a rescheduled entry (new due time) gets a new job.
            job_id = f"fan:{member}:{due_ms}:0"
            await self.enqueuer.enqueue(
                [(job_id, FAN_OUT, {"member": member, "due_ms": due_ms, "cursor": 0})]
            )
            await self.schedule.remove_if_still(member, due_ms)
            fan_outs += 1
        holding = self.circuit is not None and await self.circuit.holding(now_ms=now_ms)
        redriven = 0 if holding else await self.redrive_due(now_ms=now_ms)
        return {"fan_outs": fan_outs, "redriven": redriven}

    async def redrive_due(self, *, now_ms: int, limit: int = 5000) -> int:
        """Send jobs for messages whose time has come: retries, and planned or sending ones
        whose job was lost (a killed worker, a Redis restored from an older snapshot)."""
        message_ids = await self.store.due(now_ms=now_ms, limit=limit)
        if not message_ids:
            return 0
        # Look again in a lease's time if nothing settles them; the claim decides who sends.
        await self.store.postpone(message_ids, now_ms + 60_000)
        jobs: list[tuple[str, str, dict[str, object]]] = []
        for start in range(0, len(message_ids), self.batch_size):
            chunk = message_ids[start : start + self.batch_size]
            jobs.append(
                (batch_job_id(f"redrive:{now_ms}:", chunk, digest_size=10), SEND, {"messages": chunk})
            )
        await self.enqueuer.enqueue(jobs)
        return len(message_ids)

    async def fan_out(self, member: str, due_ms: int, cursor: int) -> int:
        """Send one slice of an event's active registrations the message `member` stands for."""
        event_id, kind, disc = ScheduleMember.parse(member)
        if kind == "reminder":
            due = datetime.fromtimestamp(due_ms / 1000, tz=UTC)
            disc = reminder_disc(Offset.parse(disc), due)
        next_cursor, registration_ids = await self.schedule.registrations_page(
            event_id, cursor, count=FAN_OUT_SLICE
        )
        refs = [MessageRef(r, kind, disc).id for r in registration_ids]
        jobs: list[tuple[str, str, dict[str, object]]] = []
        for start in range(0, len(refs), self.batch_size):
            chunk = refs[start : start + self.batch_size]
            jobs.append((f"send:{member}:{due_ms}:{cursor}:{start}", SEND, {"messages": chunk}))
        if next_cursor != 0:
            follow = {"member": member, "due_ms": due_ms, "cursor": next_cursor}
            jobs.append((f"fan:{member}:{due_ms}:{next_cursor}", FAN_OUT, follow))
        await self.enqueuer.enqueue(jobs)
        return len(refs)
