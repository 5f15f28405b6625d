"""The join link appears in a message, its body and its calendar file, exactly when that kind
may show it; a cancelling calendar file never carries it."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from html import unescape
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.intake.client import MailerClient
from mailer.ops.preview import preview, sample_event, sample_previous
from tests.conftest import wait_for

LINK = "https://meet.example.org/weltoffen"
# May this kind show the link, with the organiser's join_url_in_confirmation true / false?
SHOWS = {
    "confirmation": (True, False),
    "reminder": (True, True),
    "event_changed": (True, False),
    "registration_cancelled": (False, False),
    "event_cancelled": (False, False),
}


def _parts(data: bytes) -> dict[str, str]:
    message = BytesParser(policy=policy.default).parsebytes(data)
    parts = {"text": "", "html": "", "ics": ""}
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "text/plain":
            parts["text"] = part.get_content()
        elif kind == "text/html":
            parts["html"] = part.get_content()
        elif kind == "text/calendar":
            parts["ics"] = part.get_content()
    return parts


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("link_in_confirmation", [True, False], ids=["shared", "withheld"])
def test_the_link_is_in_body_and_calendar_exactly_when_the_kind_may_show_it(
    kind: str, locale: str, link_in_confirmation: bool, make_settings: Any
) -> None:
    """With the link withheld (join_url_in_confirmation: false) only the reminder carries it;
    otherwise confirmation, reminder and change notice do; cancellations never, not even in
    their METHOD:CANCEL file (which would otherwise update the calendar entry's link)."""
    event = sample_event()
    event["event"]["join_url_in_confirmation"] = link_in_confirmation
    registration = event
    previous = sample_previous(registration) if kind == "event_changed" else None
    built, _ = preview(make_settings(), kind, registration, locale, previous=previous)
    parts = _parts(built.data)
    expected = SHOWS[kind][0 if link_in_confirmation else 1]
    for name in ("text", "html"):
        assert (LINK in parts[name]) is expected, (name, parts[name][:400])
    if parts["ics"]:
        unfolded = parts["ics"].replace("\r\n ", "")
        assert (LINK in unfolded) is (expected and "METHOD:PUBLISH" in unfolded), unfolded


def _starting_in(hours: float, **event: object) -> dict[str, object]:
    """The sample evening starting `hours` from now (reminders: P1D and PT1H by default)."""
    registration = sample_event()
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=hours)
    registration["event"].update(
        {
            "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=2)).isoformat(),
            "registration_deadline": None,
            "join_url_in_confirmation": False,
            **event,
        }
    )
    return registration


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize(
    ("hours", "released"),
    [(72, False), (20, True), (0.5, True)],
    ids=["before-the-first-reminder", "between-the-reminders", "after-the-last-reminder"],
)
def test_a_withheld_link_is_out_once_the_first_reminder_has_gone(
    locale: str, hours: float, released: bool, make_settings: Any
) -> None:
    """A registration after the day-before reminder went out (it carried the link to everyone
    registered) gets the link in its confirmation, body, calendar file and web links; one
    before it does not. Otherwise a late registrant would never get the link."""
    built, _ = preview(make_settings(), "confirmation", _starting_in(hours), locale)
    parts = _parts(built.data)
    for name in ("text", "html"):
        assert (LINK in parts[name]) is released, name
    assert (LINK in parts["ics"].replace("\r\n ", "")) is released
    google = re.findall(r'href="(https://calendar\.google\.com[^"]+)"', parts["html"])
    assert google
    details = parse_qs(urlsplit(unescape(google[0])).query).get("details", [""])[0]
    assert (LINK in details) is released


PROMISE = {"de": "erinner", "en": "reminder"}  # "erinnern wir Sie", "mit einer Erinnerung"
LINK_LATER = {
    "de": "Den Zugangslink für die Online-Teilnahme erhalten Sie",
    "en": "You will receive the link",
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize(
    ("hours", "event", "follows"),
    [
        (72, {}, True),
        (0.5, {}, False),  # both reminders lay in the past: none is sent to this registration
        (72, {"reminder_offsets": []}, False),
        (72, {"join_url_in_confirmation": True, "reminder_offsets": []}, False),
    ],
    ids=["reminders-ahead", "too-late-for-any", "no-reminders-withheld", "no-reminders-shared"],
)
def test_the_confirmation_promises_a_reminder_only_when_one_will_come(
    locale: str, hours: float, event: dict[str, object], follows: bool, make_settings: Any
) -> None:
    """The confirmation says a reminder follows only if one is still to come for it; a
    withheld link is then promised "in good time", not "with a reminder"."""
    built, _ = preview(make_settings(), "confirmation", _starting_in(hours, **event), locale)
    parts = _parts(built.data)
    text = " ".join(parts["text"].split())
    assert (PROMISE[locale] in text.lower()) is follows
    assert (PROMISE[locale] in parts["html"].lower()) is follows
    if event.get("join_url_in_confirmation") is not True and hours > 1:
        assert LINK_LATER[locale] in text


async def test_a_late_registrant_gets_the_withheld_link_from_a_running_worker(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Through the pipeline: an event with the link withheld, starting in 20 hours (its
    day-before reminder is past); a new registration's confirmation carries the link."""
    await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish(_starting_in(20))
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
    parts = _parts(smtp_server.handler.received[0].message.as_bytes())
    assert LINK in parts["text"]
    assert LINK in parts["ics"].replace("\r\n ", "").replace("\n ", "")
