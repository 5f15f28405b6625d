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
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import icalendar
from icalendar import Calendar, Timezone, TimezoneDaylight, TimezoneStandard, vCalAddress

from mailer.errors import ComposeError
from mailer.events import AccessInfo, Event

__all__ = [
    "CalendarEvent",
    "CalendarTemplate",
    "WebLinks",
    "access_rows",
    "build_calendar",
    "calendar_description",
    "calendar_event",
    "calendar_uid",
    "web_links",
]

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
    # Lines shown with the join link ("Meeting-ID: 123 456 789"), under the same rule as it.
    access: tuple[str, ...] = ()
    # The event's own page: the URL property when there is no join link, and the last line
    # of the description (`page_line`, labelled in the attendee's language).
    page_url: str | None = None
    page_line: str | None = None


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
    entry = icalendar.Event()
    entry.add("uid", placeholder)
    entry.add("dtstamp", stamp.astimezone(UTC).replace(microsecond=0))
    entry.add("sequence", sequence)
    entry.add("dtstart", starts_at)
    entry.add("dtend", ends_at)
    entry.add("summary", event.title)
    if event.location:
        entry.add("location", event.location)
    if event.url or event.page_url:
        entry.add("url", event.url or event.page_url)
    description = calendar_description(event)
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
    fields = (("url", event.url), ("page_url", event.page_url), ("organizer_email", event.organizer_email))
    for name, field in ((name, value or "") for name, value in fields):
        if _UNSAFE.search(field):
            raise ComposeError(f"calendar: {name} contains whitespace or control characters")


def calendar_description(event: CalendarEvent) -> str:
    """The entry's description: join link and access details, the (shortened) text, the event
    page. The calendar file and the web links carry the same."""
    # Outlook ignores URL, so the join link also leads the description, where it is clickable.
    text = (event.description or "").strip()
    if len(text) > DESCRIPTION_LIMIT:
        cut = text.rfind(" ", 0, DESCRIPTION_LIMIT)
        text = text[: cut if cut > DESCRIPTION_LIMIT // 2 else DESCRIPTION_LIMIT].rstrip() + " …"
    access = "\n".join(event.access)
    return "\n\n".join(part for part in (event.url, access, text, event.page_line) if part)


# --- the entry of one event, in the attendee's language --------------------------------------

ACCESS_LABELS = {
    "de": {
        "platform": "Plattform",
        "meeting_id": "Meeting-ID",
        "passcode": "Kenncode",
        "dial_in": "Telefonische Einwahl",
    },
    "en": {"platform": "Platform", "meeting_id": "Meeting ID", "passcode": "Passcode", "dial_in": "Dial-in"},
}
PAGE_LABELS = {"de": "Mehr zur Veranstaltung", "en": "More about the event"}


def access_rows(access: AccessInfo | None, locale: str) -> tuple[tuple[str, str], ...]:
    """(label, value) of each access detail the event gives, in a fixed order."""
    if access is None:
        return ()
    labels = ACCESS_LABELS.get(locale, ACCESS_LABELS["en"])
    values = (
        ("platform", access.platform),
        ("meeting_id", access.meeting_id),
        ("passcode", access.passcode),
        ("dial_in", access.dial_in),
    )
    return tuple((labels[name], value) for name, value in values if value)


def calendar_event(event: Event, locale: str, *, with_link: bool) -> CalendarEvent:
    """What `event`'s calendar entry shows to an attendee in `locale`: the title and description
    in that language, the join link and access details only `with_link`."""
    page_label = PAGE_LABELS.get(locale, PAGE_LABELS["en"])
    return CalendarEvent(
        event_id=event.id,
        title=event.title_in(locale),
        starts_at=event.starts_at,
        ends_at=event.ends_at,
        timezone=event.timezone,
        location=event.location,
        url=event.join_url if with_link else None,
        description=event.description_in(locale),
        organizer_name=event.organizer.name,
        organizer_email=event.organizer.email,
        access=tuple(f"{k}: {v}" for k, v in access_rows(event.access_info, locale)) if with_link else (),
        page_url=event.url,
        page_line=f"{page_label}: {event.url}" if event.url else None,
    )


# --- web links: the same entry for calendars that cannot open an attachment -------------------

GOOGLE_CALENDAR = "https://calendar.google.com/calendar/render"
OUTLOOK_CALENDAR = "https://outlook.live.com/calendar/deeplink/compose"


@dataclass(frozen=True, slots=True)
class WebLinks:
    google: str
    outlook: str


def web_links(event: CalendarEvent) -> WebLinks:
    """ "Add to Google Calendar" and Outlook.com links prefilled with what the .ics holds.

    Times go in UTC with a Z, which both services read unambiguously; Google's `ctz` then
    shows the entry in the event's own zone.
    """
    start, end = (t.astimezone(UTC).replace(microsecond=0) for t in (event.starts_at, event.ends_at))
    details = calendar_description(event)
    google = {
        "action": "TEMPLATE",
        "text": event.title,
        "dates": f"{start:%Y%m%dT%H%M%SZ}/{end:%Y%m%dT%H%M%SZ}",
        "details": details,
        "location": event.location or "",
        "ctz": event.timezone,
    }
    outlook = {
        "path": "/calendar/action/compose",
        "rru": "addevent",
        "startdt": f"{start:%Y-%m-%dT%H:%M:%SZ}",
        "enddt": f"{end:%Y-%m-%dT%H:%M:%SZ}",
        "subject": event.title,
        "body": details,
        "location": event.location or "",
    }
    return WebLinks(google=_link(GOOGLE_CALENDAR, google), outlook=_link(OUTLOOK_CALENDAR, outlook))


def _link(base: str, query: dict[str, str]) -> str:
    # quote_via=quote: spaces as %20, which every client keeps; "+" is read as a plus by some.
    return base + "?" + urlencode({k: v for k, v in query.items() if v}, quote_via=quote, safe="/")


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
