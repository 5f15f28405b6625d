"""The calendar attachment: an RFC 5545 file built once per event version, specialised per attendee.

METHOD:PUBLISH (not REQUEST) for confirmations and change notices: the entry goes into the
attendee's calendar as information, no client offers to "accept" or sends RSVPs; a change
reuses the UID with a higher SEQUENCE so the entry moves instead of doubling. METHOD:CANCEL
with STATUS:CANCELLED and the same UID removes it. ORGANIZER is set (RFC 5546 requires it for
both methods) to the organiser's public contact; there are no ATTENDEE lines: the attendee's
own address is private data the entry does not need, and without ATTENDEE no client replies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date, datetime
from typing import Literal
from zoneinfo import ZoneInfo

import icalendar

_PLACEHOLDER = "00000000000000000000000000placeholder"


@dataclass(frozen=True, slots=True)
class CalendarEvent:
    event_id: str
    title: str
    starts_at: datetime
    ends_at: datetime
    timezone: str
    location: str | None
    url: str | None
    description: str | None
    organizer_name: str
    organizer_email: str


def calendar_uid(event_id: str, registration_id: str, *, uid_domain: str) -> str:
    """Stable per event and registration, with no personal data in it."""
    digest = hashlib.blake2b(f"{event_id}\n{registration_id}".encode(), digest_size=12).hexdigest()
    return f"{digest}@{uid_domain}"


class CalendarTemplate:
    """The .ics bytes of one event version and method, with a slot for the attendee's UID."""

    def __init__(self, data: bytes, *, event_id: str, uid_domain: str) -> None:
        self._data = data
        self._event_id = event_id
        self._uid_domain = uid_domain
        if data.count(_PLACEHOLDER.encode()) != 1:
            raise ValueError("calendar template must contain the UID placeholder exactly once")

    def for_registration(self, registration_id: str) -> bytes:
        uid = calendar_uid(self._event_id, registration_id, uid_domain=self._uid_domain)
        return self._data.replace(f"{_PLACEHOLDER}@{self._uid_domain}".encode(), uid.encode())


def build_calendar(
    event: CalendarEvent,
    *,
    sequence: int,
    method: Literal["PUBLISH", "CANCEL"],
    uid_domain: str,
    stamp: datetime,
) -> CalendarTemplate:
    """Build the calendar once (about 2 ms with icalendar); `for_registration` is then a replace."""
    zone = ZoneInfo(event.timezone)
    start, end = event.starts_at.astimezone(zone), event.ends_at.astimezone(zone)
    cal = icalendar.Calendar()
    cal.add("prodid", "-//mailer//mailer//EN")
    cal.add("version", "2.0")
    cal.add("method", method)
    # Only the transitions around the event: every one since 1970 would be ~2.9 KB.
    cal.add_component(
        icalendar.Timezone.from_tzinfo(
            zone,
            tzid=event.timezone,
            first_date=date(start.year - 1, 1, 1),
            last_date=date(end.year + 1, 12, 31),
        )
    )
    vevent = icalendar.Event()
    vevent.add("uid", f"{_PLACEHOLDER}@{uid_domain}")
    vevent.add("dtstamp", stamp.astimezone(ZoneInfo("UTC")))
    vevent.add("sequence", sequence)
    vevent.add("dtstart", start)
    vevent.add("dtend", end)
    vevent.add("summary", event.title)
    if event.location:
        vevent.add("location", event.location)
    if event.url:
        vevent.add("url", event.url)
    description = "\n\n".join(p for p in (event.url, event.description) if p)
    if description:
        vevent.add("description", description)
    organizer = icalendar.vCalAddress(f"mailto:{event.organizer_email}")
    organizer.params["cn"] = icalendar.vText(event.organizer_name)
    vevent.add("organizer", organizer)
    vevent.add("status", "CANCELLED" if method == "CANCEL" else "CONFIRMED")
    vevent.add("transp", "OPAQUE")
    cal.add_component(vevent)
    return CalendarTemplate(cal.to_ical(), event_id=event.event_id, uid_domain=uid_domain)
