"""Rendering once per event and filling in each attendee gives what a full render gives."""

from __future__ import annotations

from datetime import date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import markupsafe
import pytest
from babel.dates import format_date
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.content.render import Renderer, SharedRenderer, all_kinds_and_locales, build_context, event_view
from mailer.durations import Offset
from mailer.events import Attendee, Event


def _context(person: Any) -> dict[str, Any]:
    return {"attendee": person, "locale": "de"}


@pytest.mark.parametrize(
    "subject",
    [
        "Hallo {{ attendee.name }} <{{ attendee.email }}>",
        "Hallo {{ attendee.name|upper }}",
        "{% if attendee.name|length > 8 %}Lang{% else %}Kurz{% endif %}",
        "{% if attendee.name %}Guten Tag {{ attendee.name }}{% else %}Guten Tag{% endif %}",
    ],
)
@pytest.mark.parametrize("name", ["Maria Müller", "", "Tom & <Jerry>", "Li"])
def test_shared_render_equals_full_render(tmp_path: Path, subject: str, name: str) -> None:
    """Whatever a template does with the name, the shared path matches rendering per attendee."""
    kind = tmp_path / "confirmation"
    kind.mkdir()
    (kind / "subject.de.txt").write_text(subject)
    (kind / "body.de.txt").write_text(subject + "\n")
    (kind / "body.de.html").write_text("<html><p>" + subject + "</p></html>")
    renderer = Renderer(tmp_path)
    shared = SharedRenderer(renderer)
    for person in (
        Attendee(email="a@example.org", name=name),
        Attendee(email="b@example.org", name=name + "x"),
    ):
        expected = renderer.render(
            "confirmation", "de", _context(SimpleNamespace(name=person.name, email=person.email))
        )
        got = shared.render(("evt", 1), "confirmation", "de", person, _context)
        assert got == expected


def test_a_comparison_on_the_name_is_rendered_per_attendee(tmp_path: Path) -> None:
    """`{% if attendee.name == "Li" %}` can't be carried by a stand-in: the syntax check catches it."""
    kind = tmp_path / "confirmation"
    kind.mkdir()
    for part in ("subject.de.txt", "body.de.txt", "body.de.html"):
        (kind / part).write_text('{% if attendee.name == "Li" %}Hallo Li{% else %}Hallo{% endif %}')
    shared = SharedRenderer(Renderer(tmp_path))
    assert shared.render(
        "k", "confirmation", "de", Attendee(email="a@example.org", name="Li"), _context
    ).subject == ("Hallo Li")
    assert shared.render(
        "k", "confirmation", "de", Attendee(email="b@example.org", name="Bo"), _context
    ).subject == ("Hallo")


# --- the context's dates, zones and reminder times ------------------------------------------

BERLIN = ZoneInfo("Europe/Berlin")


def _next_zone_change(after: date) -> datetime:
    """The first day from `after` on whose night Berlin's offset changes: 03:00 local after it."""
    day = after
    while True:
        noon = datetime(day.year, day.month, day.day, 12, tzinfo=BERLIN)
        if noon.utcoffset() != (noon + timedelta(days=1)).utcoffset():
            nxt = day + timedelta(days=1)
            return datetime(nxt.year, nxt.month, nxt.day, 4, tzinfo=BERLIN)
        day += timedelta(days=1)


def _day_in(months: tuple[int, ...]) -> datetime:
    """18:00 on a day at least a week ahead that lies in one of `months` (no change that week)."""
    day = datetime.now(BERLIN).date() + timedelta(days=7)
    while day.month not in months:
        day += timedelta(days=1)
    return datetime(day.year, day.month, day.day, 18, tzinfo=BERLIN)


def _event(start: datetime, end: datetime | None = None, **extra: Any) -> Event:
    fields: dict[str, Any] = {
        "id": "weltoffen",
        "title": "Digitaler Dialog zu Weltoffenheit",
        "starts_at": start,
        "ends_at": end or start + timedelta(hours=2, minutes=30),
        "timezone": "Europe/Berlin",
        "organizer": {"name": "Stadt Kaiserslautern", "email": "integration@example.org"},
    }
    fields.update(extra)
    return Event.model_validate(fields)


@pytest.mark.parametrize(("months", "de", "en"), [((12, 1, 2), "MEZ", "CET"), ((6, 7, 8), "MESZ", "CEST")])
def test_the_zone_is_the_short_name_of_standard_or_summer_time(
    months: tuple[int, ...], de: str, en: str
) -> None:
    """Times carry "MEZ"/"MESZ" (German) or "CET"/"CEST" (English) as in force that day, not
    a long "(Mitteleuropäische Normalzeit)"."""
    event = _event(_day_in(months))
    for locale, short in (("de", de), ("en", en)):
        view = event_view(event, locale)
        assert (view.zone, view.end_zone, view.zone_changes) == (short, short, False)
        assert view.when_zoned == f"{view.when} {short}"


def test_an_event_across_a_clock_change_names_the_zone_of_start_and_end() -> None:
    """Overnight across a clock change, start and end each carry their own zone."""
    change = _next_zone_change(datetime.now(BERLIN).date() + timedelta(days=1))
    start, end = change - timedelta(hours=8), change  # 20:00 the evening before until 04:00
    view = event_view(_event(start, end), "de")
    assert view.zone_changes is True
    assert {view.zone, view.end_zone} == {"MEZ", "MESZ"}
    assert view.when_zoned.index(view.zone) < view.when_zoned.rindex(view.end_zone)
    assert view.when_zoned.endswith(f"4:00 Uhr {view.end_zone}")
    assert event_view(_event(start, end), "en").when_zoned.endswith(
        f"4:00 AM {'CET' if view.end_zone == 'MEZ' else 'CEST'}"
    )


@pytest.mark.parametrize(
    ("zone", "expected"),
    [("America/New_York", {"EST", "EDT"}), ("Asia/Kolkata", {"IST"}), ("America/Sao_Paulo", {"UTC-3"})],
)
def test_zones_without_a_letter_abbreviation_show_their_utc_offset(zone: str, expected: set[str]) -> None:
    """Other zones keep their usual abbreviation; where tzdata has only a number, "UTC-3"."""
    start = _day_in((1,)).replace(tzinfo=ZoneInfo(zone))
    assert event_view(_event(start, timezone=zone), "de").zone in expected


def test_html_values_keep_dates_and_times_on_one_line() -> None:
    """`event.nobreak` holds the same strings with no-break spaces inside "10. Dezember 2026"
    and "20:30 Uhr" / "8:30 PM"; the plain values (for the text part) keep ordinary spaces."""
    start = _day_in((12,))
    event = _event(start, registration_deadline=start - timedelta(days=10))
    de, en = event_view(event, "de"), event_view(event, "en")
    month = {"de": "Dezember", "en": "December"}
    assert f"{start.day}.\u00a0{month['de']}\u00a0{start.year}" in de.nobreak.when_zoned
    assert "20:30\u00a0Uhr\u00a0MEZ" in de.nobreak.when_zoned
    assert f"{month['en']}\u00a0{start.day}," in en.nobreak.when_zoned
    assert "8:30\u00a0PM\u00a0CET" in en.nobreak.when_zoned
    assert "\u00a0Uhr" in de.nobreak.registration_deadline
    for view in (de, en):
        assert "\u00a0" not in view.when + view.when_zoned + view.date + (view.registration_deadline or "")
        assert view.nobreak.when_zoned.replace("\u00a0", " ") == view.when_zoned


@pytest.mark.parametrize(
    ("offset", "hour", "de", "en"),
    [
        ("P1D", 18, "morgen, 18:00 Uhr", "tomorrow, 6:00 PM"),
        ("PT1H", 18, "in einer Stunde, 18:00 Uhr", "in one hour, 6:00 PM"),
        ("PT1H", 0, "in einer Stunde, 00:00 Uhr", "in one hour, 12:00 AM"),
        ("PT3H", 20, "in 3 Stunden, 20:00 Uhr", "in 3 hours, 8:00 PM"),
    ],
)
def test_the_reminder_says_which_day_and_time(offset: str, hour: int, de: str, en: str) -> None:
    """`reminder.when` completes „Erinnerung: „…“ …“: a day ahead "morgen", within the day
    the lead ("in einer Stunde"), and the start time."""
    event = _event(_day_in((12,)).replace(hour=hour))
    for locale, expected in (("de", de), ("en", en)):
        context = build_context(
            kind="reminder",
            locale=locale,
            attendee=Attendee(email="a@example.org", name=""),
            event=event,
            offset=Offset.parse(offset),
        )
        assert context["reminder"].when == expected


def test_a_reminder_days_ahead_names_the_date() -> None:
    """Three days ahead: „am Freitag, 18. Dezember, 18:00 Uhr“ / "on Friday, December 18, 6:00 PM"."""
    start = _day_in((12,))
    event = _event(start)
    context = build_context(
        kind="reminder",
        locale="de",
        attendee=Attendee(email="a@example.org", name=""),
        event=event,
        offset=Offset.parse("P3D"),
    )
    weekday = format_date(start, "EEEE", locale="de")
    assert (
        context["reminder"].when
        == f"am {weekday}, {start.day}. {format_date(start, 'MMMM', locale='de')}, 18:00 Uhr"
    )


# --- per-registration values through the shared render ----------------------------------------


def test_each_registration_gets_its_own_reference_and_link_from_the_shared_render(tmp_path: Path) -> None:
    """One event rendered once for many registrants still gives each their own booking code and
    management link (with `&` escaped in HTML), exactly as a render for that registration alone."""
    from mailer.content.render import Recipient
    from mailer.ops.preview import sample_event_with_everything

    event = Event.model_validate(sample_event_with_everything()["event"])
    renderer = Renderer(None)
    shared = SharedRenderer(renderer)
    people = [
        Recipient("Maria Müller", "maria@example.org", "KL-1", "https://example.org/r?id=1&k=a"),
        Recipient("Ali Yılmaz", "ali@example.org", "KL-22", "https://example.org/r?id=22&k=bb"),
        Recipient("", "jane@example.org", None, None),
        Recipient("Tom & <Jerry>", "tom@example.org", "KL-<3>", "https://example.org/r?id=3&k=<c>"),
    ]
    for person in people:

        def full(who: Any) -> dict[str, Any]:
            return build_context(
                kind="confirmation", locale="de", attendee=who, event=event, has_calendar=True
            )

        got = shared.render(("evt", 1), "confirmation", "de", person, full)
        assert got == renderer.render("confirmation", "de", full(person))
        if person.reference:
            assert person.reference in got.text
            assert str(markupsafe.escape(person.manage_url)) in got.html
        others = [p.reference for p in people if p.reference and p is not person]
        assert not any(f"Anmeldenummer: {ref}\n" in got.text for ref in others)
    assert len(shared._shared) == 2  # with and without the per-registration values: two renders


_DEFAULT_TEMPLATES = Renderer(None)  # compiled once for all examples
_NO_CONTROLS = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))
RECIPIENTS = st.builds(
    lambda name, reference, link: (name, reference, link),
    st.text(_NO_CONTROLS, max_size=300),
    st.none() | st.text(_NO_CONTROLS, min_size=1, max_size=64),
    st.none() | st.text(_NO_CONTROLS, max_size=1989).map(lambda tail: "https://a.b" + tail.replace(" ", "")),
)


@settings(max_examples=80, deadline=None)
@given(
    kind_and_locale=st.sampled_from(all_kinds_and_locales()),
    people=st.lists(RECIPIENTS, min_size=2, max_size=3),
)
def test_the_shared_render_gives_every_registrant_what_a_render_for_them_alone_gives(
    kind_and_locale: tuple[str, str], people: list[tuple[str, str | None, str | None]]
) -> None:
    """Names, booking codes and management links of any length the contract allows (the link up
    to 2 000 characters), in any script, markup or the stand-ins' own characters included: a
    kind and locale rendered once per event and filled in equals a render for that person."""
    from mailer.content.render import Recipient
    from mailer.ops.preview import sample_event_with_everything, sample_previous

    kind, locale = kind_and_locale
    sample = sample_event_with_everything()
    event = Event.model_validate(sample["event"])
    previous = Event.model_validate(sample_previous(sample))
    renderer = _DEFAULT_TEMPLATES
    shared = SharedRenderer(renderer)
    view = event_view(event, locale)

    def full(who: Any) -> dict[str, Any]:
        return build_context(
            kind=kind,
            locale=locale,
            attendee=who,
            event=event,
            event_view_cache=view,
            previous=previous if kind == "event_changed" else None,
            offset=Offset.parse("P1D") if kind == "reminder" else None,
            has_calendar=kind != "reminder",
        )

    for number, (name, reference, link) in enumerate(people):
        person = Recipient(name, f"person{number}@example.org", reference, link)
        got = shared.render(("evt", kind, locale), kind, locale, person, full)
        assert got == renderer.render(kind, locale, full(person)), person
