"""The join link appears in a message, its body and its calendar file, exactly when that kind
may show it; a cancelling calendar file never carries it."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from typing import Any

import pytest

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.ops.preview import preview, sample_event, sample_previous

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
