"""Which messages an incoming event yields, and when: the lifecycle rules of a registration."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from mailer.clock import Clock, iso, ms, utc_now
from mailer.durations import Offset
from mailer.events import (
    Event,
    EventCancelled,
    EventUpdated,
    IncomingEvent,
    RegistrationCancelled,
    RegistrationCreated,
)
from mailer.lifecycle.changes import notified_changes, unnotified_changes
from mailer.state.deliverylog import LogEntry, LogStatus
from mailer.state.messages import MessageRef, MessageState
from mailer.state.records import REDIS_FAILURES, Records
from mailer.state.store import (
    Change,
    Enrol,
    MarkSeen,
    PlanMessage,
    PutEvent,
    PutRegistration,
    RedisClient,
    Schedule,
    StoredEvent,
    StoredRegistration,
    schedule_member,
)

logger = logging.getLogger("mailer.planner")

# A planned message is looked at again if nobody sent it this long after it was due.
RECHECK_GRACE = timedelta(seconds=30)


@dataclass(slots=True)
class Plan:
    """What applying a batch of events does: messages to send now, fan-outs, log notes."""

    deliver_now: list[MessageRef] = field(default_factory=list)
    notes: list[LogEntry] = field(default_factory=list)
    # (action, kind, locale) -> count, and a few recipients per (action, kind), for --dry-run.
    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    samples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)  # applied together once the batch is decided
    # The state after the batch, as written: the send path starts from it instead of reading
    # back from Redis what was just put there.
    registrations: dict[str, StoredRegistration] = field(default_factory=dict)
    events: dict[str, StoredEvent] = field(default_factory=dict)
    dry_run: bool = False  # also gather the fan-out counts and samples --dry-run shows

    def count(self, action: str, kind: str, locale: str, recipient: str = "", n: int = 1) -> None:
        self.counts[(action, kind, locale)] += n
        if recipient:
            sample = self.samples.setdefault((action, kind), [])
            if len(sample) < 5:
                sample.append(recipient)


class Planner:
    """Applies events to the stored state and says what to send; `dry_run` only says it."""

    def __init__(
        self,
        redis: RedisClient,
        *,
        default_offsets: tuple[Offset, ...],
        clock: Clock = utc_now,
        worker: str = "",
    ) -> None:
        self.records = Records(redis)
        self.default_offsets = default_offsets
        self.clock = clock
        self.worker = worker

    async def apply(self, events: list[IncomingEvent], *, dry_run: bool = False) -> Plan:
        """Plan a batch and write it in one pipeline; the plan says what to send now.

        An event whose planning raises (a date that cannot be computed, a stored record that
        cannot be read, a bug) is `rejected` on its own, with its id and the reason, and the
        batch is planned again without it: nothing is written before a pass succeeds, so
        the other events go through in this same call, not after a retry of the batch.
        """
        now = self.clock()
        refused: list[LogEntry] = []
        while True:
            try:
                plan = await self._plan_pass(events, dry_run=dry_run, now=now)
            except _Unplannable as failure:
                refused.append(self._refusal(failure))
                rest = [e for e in events if e is not failure.incoming]
                assert len(rest) < len(events)  # each pass drops one event: this ends
                events = rest
                continue
            break
        plan.notes[:0] = refused
        if not dry_run and plan.changes:
            await self.records.apply(plan.changes)
        return plan

    async def _plan_pass(self, events: list[IncomingEvent], *, dry_run: bool, now: datetime) -> Plan:
        plan = Plan(dry_run=dry_run)
        already = await self.records.seen(e.id for e in events)
        reg_ids = [
            e.registration.id for e in events if isinstance(e, RegistrationCreated | RegistrationCancelled)
        ]
        regs: dict[str, StoredRegistration | None] = dict.fromkeys(reg_ids)
        loaded_regs = await self.records.registrations(reg_ids)
        regs.update(loaded_regs.found)
        unreadable = dict(loaded_regs.unreadable)
        event_ids = [e.event.id for e in events if not isinstance(e, RegistrationCancelled)]
        event_ids += [r.event_id for r in regs.values() if r is not None and r.event_id]
        stored: dict[str, StoredEvent | None] = dict.fromkeys(event_ids)
        loaded_events = await self.records.events(event_ids)
        stored.update(loaded_events.found)
        unreadable |= {f"event {k}": v for k, v in loaded_events.unreadable.items()}

        for incoming in events:
            try:
                _check_readable(incoming, regs, unreadable)
                await self._apply_one(incoming, already, regs, stored, plan, now)
            except REDIS_FAILURES:
                raise  # Redis trouble is the batch's (the job retries), not this event's fault
            except Exception as exc:
                raise _Unplannable(incoming, exc) from exc
        plan.registrations = {k: v for k, v in regs.items() if v is not None}
        plan.events = {k: v for k, v in stored.items() if v is not None}
        return plan

    async def _apply_one(
        self,
        incoming: IncomingEvent,
        already: set[str],
        regs: dict[str, StoredRegistration | None],
        stored: dict[str, StoredEvent | None],
        plan: Plan,
        now: datetime,
    ) -> None:
        if incoming.id in already:
            plan.notes.append(self._note(incoming, "ignored", "event id already applied (replay)"))
            if isinstance(incoming, RegistrationCreated):
                # A re-run of a job killed mid-send lands here: drive its confirmation
                # again. The claim makes this a no-op if it was sent already.
                plan.deliver_now.append(MessageRef(incoming.registration.id, "confirmation"))
            return
        already.add(incoming.id)
        plan.changes.append(MarkSeen(incoming.id))
        if isinstance(incoming, RegistrationCreated):
            self._created(incoming, regs, stored, plan, now)
        elif isinstance(incoming, RegistrationCancelled):
            self._registration_cancelled(incoming, regs, stored, plan, now)
        elif isinstance(incoming, EventUpdated):
            await self._event_updated(incoming, stored, plan, now)
        else:
            await self._event_cancelled(incoming, stored, plan, now)

    def _refusal(self, failure: _Unplannable) -> LogEntry:
        incoming, exc = failure.incoming, failure.error
        logger.error("event %s could not be planned; rejected", incoming.id, exc_info=exc)
        event = getattr(incoming, "event", None)
        return self._note(
            incoming,
            "rejected",
            f"could not be planned: {type(exc).__name__}: {exc}"[:500],
            event_id=getattr(event, "id", ""),
        )

    # --- registration.created -------------------------------------------------------------

    def _created(
        self,
        incoming: RegistrationCreated,
        regs: dict[str, StoredRegistration | None],
        stored: dict[str, StoredEvent | None],
        plan: Plan,
        now: datetime,
    ) -> None:
        reg_in = incoming.registration
        occurred = ms(incoming.occurred_at)
        event = self._ensure_event(incoming.event, occurred, stored, plan, now)
        current = regs.get(reg_in.id)
        attendee = reg_in.attendee
        confirmation = MessageRef(reg_in.id, "confirmation")

        def about(status: LogStatus, detail: str) -> None:
            """A note on this registration's confirmation."""
            plan.notes.append(
                self._note(
                    incoming,
                    status,
                    detail,
                    ref=confirmation,
                    recipient=attendee.email,
                    event_id=event.event.id,
                )
            )

        if current is not None and current.status == "cancelled" and current.occurred_ms >= occurred:
            # The cancellation overtook its registration: same end state as in order, so the
            # attendee gets the cancellation notice now that we know the address.
            current.attendee, current.event_id, current.created_ms = attendee, event.event.id, occurred
            current.reference, current.manage_url = reg_in.reference, reg_in.manage_url
            self._put_registration(current, plan)
            about("skipped", "registration was cancelled before its confirmation")
            self._plan_message(
                MessageRef(reg_in.id, "registration_cancelled"), attendee.locale, attendee.email, plan, now
            )
            return
        if current is not None and current.status == "active" and current.event_id != event.event.id:
            about("rejected", f"registration id already belongs to event {current.event_id}")
            return
        # The same registration again under a new producer id may update the attendee's
        # details, but sends nothing twice: the confirmation's state already exists.
        if current is not None and current.status == "active":
            about("ignored", "registration already active: details updated, nothing sent again")
        self._activate(incoming, event, regs, plan, now, about)

    def _activate(
        self,
        incoming: RegistrationCreated,
        event: StoredEvent,
        regs: dict[str, StoredRegistration | None],
        plan: Plan,
        now: datetime,
        about: Callable[[LogStatus, str], None],
    ) -> None:
        """Store the registration as active, enrol it, and confirm it if the event still lies ahead."""
        reg_in, attendee, occurred = (
            incoming.registration,
            incoming.registration.attendee,
            ms(incoming.occurred_at),
        )
        confirmation = MessageRef(reg_in.id, "confirmation")
        registration = StoredRegistration(
            id=reg_in.id,
            attendee=attendee,
            event_id=event.event.id,
            status="active",
            occurred_ms=occurred,
            created_ms=occurred,
            reference=reg_in.reference,
            manage_url=reg_in.manage_url,
        )
        regs[reg_in.id] = registration
        self._put_registration(registration, plan)
        plan.changes.append(Enrol(event.event.id, reg_in.id, active=True))
        if event.status == "cancelled":
            about("skipped", "the event is cancelled")
        elif now >= event.event.starts_at:
            about("skipped", "the event has already started")
        else:
            self._plan_message(confirmation, attendee.locale, attendee.email, plan, now)

    def _ensure_event(
        self, event: Event, occurred: int, stored: dict[str, StoredEvent | None], plan: Plan, now: datetime
    ) -> StoredEvent:
        current = stored.get(event.id)
        if current is not None:
            # A known event changes only through event.updated: a registration carries the
            # event as the form showed it, which may be older than the last update.
            return current
        current = StoredEvent(event=event, version=1, occurred_ms=occurred, status="active")
        stored[event.id] = current
        plan.changes.append(PutEvent(event.id, current.to_fields()))
        self._schedule_reminders(None, event, plan, now)
        return current

    # --- registration.cancelled -----------------------------------------------------------

    def _registration_cancelled(
        self,
        incoming: RegistrationCancelled,
        regs: dict[str, StoredRegistration | None],
        stored: dict[str, StoredEvent | None],
        plan: Plan,
        now: datetime,
    ) -> None:
        rid = incoming.registration.id
        occurred = ms(incoming.occurred_at)
        current = regs.get(rid)
        if current is None:
            tombstone = StoredRegistration(rid, None, None, "cancelled", occurred, 0)
            regs[rid] = tombstone
            self._put_registration(tombstone, plan)
            plan.notes.append(
                self._note(
                    incoming,
                    "planned",
                    "cancellation arrived before its registration; the notice "
                    "goes out when the registration does",
                    ref=MessageRef(rid, "registration_cancelled"),
                )
            )
            return
        if current.status == "cancelled" or current.created_ms > occurred:
            why = "already cancelled" if current.status == "cancelled" else "older than the registration"
            ref = MessageRef(rid, "registration_cancelled")
            plan.notes.append(self._note(incoming, "ignored", why, ref=ref))
            return
        current.status, current.occurred_ms = "cancelled", occurred
        self._put_registration(current, plan)
        if current.event_id:
            plan.changes.append(Enrol(current.event_id, rid, active=False))
        assert current.attendee is not None  # active registrations always have one
        self._plan_message(
            MessageRef(rid, "registration_cancelled"),
            current.attendee.locale,
            current.attendee.email,
            plan,
            now,
        )

    # --- event.updated / event.cancelled ----------------------------------------------------

    async def _event_updated(
        self, incoming: EventUpdated, stored: dict[str, StoredEvent | None], plan: Plan, now: datetime
    ) -> None:
        new = incoming.event
        occurred = ms(incoming.occurred_at)
        current = stored.get(new.id)
        if current is None:
            self._ensure_event(new, occurred, stored, plan, now)
            return
        if current.occurred_ms >= occurred or current.status == "cancelled":
            why = "event is cancelled" if current.status == "cancelled" else "a newer version is stored"
            plan.notes.append(self._note(incoming, "ignored", why, event_id=new.id))
            return
        changed = notified_changes(current.event, new)
        old = current.event
        current.occurred_ms = occurred
        current.event = new
        if changed:
            current.previous = old
            current.version += 1
        plan.changes.append(PutEvent(new.id, current.to_fields()))
        self._schedule_reminders(old, new, plan, now)
        if changed:
            await self._fan_out_now(new.id, "event_changed", f"v{current.version}", plan, now)
        else:
            others = ", ".join(unnotified_changes(old, new)) or "nothing"
            detail = (
                "no change attendees are told about (time, place, link, access details, title, "
                f"accessibility); changed: {others}"
            )
            plan.notes.append(self._note(incoming, "ignored", detail, event_id=new.id))

    async def _event_cancelled(
        self, incoming: EventCancelled, stored: dict[str, StoredEvent | None], plan: Plan, now: datetime
    ) -> None:
        event_id = incoming.event.id
        occurred = ms(incoming.occurred_at)
        current = stored.get(event_id)
        if current is None:
            plan.notes.append(
                self._note(incoming, "ignored", "unknown event: nobody to notify", event_id=event_id)
            )
            return
        if current.status == "cancelled" or current.occurred_ms >= occurred:
            why = "already cancelled or a newer version is stored"
            plan.notes.append(self._note(incoming, "ignored", why, event_id=event_id))
            return
        current.status, current.occurred_ms = "cancelled", occurred
        current.version += 1
        plan.changes.append(PutEvent(event_id, current.to_fields()))
        self._schedule_reminders(current.event, None, plan, now)
        await self._fan_out_now(event_id, "event_cancelled", "", plan, now)

    # --- helpers ----------------------------------------------------------------------------

    def _schedule_reminders(self, old: Event | None, new: Event | None, plan: Plan, now: datetime) -> None:
        """Keep one schedule entry per event and offset; a reschedule rewrites only those."""
        either = new or old
        if either is None:
            return
        old_offsets = set(old.offsets(self.default_offsets)) if old else set()
        new_offsets = set(new.offsets(self.default_offsets)) if new else set()
        event_id = either.id
        for offset in old_offsets - new_offsets:
            member = schedule_member(event_id, "reminder", offset.iso)
            plan.changes.append(Schedule(member, None))
        if new is None:
            return
        for offset in new_offsets:
            member = schedule_member(event_id, "reminder", offset.iso)
            due = offset.before(new.starts_at, new.timezone)
            if due > now:
                plan.changes.append(Schedule(member, ms(due)))
                plan.count("schedule", "reminder", offset.iso)
            else:
                plan.changes.append(Schedule(member, None))

    async def _fan_out_now(self, event_id: str, kind: str, disc: str, plan: Plan, now: datetime) -> None:
        member = schedule_member(event_id, kind, disc)
        plan.changes.append(Schedule(member, ms(now)))
        if not plan.dry_run:
            return
        # For --dry-run only: how many would get it, and a few of them (three round trips).
        active, sample = await self.records.enrolled(event_id, sample=5)
        plan.count("send", kind, "*", n=active)
        for reg in (await self.records.registrations(sample)).found.values():
            if reg.attendee:
                plan.count("send", kind, reg.attendee.locale, reg.attendee.email, n=0)

    def _plan_message(self, ref: MessageRef, locale: str, recipient: str, plan: Plan, now: datetime) -> None:
        state = MessageState("planned", 0, ms(now), ms(now), 0)
        plan.changes.append(PlanMessage(ref, state, recheck_ms=ms(now + RECHECK_GRACE)))
        plan.deliver_now.append(ref)
        plan.count("send", ref.kind, locale, recipient)

    def _put_registration(self, registration: StoredRegistration, plan: Plan) -> None:
        plan.changes.append(PutRegistration(registration.id, registration.to_fields()))

    def _note(
        self,
        incoming: IncomingEvent,
        status: LogStatus,
        detail: str,
        *,
        ref: MessageRef | None = None,
        recipient: str = "",
        event_id: str = "",
    ) -> LogEntry:
        return LogEntry(
            ts=iso(self.clock()),
            status=status,
            message_id=ref.id if ref else "",
            kind=ref.kind if ref else "",
            registration_id=ref.registration_id if ref else "",
            event_id=event_id,
            recipient=recipient,
            detail=detail,
            worker=self.worker,
            source_event=incoming.id,
        )


class _Unplannable(Exception):
    """One event of a batch raised while it was planned."""

    def __init__(self, incoming: IncomingEvent, error: Exception) -> None:
        super().__init__(str(error))
        self.incoming = incoming
        self.error = error


_Loaded = TypeVar("_Loaded")


def _check_readable(
    incoming: IncomingEvent, regs: dict[str, StoredRegistration | None], unreadable: dict[str, Exception]
) -> None:
    if not unreadable:
        return
    needed: list[str] = []
    if isinstance(incoming, RegistrationCreated | RegistrationCancelled):
        needed.append(incoming.registration.id)
        known = regs.get(incoming.registration.id)
        if known is not None and known.event_id:
            needed.append(f"event {known.event_id}")
    if not isinstance(incoming, RegistrationCancelled):
        needed.append(f"event {incoming.event.id}")
    for key in needed:
        if key in unreadable:
            name = key if key.startswith("event ") else f"registration {key}"
            error = unreadable[key]
            raise ValueError(f"the stored {name} cannot be read: {type(error).__name__}: {error}"[:400])
