"""The .ics calendar attachment: built once per event version and method, then stamped per attendee.

METHOD: confirmations and change notices carry METHOD:PUBLISH with a SEQUENCE that grows with
every visible change of the event. Every mail about one registration uses the same UID, so a
calendar that already holds the entry moves it instead of adding a second one; METHOD:CANCEL
with that UID (STATUS:CANCELLED, a higher SEQUENCE) removes it.

ORGANIZER/ATTENDEE: RFC 5546 requires ORGANIZER for PUBLISH and CANCEL, so it is the event's
organiser. There is no ATTENDEE: the attendee's own address is private data the entry does not
need, and without ATTENDEE a PUBLISH makes Outlook offer no RSVP (nobody would read the
replies). RFC 5546 asks a CANCEL to list the attendees being removed; this one relies on
clients matching the UID instead (not checked against real clients here).

Building with icalendar costs milliseconds, so the bytes are rendered once with a placeholder
UID, and `CalendarTemplate.for_registration` only splices in the attendee's UID (about 1 µs). The
UID is a hash of (event id, registration id): stable, and free of personal data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from icalendar import Calendar, Event, Timezone, TimezoneDaylight, TimezoneStandard, vCalAddress

from mailer.errors import ComposeError

__all__ = ["CalendarEvent", "CalendarTemplate", "build_calendar", "calendar_uid"]

PRODID = "-//mailer//mailer//EN"
# Calendar clients show the description in a small pane; the mail itself carries the full text.
DESCRIPTION_LIMIT = 600
# "UID:" plus the UID must fit one 75-octet line: a folded UID line would break the splice.
_UID_MAX = 75 - len("UID:")
_UID_HEX = 24
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_UNSAFE = re.compile(r"[\x00-\x20\x7f-\x9f]")  # where icalendar writes the value unescaped


@dataclass(frozen=True, slots=True)
class CalendarEvent:
    """What the calendar entry shows; times are aware, `timezone` is an IANA name."""

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


class CalendarTemplate:
    """One event version's .ics, rendered once; `for_registration` gives one attendee's copy."""

    __slots__ = ("_event_id", "_head", "_tail", "_uid_domain")

    def __init__(self, head: bytes, *, tail: bytes, event_id: str, uid_domain: str) -> None:
        self._head = head
        self._tail = tail
        self._event_id = event_id
        self._uid_domain = uid_domain

    def for_registration(self, registration_id: str) -> bytes:
        """The .ics bytes carrying this registration's UID."""
        uid = calendar_uid(self._event_id, registration_id, uid_domain=self._uid_domain)
        return self._head + uid.encode("ascii") + self._tail


def calendar_uid(event_id: str, registration_id: str, *, uid_domain: str) -> str:
    """The stable UID of one registration's calendar entry: `<24 hex>@<uid_domain>`."""
    # Length-prefixed, so ("ab", "c") and ("a", "bc") cannot meet.
    key = f"mailer-ics-uid:{len(event_id)}:{event_id}:{registration_id}".encode()
    return hashlib.sha256(key).hexdigest()[:_UID_HEX] + "@" + uid_domain


def build_calendar(
    event: CalendarEvent,
    *,
    sequence: int,
    method: Literal["PUBLISH", "CANCEL"],
    uid_domain: str,
    stamp: datetime,
) -> CalendarTemplate:
    """Render the event once for `method`; raise ComposeError for values that cannot go in."""
    _check(event, sequence=sequence, method=method, uid_domain=uid_domain, stamp=stamp)
    try:
        zone = ZoneInfo(event.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ComposeError(f"calendar: unknown time zone {event.timezone!r}") from exc
    starts_at = event.starts_at.astimezone(zone).replace(microsecond=0)
    ends_at = event.ends_at.astimezone(zone).replace(microsecond=0)

    calendar = Calendar()
    calendar.add("prodid", PRODID)
    calendar.add("version", "2.0")
    calendar.add("method", method)
    calendar.add_component(_vtimezone(event.timezone, starts_at.year))

    # Same length as a real UID, so icalendar lays the line out exactly as it will be sent.
    placeholder = "0" * _UID_HEX + "@" + uid_domain
    entry = Event()
    entry.add("uid", placeholder)
    entry.add("dtstamp", stamp.astimezone(UTC).replace(microsecond=0))
    entry.add("sequence", sequence)
    entry.add("dtstart", starts_at)
    entry.add("dtend", ends_at)
    entry.add("summary", event.title)
    if event.location:
        entry.add("location", event.location)
    if event.url:
        entry.add("url", event.url)
    description = _description(event)
    if description:
        entry.add("description", description)
    organizer = vCalAddress("mailto:" + event.organizer_email)
    if event.organizer_name:
        organizer.params["CN"] = event.organizer_name
    entry.add("organizer", organizer)
    entry.add("status", "CONFIRMED" if method == "PUBLISH" else "CANCELLED")
    entry.add("transp", "OPAQUE")
    calendar.add_component(entry)

    data = calendar.to_ical()
    # A property line starting with "UID:" can only be the UID itself (folded lines start
    # with a space), so exactly one match means the splice cannot touch anything else.
    line = b"\r\nUID:" + placeholder.encode("ascii") + b"\r\n"
    if data.count(line) != 1:
        raise ComposeError("calendar: the UID line is not present exactly once, unfolded")
    head, _, tail = data.partition(line)
    return CalendarTemplate(
        head + b"\r\nUID:", tail=b"\r\n" + tail, event_id=event.event_id, uid_domain=uid_domain
    )


def _check(event: CalendarEvent, *, sequence: int, method: str, uid_domain: str, stamp: datetime) -> None:
    if method not in ("PUBLISH", "CANCEL"):
        raise ComposeError(f"calendar: method must be PUBLISH or CANCEL, not {method!r}")
    if sequence < 0:
        raise ComposeError("calendar: SEQUENCE must not be negative")
    if not _DOMAIN.fullmatch(uid_domain) or len(uid_domain) > _UID_MAX - _UID_HEX - 1:
        raise ComposeError(
            f"calendar: uid_domain must be an ASCII host name of at most {_UID_MAX - _UID_HEX - 1} chars"
        )
    for name, value in (("starts_at", event.starts_at), ("ends_at", event.ends_at), ("stamp", stamp)):
        if value.utcoffset() is None:
            raise ComposeError(f"calendar: {name} must be timezone-aware")
    if event.ends_at <= event.starts_at:
        raise ComposeError("calendar: ends_at must be after starts_at")
    for name, field in (("url", event.url or ""), ("organizer_email", event.organizer_email)):
        if _UNSAFE.search(field):
            raise ComposeError(f"calendar: {name} contains whitespace or control characters")


def _description(event: CalendarEvent) -> str:
    # Outlook ignores URL, so the join link also leads the description, where it is clickable.
    text = (event.description or "").strip()
    if len(text) > DESCRIPTION_LIMIT:
        cut = text.rfind(" ", 0, DESCRIPTION_LIMIT)
        text = text[: cut if cut > DESCRIPTION_LIMIT // 2 else DESCRIPTION_LIMIT].rstrip() + " …"
    return "\n\n".join(part for part in (event.url, text) if part)


# --- VTIMEZONE ----------------------------------------------------------------------------

# (kind, dtstart, rdates, offset_from, offset_to, tzname); dtstart/rdates are local wall times.
_Observance = tuple[str, datetime, tuple[datetime, ...], timedelta, timedelta, str]


def _vtimezone(tzid: str, year: int) -> Timezone:
    """A VTIMEZONE valid from the start of `year` - 1 to the end of `year` + 1.

    Not `Timezone.from_tzid`: icalendar 7 writes the DTSTART of a DAYLIGHT observance in the new
    offset (03:00 for Berlin), while RFC 5545 reads it in TZOFFSETFROM (02:00): an hour late.
    """
    timezone = Timezone()
    timezone.add("tzid", tzid)
    for kind, dtstart, rdates, offset_from, offset_to, tzname in _observances(tzid, year):
        observance = TimezoneDaylight() if kind == "DAYLIGHT" else TimezoneStandard()
        observance.add("dtstart", dtstart)
        if rdates:
            observance.add("rdate", list(rdates))
        observance.add("tzoffsetfrom", offset_from)
        observance.add("tzoffsetto", offset_to)
        observance.add("tzname", tzname)
        timezone.add_component(observance)
    return timezone


@lru_cache(maxsize=64)
def _observances(tzid: str, year: int) -> tuple[_Observance, ...]:
    zone = ZoneInfo(tzid)
    first = datetime(year - 1, 1, 1, tzinfo=UTC)
    last = datetime(year + 2, 1, 1, tzinfo=UTC)

    def state(instant: datetime) -> tuple[timedelta | None, str | None, bool]:
        local = instant.astimezone(zone)
        # Europe/Dublin has negative DST in winter: only a positive one counts as DAYLIGHT.
        return local.utcoffset(), local.tzname(), (local.dst() or timedelta(0)) > timedelta(0)

    # The observance in force when the range starts, then every change found day by day and
    # narrowed to the second by bisection.
    changes: list[tuple[datetime, timedelta, tuple[timedelta | None, str | None, bool]]] = []
    before = state(first)
    start_offset = before[0] or timedelta(0)
    changes.append((first, start_offset, before))
    day = first
    while day < last:
        after_day = day + timedelta(days=1)
        after = state(after_day)
        if after != before:
            low, high = day, after_day
            while high - low > timedelta(seconds=1):
                middle = low + (high - low) / 2
                if state(middle) == before:
                    low = middle
                else:
                    high = middle
            changes.append((high.replace(microsecond=0), before[0] or timedelta(0), after))
            before = after
        day = after_day

    grouped: dict[tuple[str, timedelta, timedelta, str], list[datetime]] = {}
    for instant, offset_from, (offset, name, dst) in changes:
        offset_to = offset or timedelta(0)
        kind = "DAYLIGHT" if dst else "STANDARD"
        # RFC 5545 §3.6.5: the onset is a local time read in TZOFFSETFROM.
        onset = (instant + offset_from).replace(tzinfo=None)
        key = (kind, offset_from, offset_to, name or _offset_name(offset_to))
        grouped.setdefault(key, []).append(onset)
    return tuple(
        (kind, onsets[0], tuple(onsets[1:]), offset_from, offset_to, name)
        for (kind, offset_from, offset_to, name), onsets in grouped.items()
    )


def _offset_name(offset: timedelta) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
