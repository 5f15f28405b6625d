"""The operator footer (postal address, privacy and imprint links, a GDPR note) and the
"pass it on" paragraph: shown exactly when configured / while registration is open."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from typing import Any

import pytest

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.errors import ConfigError, InvalidEvent
from mailer.events import parse_event
from mailer.ops.preview import preview, sample_event, sample_previous
from mailer.settings import load_settings

ADDRESS = "Stadtverwaltung Kaiserslautern; Willy-Brandt-Platz 1; 67657 Kaiserslautern"
PRIVACY = "https://www.kaiserslautern.de/datenschutz"
IMPRINT = "https://www.kaiserslautern.de/impressum"
SIGNUP = "https://www.kaiserslautern.de/anmeldung/weltoffen"
PASS_ON = {"de": "Kennen Sie weitere Interessierte?", "en": "Do you know anyone else"}
GDPR = {"de": "Ihre Adresse verwenden wir nur", "en": "We use your address only"}
FOOTERS = {
    "none": {},
    "address": {"footer_address": ADDRESS},
    "privacy": {"privacy_url": PRIVACY},
    "imprint": {"imprint_url": IMPRINT},
    "all": {"footer_address": ADDRESS, "privacy_url": PRIVACY, "imprint_url": IMPRINT},
}


def _parts(data: bytes) -> dict[str, str]:
    message = BytesParser(policy=policy.default).parsebytes(data)
    parts = {"text": "", "html": ""}
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            parts["text"] = part.get_content()
        elif part.get_content_type() == "text/html":
            parts["html"] = part.get_content()
    return parts


def _build(settings: Any, kind: str, locale: str, registration: dict[str, Any]) -> dict[str, str]:
    previous = sample_previous(registration) if kind == "event_changed" else None
    built, _ = preview(settings, kind, registration, locale, previous=previous)
    return _parts(built.data)


def _no_gaps(parts: dict[str, str]) -> None:
    assert not re.search(r"\n[ \t]*\n[ \t]*\n", parts["text"]), parts["text"]
    assert not re.search(r"\n[ \t]*\n", parts["text"].rsplit("-" * 60, 1)[1].strip()), parts["text"]
    assert not re.search(r"<(p|td|a)\b[^>]*>\s*</\1>", parts["html"]), parts["html"]
    assert not re.search(r"<br>\s*(<br>|</)", parts["html"]), parts["html"]


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("footer", FOOTERS, ids=list(FOOTERS))
def test_footer_lines_appear_exactly_when_configured(
    kind: str, locale: str, footer: str, make_settings: Any
) -> None:
    """Each operator setting adds its line to text and HTML of every kind; an unset one leaves
    neither its line nor an empty line; the GDPR note is always there."""
    configured = FOOTERS[footer]
    parts = _build(make_settings(**configured), kind, locale, sample_event())
    for name in ("text", "html"):
        body = parts[name]
        assert GDPR[locale] in body
        for line in ADDRESS.split("; "):
            assert (line in body) is ("footer_address" in configured), (name, line)
        assert ADDRESS not in body  # the separators become line breaks
        assert (PRIVACY in body) is ("privacy_url" in configured), name
        assert (IMPRINT in body) is ("imprint_url" in configured), name
        label = {"de": ("Datenschutz", "Impressum"), "en": ("Privacy", "Imprint")}[locale]
        footer_part = (
            body.rsplit("-" * 60, 1)[-1] if name == "text" else body.rsplit('max-width:600px;">', 1)[-1]
        )
        assert (label[0] in footer_part) is ("privacy_url" in configured), name
        assert (label[1] in footer_part) is ("imprint_url" in configured), name
    _no_gaps(parts)


def _with(deadline: timedelta | None, url: str | None) -> dict[str, Any]:
    registration = sample_event()
    event = registration["event"]
    if deadline is None:
        event.pop("registration_deadline")
    else:
        event["registration_deadline"] = (datetime.now(UTC) + deadline).isoformat()
    if url is not None:
        event["registration_url"] = url
    return registration


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize(
    ("deadline", "url", "shown"),
    [
        (timedelta(days=3), SIGNUP, True),
        (None, SIGNUP, True),
        (timedelta(minutes=-1), SIGNUP, False),
        (timedelta(days=3), None, False),
        (None, None, False),
    ],
    ids=["open-with-link", "no-deadline-with-link", "closed-with-link", "open-no-link", "no-link"],
)
def test_pass_it_on_only_while_registration_is_open_and_with_a_link(
    locale: str, deadline: timedelta | None, url: str | None, shown: bool, make_settings: Any
) -> None:
    """„Kennen Sie weitere Interessierte?“ shows, with the registration link, only before the
    deadline (or with none) and only when the event has a registration_url; text and HTML agree."""
    parts = _build(make_settings(), "confirmation", locale, _with(deadline, url))
    for name in ("text", "html"):
        assert (PASS_ON[locale] in parts[name]) is shown, (name, parts[name])
        assert (SIGNUP in parts[name]) is shown, name
    _no_gaps(parts)


@pytest.mark.parametrize("kind", [k for k in MESSAGE_KINDS if k != "confirmation"])
def test_pass_it_on_is_a_confirmation_paragraph_only(kind: str, make_settings: Any) -> None:
    """Other kinds never ask to pass the event on, even while registration is open."""
    parts = _build(make_settings(), kind, "de", _with(timedelta(days=3), SIGNUP))
    for name in ("text", "html"):
        assert PASS_ON["de"] not in parts[name]


@pytest.mark.parametrize(
    "url", ["ftp://example.org/x", "https://exa mple.org", "javascript:alert(1)", "x" * 10]
)
def test_registration_url_must_be_an_http_url(url: str) -> None:
    """event.registration_url is refused unless it is an http(s) URL: one error naming the field."""
    with pytest.raises(InvalidEvent) as caught:
        parse_event(_with(timedelta(days=3), url))
    assert "registration_url" in str(caught.value)


def test_registration_url_is_in_the_json_schema() -> None:
    """The contract's JSON Schema lists the optional field."""
    from mailer.events import json_schema

    assert "registration_url" in str(json_schema())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("privacy_url", "www.kaiserslautern.de/datenschutz"),
        ("imprint_url", "https://"),
        ("imprint_url", "https://example.org/" + "x" * 2000),
        ("footer_address", "Rathaus\u0007"),
        ("footer_address", "x" * 501),
    ],
)
def test_footer_settings_are_validated(name: str, value: str, make_settings: Any) -> None:
    """A bad footer setting stops start-up with one error naming the variable."""
    with pytest.raises(ConfigError) as caught:
        load_settings(**{name: value})
    assert f"MAILER_{name.upper()}" in str(caught.value)
