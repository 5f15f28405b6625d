"""One message's bytes: rendered for its kind and locale, composed, with its calendar file."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr
from typing import Any

from mailer.content.compose import Address, Attachment, MailParts, compose
from mailer.content.ics import CalendarTemplate, build_calendar, calendar_event
from mailer.content.render import (
    CALENDAR_FILENAMES,
    Recipient,
    Renderer,
    SharedRenderer,
    build_context,
    event_view,
    operator_view,
    registration_open,
)
from mailer.errors import MailerError
from mailer.lifecycle.kinds import KINDS, CalendarMethod, Kind, ReminderTimes, reminder_offset_of
from mailer.settings import Settings
from mailer.state.messages import MessageRef
from mailer.state.store import StoredEvent, StoredRegistration


@dataclass(frozen=True, slots=True)
class Built:
    data: bytes
    subject: str
    text: str
    html: str


class MessageBuilder:
    """Renders and composes one message; caches per-event work (dates, calendar) across messages."""

    def __init__(self, *, settings: Settings, renderer: Renderer) -> None:
        self.shared = SharedRenderer(renderer)
        name, address = parseaddr(settings.sender)
        self.sender = Address(name=name, email=address)
        self.domain = settings.sender_domain
        self.operator = operator_view(settings.footer_address, settings.privacy_url, settings.imprint_url)
        # Keyed by the event's content fingerprint, never by id and version alone.
        self._calendars: dict[tuple[str, int, str, bool, str], CalendarTemplate] = {}
        self._views: dict[tuple[str, str], Any] = {}
        self._reminders: dict[str, ReminderTimes] = {}
        self._default_offsets = settings.reminder_offsets

    def build(self, ref: MessageRef, reg: StoredRegistration, stored: StoredEvent, now: datetime) -> Built:
        attendee, event = reg.attendee, stored.event
        if attendee is None:
            raise MailerError(f"registration {reg.id} has no attendee address")
        locale = attendee.locale
        view_key = (stored.fingerprint, locale)
        view = self._views.get(view_key)
        if view is None:
            if len(self._views) > 4096:
                self._views.clear()
            view = self._views[view_key] = event_view(event, locale)
        kind = KINDS[ref.kind]
        offset = reminder_offset_of(ref) if ref.kind == "reminder" else None
        has_calendar = kind.calendar is not None
        reminders = self._reminder_times(stored)
        released, follows = reminders.released(now), reminders.follows(now)

        def context(person: Any) -> dict[str, Any]:
            return build_context(
                kind=ref.kind,
                locale=locale,
                attendee=person,
                event=event,
                event_view_cache=view,
                previous=stored.previous if kind.shows_changes else None,
                offset=offset,
                has_calendar=has_calendar,
                now=now,
                operator=self.operator,
                reminders=reminders,
            )

        # Everything but the attendee is the same for every message with this key.
        shared_key = (
            stored.fingerprint, ref.kind, ref.disc, locale, registration_open(event, now), released, follows
        )  # fmt: skip
        recipient = Recipient(attendee.name, attendee.email, reg.reference, reg.manage_url)
        rendered = self.shared.render(shared_key, ref.kind, locale, recipient, context)
        attachment = self._attachment(reg, stored, kind, locale, now, released=released)
        headers: tuple[tuple[str, str], ...] = (("X-Mailer-Kind", ref.kind),)
        if ref.kind != "confirmation":
            # One registration's mails form one conversation in the attendee's mail client.
            first = f"<{MessageRef(reg.id, 'confirmation').header_id(self.domain)}>"
            headers += (("In-Reply-To", first), ("References", first))
        data = compose(
            MailParts(
                message_id=ref.header_id(self.domain),
                # MAILER_FROM without a name: the attendee sees who invited them, not a program.
                sender=self.sender if self.sender.name else Address(event.organizer.name, self.sender.email),
                recipient=Address(name=attendee.name, email=attendee.email),
                reply_to=Address(name=event.organizer.name, email=event.organizer.email),
                subject=rendered.subject,
                text=rendered.text,
                html=rendered.html,
                attachment=attachment,
                date=now,
                language=locale,
                extra_headers=headers,
            )
        )
        return Built(data=data, subject=rendered.subject, text=rendered.text, html=rendered.html)

    def _reminder_times(self, stored: StoredEvent) -> ReminderTimes:
        found = self._reminders.get(stored.fingerprint)
        if found is None:
            if len(self._reminders) > 4096:
                self._reminders.clear()
            found = ReminderTimes.of(stored.event, self._default_offsets)
            self._reminders[stored.fingerprint] = found
        return found

    def _attachment(
        self,
        reg: StoredRegistration,
        stored: StoredEvent,
        kind: Kind,
        locale: str,
        now: datetime,
        *,
        released: bool,
    ) -> Attachment | None:
        """The calendar file of this kind, if it has one, for this registration."""
        method = kind.calendar
        if method is None:
            return None
        sequence = stored.version + kind.sequence_bump
        # The calendar file obeys the kind's link rule too; a CANCEL file never has one.
        with_link = method == "PUBLISH" and kind.shows_join_link(stored.event, released=released)
        calendar = self._calendar(stored, sequence, method, now, with_link=with_link, locale=locale)
        return Attachment(
            filename=CALENDAR_FILENAMES.get(locale, "event.ics"),
            content_type=f'text/calendar; method={method}; charset="utf-8"',
            data=calendar.for_registration(reg.id),
        )

    def _calendar(
        self,
        stored: StoredEvent,
        sequence: int,
        method: CalendarMethod,
        now: datetime,
        *,
        with_link: bool,
        locale: str,
    ) -> CalendarTemplate:
        # Per locale: the entry carries the title and description in the attendee's language.
        key = (stored.fingerprint, sequence, method, with_link, locale)
        found = self._calendars.get(key)
        if found is None:
            if len(self._calendars) > 1024:
                self._calendars.clear()
            found = self._calendars[key] = build_calendar(
                calendar_event(stored.event, locale, with_link=with_link),
                sequence=sequence,
                method=method,
                uid_domain=self.domain,
                stamp=now,
            )
        return found
