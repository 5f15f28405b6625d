"""The "Google Kalender" and Outlook.com web links beside the calendar file: the same entry as
the .ics, under the same link rule, and only where a calendar file adds or moves the entry."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlsplit

import icalendar
import pytest

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.ops.preview import sample_event, sample_event_with_everything
from tests.test_optional_fields import PUBLISHING, build

GOOGLE = "https://calendar.google.com/calendar/render?"
OUTLOOK = "https://outlook.live.com/calendar/deeplink/compose?"
JOIN = "https://meet.example.org/weltoffen"


def links(html: str) -> dict[str, dict[str, str]]:
    """The query of each web link in the HTML part, by service."""
    found = {}
    for name, prefix in (("google", GOOGLE), ("outlook", OUTLOOK)):
        hrefs = [unescape(h) for h in re.findall(r'href="([^"]+)"', html) if unescape(h).startswith(prefix)]
        if hrefs:
            assert len(set(hrefs)) == 1, hrefs
            query = parse_qs(urlsplit(hrefs[0]).query, keep_blank_values=True, strict_parsing=True)
            found[name] = {key: values[0] for key, values in query.items()}
    return found


def entry(ics: str) -> icalendar.Event:
    calendar = icalendar.Calendar.from_ical(ics)
    events = [c for c in calendar.walk() if c.name == "VEVENT"]
    assert len(events) == 1
    event: icalendar.Event = events[0]
    return event


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


@pytest.mark.parametrize("kind", PUBLISHING)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("sample", ["plain", "everything"])
def test_the_web_links_carry_what_the_calendar_file_carries(
    kind: str, locale: str, sample: str, make_settings: Any
) -> None:
    """Title, start, end, place and description of both links equal the attached .ics entry."""
    registration = sample_event() if sample == "plain" else sample_event_with_everything()
    found = build(make_settings(), kind, locale, registration)
    web = links(found["html"])
    assert set(web) == {"google", "outlook"}
    vevent = entry(found["ics"])
    start, end = _utc(vevent.decoded("dtstart")), _utc(vevent.decoded("dtend"))
    description = str(vevent.get("description", ""))
    google, outlook = web["google"], web["outlook"]
    assert google["action"] == "TEMPLATE"
    assert google["text"] == outlook["subject"] == str(vevent["summary"])
    assert google["dates"] == f"{start:%Y%m%dT%H%M%SZ}/{end:%Y%m%dT%H%M%SZ}"
    assert outlook["startdt"] == f"{start:%Y-%m-%dT%H:%M:%SZ}"
    assert outlook["enddt"] == f"{end:%Y-%m-%dT%H:%M:%SZ}"
    assert outlook["rru"] == "addevent"
    assert google["location"] == outlook["location"] == str(vevent["location"])
    assert google["details"] == outlook["body"] == description
    assert google["ctz"] == "Europe/Berlin"
    for link in (google, outlook):
        assert JOIN in (link.get("details") or link["body"])  # the sample shares its link


@pytest.mark.parametrize("kind", PUBLISHING)
@pytest.mark.parametrize("locale", LOCALES)
def test_a_withheld_join_link_is_in_neither_web_link(kind: str, locale: str, make_settings: Any) -> None:
    """With join_url_in_confirmation: false neither link carries the join link or the access
    details, exactly like the calendar file."""
    registration = sample_event_with_everything()
    registration["event"]["join_url_in_confirmation"] = False
    found = build(make_settings(), kind, locale, registration)
    web = links(found["html"])
    assert set(web) == {"google", "outlook"}
    for link in web.values():
        carried = " ".join(link.values())
        for secret in (JOIN, "4711", "123 456 789", "+49 69 7104 9922"):
            assert secret not in carried
    text_links = re.findall(r"https://\S+", found["text"])
    assert not any(JOIN in unescape(u) or "4711" in u for u in text_links if "calendar" in u)


@pytest.mark.parametrize("kind", [k for k in MESSAGE_KINDS if k not in PUBLISHING])
@pytest.mark.parametrize("locale", LOCALES)
def test_no_web_links_where_no_calendar_file_adds_the_entry(
    kind: str, locale: str, make_settings: Any
) -> None:
    """Cancellations (their file removes the entry) and reminders (no file) have no web links."""
    found = build(make_settings(), kind, locale, sample_event_with_everything())
    for name in ("text", "html"):
        assert "calendar.google.com" not in found[name]
        assert "outlook.live.com" not in found[name]
    # Their labels neither (the cancellations name the services only to say where to delete).
    assert "Outlook.com:" not in found["text"]
    assert "Outlook.com</a>" not in found["html"]


@pytest.mark.parametrize("kind", PUBLISHING)
@pytest.mark.parametrize("locale", LOCALES)
def test_the_text_part_spells_out_both_links(kind: str, locale: str, make_settings: Any) -> None:
    """Plain-text readers get the same two links, in full, beside the note on the attachment."""
    found = build(make_settings(), kind, locale, sample_event_with_everything())
    hrefs = re.findall(r'href="([^"]+)"', found["html"])
    for prefix in (GOOGLE, OUTLOOK):
        (url,) = {unescape(h) for h in hrefs if unescape(h).startswith(prefix)}
        assert url in found["text"]
    assert {"de": "Google Kalender", "en": "Google Calendar"}[locale] in found["text"]


NEW_ENTRY = {"de": "Diese Links legen einen neuen Eintrag an.", "en": "These links add a new entry."}


@pytest.mark.parametrize("kind", PUBLISHING)
@pytest.mark.parametrize("locale", LOCALES)
def test_a_change_notice_says_its_web_links_add_an_entry_beside_the_old_one(
    kind: str, locale: str, make_settings: Any
) -> None:
    """A web link cannot move an entry it made before (no UID, unlike the calendar file): the
    change notice asks to delete the old one; the confirmation, the first entry, does not."""
    found = build(make_settings(), kind, locale, sample_event_with_everything())
    for name in ("text", "html"):
        assert (NEW_ENTRY[locale] in found[name]) is (kind == "event_changed"), name


DELETE_THERE = {
    "de": "Haben Sie ihn über Google Kalender oder Outlook.com eingetragen, löschen Sie ihn bitte dort.",
    "en": "If you added it with the Google Calendar or Outlook.com link, please delete it there.",
}


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
@pytest.mark.parametrize("locale", LOCALES)
def test_cancellations_ask_to_delete_an_entry_made_with_a_web_link(
    kind: str, locale: str, make_settings: Any
) -> None:
    """The METHOD:CANCEL file removes only the entry it made (same UID): both cancellation kinds
    ask those who used a web link to delete the entry themselves; no other kind does."""
    found = build(make_settings(), kind, locale, sample_event())
    cancelling = kind in ("registration_cancelled", "event_cancelled")
    assert (DELETE_THERE[locale] in " ".join(found["text"].split())) is cancelling
    assert (DELETE_THERE[locale] in found["html"]) is cancelling
