"""Dates and times as templates show them: per locale, in the event's zone, with MEZ/MESZ."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from babel.dates import (
    format_date,
    format_interval,
    format_time,
    format_timedelta,
    get_timezone_name,
)

from mailer.durations import Offset
from mailer.events import Event


def _tidy(text: str) -> str:
    # CLDR puts narrow and thin no-break spaces around "PM" and "–"; some mail clients show
    # them as boxes, and "6:00–8:30 PM" reads the same.
    return text.replace("\u2009–\u2009", "–").replace("\u202f", " ").replace("\u2009", " ")


# A space between a number and a word ("10. Dezember", "Dezember 2026", "December 10",
# "20:30 Uhr", "8:30 PM", "Uhr MEZ"): a line break there splits one date or time in two.
_GLUED = re.compile(
    r"(?<=[\d.]) (?=\w)|(?<=[^\W\d_]) (?=\d)|(?<=\d) (?=[^\W\d_])|(?:(?<=Uhr)|(?<=[AP]M)) (?=[A-Z])"
)


def nobreak_spaces(text: str) -> str:
    """`text` with no-break spaces (U+00A0, which every mail client knows) inside dates and
    times, so a narrow screen wraps only between them."""
    return _GLUED.sub("\u00a0", text)


# German has its own abbreviations for the European zones (DIN 5008; Duden).
_GERMAN_ZONES = {"CET": "MEZ", "CEST": "MESZ", "WET": "WEZ", "WEST": "WESZ", "EET": "OEZ", "EEST": "OESZ"}


def zone_abbreviation(local: datetime, locale: str) -> str:
    """ "MEZ"/"MESZ" (de), "CET"/"CEST" (en): the zone in force at `local`; tzdata's letters,
    or "UTC+5:30" where it has only a number."""
    name = local.tzname() or ""
    if not name or name[0] in "+-" or name[0].isdigit():
        offset = local.utcoffset() or timedelta(0)
        minutes = int(offset.total_seconds()) // 60
        sign, minutes = ("-" if minutes < 0 else "+"), abs(minutes)
        name = f"UTC{sign}{minutes // 60}" + (f":{minutes % 60:02d}" if minutes % 60 else "")
    return _GERMAN_ZONES.get(name, name) if locale == "de" else name


def _hour(local: datetime, locale: str) -> str:
    """ "18:00 Uhr" / "6:00 PM"."""
    return _tidy(format_time(local, "short", locale=locale) + (" Uhr" if locale == "de" else ""))


@lru_cache(maxsize=4096)
def format_when(starts_at: datetime, ends_at: datetime, timezone: str, locale: str) -> dict[str, Any]:
    """Every date string templates show, in the event's time zone; cached per event and locale."""
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(timezone)
    start, end = starts_at.astimezone(zone), ends_at.astimezone(zone)
    date = format_date(start, "full", locale=locale)
    start_zone, end_zone = zone_abbreviation(start, locale), zone_abbreviation(end, locale)
    if start.date() == end.date():
        times = format_interval(start.time(), end.time(), "Hm" if locale == "de" else "hm", locale=locale)
        when = _tidy(f"{date}, {times}")
    else:
        when = f"{format_moment(start, timezone, locale)} – {format_moment(end, timezone, locale)}"
    if start.utcoffset() == end.utcoffset():
        when_zoned = f"{when} {start_zone}"
    elif start.date() == end.date():
        when_zoned = f"{_tidy(date)}, {_hour(start, locale)} {start_zone} – {_hour(end, locale)} {end_zone}"
    else:
        when_zoned = (
            f"{format_moment(start, timezone, locale)} {start_zone} – "
            f"{format_moment(end, timezone, locale)} {end_zone}"
        )
    values: dict[str, Any] = {
        "when": when,
        "when_zoned": when_zoned,
        "date": _tidy(date),
        "start_time": _tidy(format_time(start, "short", locale=locale)),
        "end_time": _tidy(format_time(end, "short", locale=locale)),
        "zone": start_zone,
        "end_zone": end_zone,
        "zone_changes": start.utcoffset() != end.utcoffset(),
        "timezone_name": get_timezone_name(start, "long", locale=locale),
    }
    return values


def format_moment(moment: datetime, timezone: str, locale: str) -> str:
    from zoneinfo import ZoneInfo

    local = moment.astimezone(ZoneInfo(timezone))
    return f"{_tidy(format_date(local, 'full', locale=locale))}, {_hour(local, locale)}"


def reminder_lead(offset: Offset, locale: str) -> str:
    """ "morgen" / "in einer Stunde" / "in 3 Tagen": fits "Die Veranstaltung beginnt …"."""
    if offset.days == 1 and offset.seconds == 0:
        return "morgen" if locale == "de" else "tomorrow"
    if offset.days == 0 and offset.seconds == 3600:
        return "in einer Stunde" if locale == "de" else "in one hour"
    return format_timedelta(
        timedelta(seconds=offset.total_seconds), add_direction=True, threshold=2, locale=locale
    )


def reminder_when(event: Event, offset: Offset, locale: str) -> str:
    """ "in einer Stunde, 18:00 Uhr" / "morgen, 18:00 Uhr" / "am Freitag, 18. Dezember, 18:00 Uhr"
    (en: "in one hour, 6:00 PM", "tomorrow, 6:00 PM", "on Friday, December 18, 6:00 PM"): the
    start as seen when the reminder is sent; completes „Erinnerung: „…“ …“."""
    start = event.starts_at.astimezone(event.zone)
    if offset.total_seconds < 86400:  # sent the same day (or late the evening before)
        return f"{reminder_lead(offset, locale)}, {_hour(start, locale)}"
    sent = offset.before(event.starts_at, event.timezone).astimezone(event.zone)
    days = (start.date() - sent.date()).days
    if days == 1:
        day = "morgen" if locale == "de" else "tomorrow"
    elif locale == "de":
        day = f"am {format_date(start, 'EEEE, d. MMMM', locale=locale)}"
    else:
        day = f"on {format_date(start, 'EEEE, MMMM d', locale=locale)}"
    return f"{day}, {_hour(start, locale)}"
