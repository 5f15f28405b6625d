"""The .ics attachment: right local times and zone, one UID per registration, small VTIMEZONE."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from icalendar import Calendar

from mailer.content.ics import CalendarEvent, build_calendar, calendar_uid
from mailer.errors import ComposeError

BERLIN = ZoneInfo("Europe/Berlin")
DOMAIN = "mailer.example.org"


def event_on(day: date, *, hour: int = 18, **changes: Any) -> CalendarEvent:
    """The city's dialog evening: `day` at `hour`:00 Europe/Berlin, two and a half hours long."""
    starts_at = datetime(day.year, day.month, day.day, hour, 0, tzinfo=BERLIN)
    fields: dict[str, Any] = {
        "event_id": "weltoffen",
        "title": "Digitaler Dialog zu Weltoffenheit",
        "starts_at": starts_at,
        "ends_at": starts_at + timedelta(hours=2, minutes=30),
        "timezone": "Europe/Berlin",
        "location": "Online",
        "url": "https://meet.example.org/weltoffen",
        "description": "Alle Interessierten sind herzlich eingeladen, online mitzudiskutieren.",
        "organizer_name": "Stadt Kaiserslautern",
        "organizer_email": "integration@kaiserslautern.example",
    }
    fields.update(changes)
    return CalendarEvent(**fields)


def in_15_days() -> date:
    return datetime.now(BERLIN).date() + timedelta(days=15)


def build(event: CalendarEvent, **changes: Any) -> bytes:
    options: dict[str, Any] = {
        "sequence": 0,
        "method": "PUBLISH",
        "uid_domain": DOMAIN,
        "stamp": datetime.now(UTC),
    }
    options.update(changes)
    return build_calendar(event, **options).for_registration("reg-1001")


def vevent(data: bytes) -> Any:
    (entry,) = Calendar.from_ical(data).walk("VEVENT")
    return entry


def test_times_are_local_berlin_times_with_tzid() -> None:
    """18:00-20:30 Europe/Berlin in 15 days reads back as exactly that, with TZID=Europe/Berlin."""
    day = in_15_days()
    data = build(event_on(day))
    entry = vevent(data)
    start, end = entry.decoded("DTSTART"), entry.decoded("DTEND")
    expected_start = datetime(day.year, day.month, day.day, 18, 0, tzinfo=BERLIN)
    assert start == expected_start
    assert end == expected_start + timedelta(hours=2, minutes=30)
    assert (start.hour, start.minute, end.hour, end.minute) == (18, 0, 20, 30)
    assert start.utcoffset() == expected_start.utcoffset()
    assert entry["DTSTART"].params["TZID"] == entry["DTEND"].params["TZID"] == "Europe/Berlin"
    assert f"DTSTART;TZID=Europe/Berlin:{day:%Y%m%d}T180000\r\n".encode() in data


def test_a_time_given_in_another_zone_is_written_in_the_event_zone() -> None:
    """starts_at in UTC is converted: the entry still says 18:00 Europe/Berlin."""
    day = in_15_days()
    local = datetime(day.year, day.month, day.day, 18, 0, tzinfo=BERLIN)
    event = event_on(
        day, starts_at=local.astimezone(UTC), ends_at=(local + timedelta(hours=1)).astimezone(UTC)
    )
    entry = vevent(build(event))
    assert entry["DTSTART"].params["TZID"] == "Europe/Berlin"
    assert entry.decoded("DTSTART").replace(tzinfo=None) == local.replace(tzinfo=None)


def test_uid_is_the_registrations_calendar_uid() -> None:
    """UID equals calendar_uid(event, registration): stable, 24 hex digits, no personal data."""
    entry = vevent(build(event_on(in_15_days())))
    uid = calendar_uid("weltoffen", "reg-1001", uid_domain=DOMAIN)
    assert str(entry["UID"]) == uid
    assert uid == calendar_uid("weltoffen", "reg-1001", uid_domain=DOMAIN)
    assert re.fullmatch(r"[0-9a-f]{24}@mailer\.example\.org", uid)
    assert uid != calendar_uid("weltoffen", "reg-1002", uid_domain=DOMAIN)
    assert uid != calendar_uid("weltoffen2", "reg-1001", uid_domain=DOMAIN)
    assert calendar_uid("ab", "c", uid_domain=DOMAIN) != calendar_uid("a", "bc", uid_domain=DOMAIN)


def test_two_registrations_differ_only_in_the_uid() -> None:
    """One template serves every attendee: the bytes differ in the UID line and nowhere else."""
    template = build_calendar(
        event_on(in_15_days()), sequence=3, method="PUBLISH", uid_domain=DOMAIN, stamp=datetime.now(UTC)
    )
    first, second = template.for_registration("reg-1001"), template.for_registration("reg-1002")
    first_uid = calendar_uid("weltoffen", "reg-1001", uid_domain=DOMAIN).encode()
    second_uid = calendar_uid("weltoffen", "reg-1002", uid_domain=DOMAIN).encode()
    assert first != second
    assert first.count(first_uid) == 1
    assert first.replace(first_uid, second_uid) == second
    assert str(vevent(second)["UID"]) == second_uid.decode()


def test_sequence_is_written() -> None:
    """SEQUENCE carries the event version, so a changed event moves the entry."""
    assert vevent(build(event_on(in_15_days()), sequence=7)).decoded("SEQUENCE") == 7


def test_publish_confirms_and_cancel_cancels_the_same_uid() -> None:
    """PUBLISH → STATUS:CONFIRMED; CANCEL → STATUS:CANCELLED, with the same UID."""
    event = event_on(in_15_days())
    published, cancelled = build(event, method="PUBLISH"), build(event, method="CANCEL", sequence=1)
    assert Calendar.from_ical(published)["METHOD"] == "PUBLISH"
    assert Calendar.from_ical(cancelled)["METHOD"] == "CANCEL"
    assert vevent(published)["STATUS"] == "CONFIRMED"
    assert vevent(cancelled)["STATUS"] == "CANCELLED"
    assert vevent(published)["UID"] == vevent(cancelled)["UID"]
    for data in (published, cancelled):
        assert vevent(data)["TRANSP"] == "OPAQUE"
        assert Calendar.from_ical(data)["PRODID"] == "-//mailer//mailer//EN"
        assert Calendar.from_ical(data)["VERSION"] == "2.0"


def test_organizer_is_set_and_there_is_no_attendee() -> None:
    """ORGANIZER;CN=...:mailto:... as RFC 5546 requires; no ATTENDEE (private, and no RSVP)."""
    data = build(event_on(in_15_days(), organizer_name="Stadt Kaiserslautern, Integration; Büro"))
    organizer = vevent(data)["ORGANIZER"]
    assert str(organizer) == "mailto:integration@kaiserslautern.example"
    assert organizer.params["CN"] == "Stadt Kaiserslautern, Integration; Büro"
    assert b"ATTENDEE" not in data


def test_an_organizer_name_cannot_inject_lines() -> None:
    """CR/LF and quotes in the organiser's name stay inside the CN parameter (RFC 6868 escapes)."""
    name = 'Stadt\r\nATTENDEE:mailto:x@evil.example\r\nX-Y: "q"'
    data = build(event_on(in_15_days(), organizer_name=name))
    assert b"\r\nATTENDEE" not in data
    assert b"\r\nX-Y" not in data
    assert vevent(data)["ORGANIZER"].params["CN"] == name.replace("\r\n", "\n")


def test_vtimezone_is_present_and_small() -> None:
    """One VTIMEZONE for Europe/Berlin covering only the years around the event: under 1.5 KB."""
    data = build(event_on(in_15_days()))
    (timezone,) = Calendar.from_ical(data).walk("VTIMEZONE")
    assert timezone["TZID"] == "Europe/Berlin"
    block = data[
        data.index(b"BEGIN:VTIMEZONE") : data.index(b"END:VTIMEZONE\r\n") + len(b"END:VTIMEZONE\r\n")
    ]
    assert len(block) < 1500
    assert len(data) < 2500


@pytest.mark.parametrize(
    "zone", ["Europe/Berlin", "America/New_York", "Australia/Sydney", "Europe/Dublin", "Asia/Kolkata"]
)
def test_vtimezone_onsets_are_the_real_transitions(zone: str) -> None:
    """Each observance's onset, read in its TZOFFSETFROM as RFC 5545 says, is a real change to TZOFFSETTO."""
    tz = ZoneInfo(zone)
    day = in_15_days()
    start = datetime(day.year, day.month, day.day, 18, 0, tzinfo=tz)
    data = build(event_on(day, timezone=zone, starts_at=start, ends_at=start + timedelta(hours=1)))
    (timezone,) = Calendar.from_ical(data).walk("VTIMEZONE")
    observances = timezone.walk("STANDARD") + timezone.walk("DAYLIGHT")
    assert observances
    transitions = 0
    for observance in observances:
        offset_from = observance.decoded("TZOFFSETFROM")
        offset_to = observance.decoded("TZOFFSETTO")
        for onset in [observance.decoded("DTSTART"), *rdates(observance)]:
            instant = onset.replace(tzinfo=UTC) - offset_from
            assert instant.astimezone(tz).utcoffset() == offset_to
            if offset_from != offset_to:
                transitions += 1
                assert (instant - timedelta(seconds=1)).astimezone(tz).utcoffset() == offset_from
    if zone != "Asia/Kolkata":
        assert transitions >= 4  # two switches a year over at least two years


def rdates(observance: Any) -> list[datetime]:
    value = observance.get("RDATE")
    if value is None:
        return []
    return [item.dt for entry in (value if isinstance(value, list) else [value]) for item in entry.dts]


def test_dst_day_event_has_the_summer_offset() -> None:
    """An event at 10:00 on the last Sunday of March (the switch to CEST) reads back at UTC+2."""
    year = datetime.now(BERLIN).year + 1
    last_sunday = max(date(year, 3, d) for d in range(25, 32) if date(year, 3, d).weekday() == 6)
    entry = vevent(build(event_on(last_sunday, hour=10)))
    start = entry.decoded("DTSTART")
    assert start.utcoffset() == timedelta(hours=2)
    assert start.astimezone(UTC) == datetime(year, 3, last_sunday.day, 8, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "title",
    [
        "Digitaler Dialog zu Weltoffenheit – „Begegnung“ für Bürgerinnen und Bürger 😀",
        "Dialog, Austausch; Begegnung: Teil 1\\2",
        "Zeile eins\nZeile zwei",
        "000000000000000000000000@mailer.example.org",  # the placeholder UID, as a title
    ],
)
def test_titles_round_trip(title: str) -> None:
    """Non-ASCII text, commas, semicolons, backslashes and newlines come back unchanged."""
    data = build(event_on(in_15_days(), title=title, location=title))
    entry = vevent(data)
    assert str(entry["SUMMARY"]) == title
    assert str(entry["LOCATION"]) == title
    assert all(len(line) <= 75 for line in data.split(b"\r\n"))


def test_description_leads_with_the_join_link_and_stays_short() -> None:
    """The join link comes first (Outlook ignores URL); a long description is cut at a word."""
    data = build(event_on(in_15_days(), description="Wort " * 1000))
    entry = vevent(data)
    description = str(entry["DESCRIPTION"])
    assert description.startswith("https://meet.example.org/weltoffen\n\nWort Wort")
    assert description.endswith("Wort …")
    assert len(description) < 700
    assert str(entry["URL"]) == "https://meet.example.org/weltoffen"
    bare = vevent(build(event_on(in_15_days(), url=None, location=None, description=None)))
    assert "URL" not in bare
    assert "LOCATION" not in bare
    assert "DESCRIPTION" not in bare


def test_dtstamp_is_the_stamp_in_utc() -> None:
    """DTSTAMP is the given stamp, in UTC, to the second."""
    stamp = datetime(2026, 11, 25, 11, 30, 15, 999, tzinfo=BERLIN)
    data = build(event_on(in_15_days()), stamp=stamp)
    assert b"DTSTAMP:20261125T103015Z\r\n" in data


@pytest.mark.parametrize(
    ("changes", "options", "message"),
    [
        ({}, {"uid_domain": "x" * 47}, "uid_domain"),
        ({}, {"uid_domain": "bad domain"}, "uid_domain"),
        ({}, {"stamp": datetime(2026, 1, 1)}, "stamp"),
        ({"timezone": "Mars/Olympus_Mons"}, {}, "unknown time zone"),
        ({"url": "https://x.example/\r\nATTENDEE:mailto:x@evil.example"}, {}, "url"),
        ({"organizer_email": "a@b.example\r\nX"}, {}, "organizer_email"),
    ],
)
def test_values_that_cannot_go_into_a_calendar_are_refused(
    changes: dict[str, Any], options: dict[str, Any], message: str
) -> None:
    """A too long or malformed UID domain, naive stamp, unknown zone, CR/LF in URL: ComposeError."""
    with pytest.raises(ComposeError, match=message):
        build(event_on(in_15_days(), **changes), **options)


def test_an_event_that_ends_before_it_starts_is_refused() -> None:
    """ends_at must be after starts_at."""
    event = event_on(in_15_days())
    with pytest.raises(ComposeError, match="ends_at"):
        build(replace(event, ends_at=event.starts_at))


# --- every calendar file the pipeline sends, read by two parsers --------------------------------


def _sent_calendars() -> list[Any]:
    from mailer.constants import LOCALES, MESSAGE_KINDS

    return [
        pytest.param(
            kind, locale, sample, shared, id=f"{kind}-{locale}-{sample}-{'shared' if shared else 'withheld'}"
        )
        for kind in MESSAGE_KINDS
        if kind != "reminder"  # the only kind without a calendar file
        for locale in LOCALES
        for sample in ("plain", "everything")
        for shared in (True, False)
    ]


@pytest.mark.parametrize(("kind", "locale", "sample", "shared"), _sent_calendars())
def test_every_sent_calendar_file_parses_in_icalendar_and_vobject(
    kind: str, locale: str, sample: str, shared: bool, make_settings: Any
) -> None:
    """Each kind × locale's .ics, with and without every optional field and with the join link
    shared or withheld, reads the same in icalendar and in vobject: one VEVENT with the same
    UID, SEQUENCE, STATUS, summary and aware start and end; the description keeps its lines."""
    import vobject

    from mailer.ops.preview import sample_event, sample_event_with_everything
    from tests.test_optional_fields import build as build_mail

    registration = sample_event_with_everything() if sample == "everything" else sample_event()
    registration["event"]["join_url_in_confirmation"] = shared
    text = build_mail(make_settings(), kind, locale, registration)["ics"]
    assert text, "a calendar file is attached"
    data = text.encode()
    ours = vevent(data)
    (theirs_calendar,) = list(vobject.readComponents(text, validate=True))
    (theirs,) = theirs_calendar.vevent_list
    assert theirs_calendar.method.value == (
        "PUBLISH" if kind in ("confirmation", "event_changed") else "CANCEL"
    )
    assert theirs.uid.value == str(ours["uid"])
    assert int(theirs.sequence.value) == int(ours["sequence"])
    assert theirs.status.value == str(ours["status"])
    assert theirs.summary.value == str(ours["summary"])
    for name in ("dtstart", "dtend"):
        value = getattr(theirs, name).value
        assert value.utcoffset() is not None
        assert value == ours.decoded(name)
    if "description" in ours:
        assert theirs.description.value == str(ours["description"])
    if sample == "everything" and locale == "en":
        assert theirs.summary.value == "Digital dialogue on openness"
