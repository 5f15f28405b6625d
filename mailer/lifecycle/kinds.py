"""The message kinds, one row each: every rule that differs between kinds is read from here.

Adding a kind is a row in KINDS, its name in constants.MessageKind, a template folder and its
tests. What a row says:

- `calendar`: the iCalendar METHOD of its attachment (PUBLISH adds or moves the attendee's
  entry, CANCEL removes it), or None for no attachment; `sequence_bump` lifts its SEQUENCE
  over the event's version (a registration's own cancellation must outrank every PUBLISH it
  received).
- `join_link`: when its body may show the join link.
- `registration` / `event`: the state the registration and the event must be in at send time,
  `before_start`: whether it is pointless once the event has started, `check`: what else
  the send-time re-check asks of this kind.
- `deadline`: until when a retry or a hold may still send it.
- `fanned_out`: planned once per event in the schedule and sent to its registrations in
  slices (reminders, notices to all), rather than per registration.
- `preview_*`: how `mailer render` builds a stand-in for one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from mailer.clock import ms
from mailer.constants import MESSAGE_KINDS, MessageKind
from mailer.durations import Offset
from mailer.events import Event
from mailer.lifecycle.changes import notified_changes
from mailer.state.messages import MessageRef
from mailer.state.store import StoredEvent, StoredRegistration

CalendarMethod = Literal["PUBLISH", "CANCEL"]
# always: whenever the event has one; unless_withheld: not if join_url_in_confirmation is false.
JoinLinkRule = Literal["always", "unless_withheld", "never"]
Check = Callable[[MessageRef, StoredRegistration, StoredEvent, datetime], str | None]


def reminder_disc(offset: Offset, due: datetime) -> str:
    """Part of a reminder's message id: a moved event gets new reminders, an unchanged one not."""
    return f"{offset.iso}/{due.astimezone(UTC):%Y%m%dT%H%M%SZ}"


def reminder_offset_of(ref: MessageRef) -> Offset:
    """The offset a reminder's id names ("P1D" of "reg-1/reminder/P1D/20261209T170000Z")."""
    return Offset.parse(ref.disc.split("/", 1)[0])


@dataclass(frozen=True, slots=True)
class ReminderTimes:
    """When an event's reminders fall due (earliest first), for what a message may promise."""

    due: tuple[datetime, ...]

    @classmethod
    def of(cls, event: Event, default_offsets: tuple[Offset, ...]) -> ReminderTimes:
        offsets = event.offsets(default_offsets)
        return cls(tuple(sorted(offset.before(event.starts_at, event.timezone) for offset in offsets)))

    def released(self, now: datetime) -> bool:
        """The first reminder has fallen due: a withheld join link is out."""
        return bool(self.due) and self.due[0] <= now

    def follows(self, now: datetime) -> bool:
        """A reminder is still to come for a registration made now."""
        return bool(self.due) and self.due[-1] > now


def _reminder_still_due(
    ref: MessageRef, reg: StoredRegistration, stored: StoredEvent, now: datetime
) -> str | None:
    event = stored.event
    offset_text, _, due_text = ref.disc.partition("/")
    offset = Offset.parse(offset_text)
    due = datetime.strptime(due_text, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if offset not in event.offsets(()) and event.reminder_offsets is not None:
        return "the event no longer has this reminder"
    # The id carries the due time to the second.
    if int(offset.before(event.starts_at, event.timezone).timestamp()) != int(due.timestamp()):
        return "event time changed; a reminder for the new time is planned separately"
    if reg.created_ms >= ms(due):
        return "registered after the reminder time"
    return None


def _change_is_current(
    ref: MessageRef, reg: StoredRegistration, stored: StoredEvent, now: datetime
) -> str | None:
    if ref.disc != f"v{stored.version}":
        return f"superseded by a newer change (now v{stored.version})"
    locale = reg.attendee.locale if reg.attendee else None
    if stored.previous is not None and not notified_changes(stored.previous, stored.event, locale):
        # A new English title is no news to a German reader: a notice would list nothing.
        return "nothing changed in the attendee's language"
    return None


def _first_reminder_disc(stored: StoredEvent, default_offsets: tuple[Offset, ...]) -> str:
    event = stored.event
    offset = (event.offsets(default_offsets) or (Offset.parse("P1D"),))[0]
    return reminder_disc(offset, offset.before(event.starts_at, event.timezone))


@dataclass(frozen=True, slots=True)
class Kind:
    name: MessageKind
    calendar: CalendarMethod | None
    join_link: JoinLinkRule
    registration: Literal["active", "cancelled"]
    event: Literal["active", "cancelled"] | None  # None: whatever its state
    before_start: bool
    deadline: Literal["event_start", "ttl"]
    fanned_out: bool
    sequence_bump: int = 0
    check: Check | None = None
    shows_changes: bool = False  # gets the event as it was before (change notices)
    preview_disc: Callable[[StoredEvent, tuple[Offset, ...]], str] | None = None

    @property
    def template_folder(self) -> str:
        return self.name

    def shows_join_link(self, event: Event, *, released: bool = False) -> bool:
        """May a message of this kind show `event`'s join link (and access details)?

        `released`: the first reminder's time has passed (`ReminderTimes.released`). A link
        withheld from confirmations goes out with that reminder; a confirmation or change
        notice sent later shows it too, or a late registrant would never get it."""
        if self.join_link == "unless_withheld":
            return event.join_url_in_confirmation or released
        return self.join_link == "always"

    def why_not_send(
        self, ref: MessageRef, reg: StoredRegistration, stored: StoredEvent, now: datetime
    ) -> str | None:
        """This kind's part of the send-time re-check: None to send, else the reason."""
        if reg.status != self.registration:
            return (
                "registration is active again"
                if self.registration == "cancelled"
                else "registration was cancelled"
            )
        if self.event is not None and stored.status != self.event:
            return "event is not cancelled" if self.event == "cancelled" else "event was cancelled"
        if self.before_start and now >= stored.event.starts_at:
            return "event has already started"
        return self.check(ref, reg, stored, now) if self.check else None


KINDS: dict[MessageKind, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "confirmation",
            calendar="PUBLISH",
            join_link="unless_withheld",
            registration="active",
            event="active",
            before_start=True,
            deadline="ttl",
            fanned_out=False,
        ),
        Kind(
            "reminder",
            calendar=None,
            join_link="always",
            registration="active",
            event="active",
            before_start=True,
            deadline="event_start",
            fanned_out=True,
            check=_reminder_still_due,
            preview_disc=_first_reminder_disc,
        ),
        Kind(
            "registration_cancelled",
            calendar="CANCEL",
            join_link="never",
            registration="cancelled",
            event=None,
            before_start=False,
            deadline="ttl",
            fanned_out=False,
            sequence_bump=1,
        ),
        Kind(
            "event_changed",
            calendar="PUBLISH",
            join_link="unless_withheld",  # a change must not hand out a link the organiser holds back
            registration="active",
            event="active",
            before_start=True,
            deadline="ttl",
            fanned_out=True,
            check=_change_is_current,
            shows_changes=True,
            preview_disc=lambda stored, _offsets: f"v{stored.version}",
        ),
        Kind(
            "event_cancelled",
            calendar="CANCEL",
            join_link="never",
            registration="active",
            event="cancelled",
            before_start=False,
            deadline="ttl",
            fanned_out=True,
        ),
    )
}
assert tuple(KINDS) == MESSAGE_KINDS, "every kind in constants.MessageKind has a row, in order"

FANNED_OUT: frozenset[str] = frozenset(k.name for k in KINDS.values() if k.fanned_out)


def kind_named(name: str) -> Kind:
    """The row of a kind given by name (from a template folder, a CLI argument); KeyError if none."""
    for known, kind in KINDS.items():  # five rows: a scan, and no cast from str to the Literal
        if known == name:
            return kind
    raise KeyError(name)
