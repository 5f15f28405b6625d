"""The contract's optional fields: each shows where its rule says, in every kind and locale,
and leaves no trace (not even an empty line) where it is absent."""

from __future__ import annotations

import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from typing import Any

import markupsafe
import pytest

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.errors import InvalidEvent
from mailer.events import json_schema, parse_event
from mailer.intake.client import MailerClient
from mailer.ops.preview import SAMPLE_OPTIONAL, preview, sample_event_with_everything, sample_previous
from tests.conftest import log_until, wait_for
from tests.test_footer import _no_gaps

CANCELLATIONS = ("registration_cancelled", "event_cancelled")
PUBLISHING = ("confirmation", "event_changed")  # the kinds whose calendar file adds or moves the entry
REGISTRATION = SAMPLE_OPTIONAL["registration"]
EVENT = SAMPLE_OPTIONAL["event"]
EMAIL_US = {"de": "geben Sie uns bitte per E-Mail an", "en": "please let us know by email to"}
ACCESSIBLE = {"de": "Gebärdensprachdolmetschung, Live-Untertitelung", "en": "Sign language interpretation"}
MEETING_ID = {"de": "Meeting-ID: 123 456 789", "en": "Meeting ID: 123 456 789"}


def parts(data: bytes) -> dict[str, str]:
    """Subject, text, HTML and the calendar file (unfolded) of one built mail."""
    message = BytesParser(policy=policy.default).parsebytes(data)
    found = {"subject": str(message["Subject"]), "text": "", "html": "", "ics": ""}
    for part in message.walk():
        kind = part.get_content_type()
        if kind == "text/plain":
            found["text"] = part.get_content()
        elif kind == "text/html":
            found["html"] = part.get_content()
        elif kind == "text/calendar":
            found["ics"] = part.get_content().replace("\r\n ", "").replace("\\,", ",").replace("\\;", ";")
    return found


def build(settings: Any, kind: str, locale: str, registration: dict[str, Any]) -> dict[str, str]:
    previous = sample_previous(registration) if kind == "event_changed" else None
    built, _ = preview(settings, kind, registration, locale, previous=previous)
    return parts(built.data)


def without(field: str) -> dict[str, Any]:
    """The sample with every optional field but `field` ("registration.x" or "event.x")."""
    registration = sample_event_with_everything()
    scope, name = field.split(".")
    registration[scope].pop(name)
    return registration


def _both(found: dict[str, str], value: str, shown: bool) -> None:
    assert (value in found["text"]) is shown, found["text"]
    html_value = str(markupsafe.escape(value))
    assert (html_value in found["html"]) is shown, found["html"]


# Each field's rule: (found parts, kind, locale, present) -> assertions.
def _reference(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    _both(found, REGISTRATION["reference"], present)  # every kind
    assert REGISTRATION["reference"] not in found["subject"] + found["ics"]


def _manage_url(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    may = kind not in CANCELLATIONS
    _both(found, REGISTRATION["manage_url"], present and may)
    if may:  # "email us" only when there is no link to cancel with
        _both(found, EMAIL_US[locale], not present)
    assert REGISTRATION["manage_url"] not in found["ics"]


def _url(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    _both(found, EVENT["url"], present)
    if found["ics"]:
        assert (EVENT["url"] in found["ics"]) is present


def _contact(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    for value in EVENT["contact"].values():
        _both(found, value, present)
    assert ('href="tel:+496313654030"' in found["html"]) is present


def _access_info(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    may = kind not in CANCELLATIONS  # the sample shares its join link in the confirmation
    _both(found, MEETING_ID[locale], present and may)
    _both(found, "4711", present and may)
    if found["ics"]:
        assert (MEETING_ID[locale] in found["ics"]) is (present and kind in PUBLISHING)


def _accessibility(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    _both(found, ACCESSIBLE[locale], present and kind not in CANCELLATIONS)
    _both(found, EVENT["accessibility"]["note"], present and kind not in CANCELLATIONS)


def _title_i18n(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    english = EVENT["title_i18n"]["en"]
    translated = present and locale == "en"
    assert (english in found["subject"]) is translated
    _both(found, english, translated)
    _both(found, "Digitaler Dialog zu Weltoffenheit", not translated)  # the fallback
    if found["ics"]:
        assert (f"SUMMARY:{english}" in found["ics"]) is translated


def _description_i18n(found: dict[str, str], kind: str, locale: str, present: bool) -> None:
    english, main = EVENT["description_i18n"]["en"], EVENT["description"]
    translated = present and locale == "en"
    if kind == "confirmation":  # the only kind whose body tells what the event is about
        _both(found, english, translated)
        _both(found, main, not translated)
    if found["ics"] and kind in PUBLISHING:
        assert (english in found["ics"]) is translated
        assert (main in found["ics"]) is not translated


RULES: dict[str, Callable[[dict[str, str], str, str, bool], None]] = {
    "registration.reference": _reference,
    "registration.manage_url": _manage_url,
    "event.url": _url,
    "event.contact": _contact,
    "event.access_info": _access_info,
    "event.accessibility": _accessibility,
    "event.title_i18n": _title_i18n,
    "event.description_i18n": _description_i18n,
}


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("field", RULES)
@pytest.mark.parametrize("present", [True, False], ids=["with", "without"])
def test_each_optional_field_shows_exactly_where_its_rule_says(
    kind: str, locale: str, field: str, present: bool, make_settings: Any
) -> None:
    """With all the other optional fields set, each one appears in text, HTML and calendar file
    exactly as its rule says (templates/README.md), and its absence leaves no empty line."""
    registration = sample_event_with_everything() if present else without(field)
    found = build(make_settings(), kind, locale, registration)
    RULES[field](found, kind, locale, present)
    _no_gaps(found)


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
@pytest.mark.parametrize("locale", LOCALES)
def test_none_of_the_optional_fields_leaves_a_trace_when_all_are_absent(
    kind: str, locale: str, make_settings: Any
) -> None:
    """The plain sample (no optional field) shows no label of any of them and no empty line."""
    registration = sample_event_with_everything()
    for field in RULES:
        scope, name = field.split(".")
        registration[scope].pop(name)
    found = build(make_settings(), kind, locale, registration)
    labels = {
        "de": ("Anmeldenummer", "Barrierefreiheit", "Mehr zur Veranstaltung", "Telefon", "Meeting-ID"),
        "en": ("Reference", "Accessibility", "Event page", "Phone", "Meeting ID"),
    }[locale]
    for label in labels:
        assert label not in found["text"], label
        assert label not in found["html"], label
    _no_gaps(found)


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
@pytest.mark.parametrize("locale", LOCALES)
def test_access_details_are_withheld_with_the_join_link(kind: str, locale: str, make_settings: Any) -> None:
    """With join_url_in_confirmation: false, meeting ID and passcode are missing from body and
    calendar file exactly where the link is: only the reminder carries them."""
    registration = sample_event_with_everything()
    registration["event"]["join_url_in_confirmation"] = False
    found = build(make_settings(), kind, locale, registration)
    shown = kind == "reminder"
    for value in (MEETING_ID[locale], "4711", EVENT["access_info"]["dial_in"]):
        _both(found, value, shown)
        assert value not in found["ics"]


@pytest.mark.parametrize("locale", LOCALES)
def test_access_details_without_a_join_link_still_show(locale: str, make_settings: Any) -> None:
    """A dial-in-only event (access_info, no join_url) shows its access details under their own
    heading, and the details box calls it an online event."""
    registration = sample_event_with_everything()
    registration["event"].pop("join_url")
    registration["event"].pop("location")
    found = build(make_settings(), "reminder", locale, registration)
    heading = {"de": "Zugang zur Online-Teilnahme", "en": "How to join online"}[locale]
    for name in ("text", "html"):
        assert heading in found[name]
        assert {"de": "Online-Veranstaltung", "en": "Online event"}[locale] in found[name]
    _both(found, MEETING_ID[locale], True)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("registration", "reference"), "KL\r\nBcc: x@example.org", "registration.reference"),
        (("registration", "reference"), "", "registration.reference"),
        (("registration", "reference"), "x" * 65, "registration.reference"),
        (("registration", "manage_url"), "javascript:alert(1)", "registration.manage_url"),
        (("event", "url"), "www.example.org", "event.url"),
        (("event", "contact"), {}, "event.contact"),
        (("event", "contact"), {"phone": "call us"}, "event.contact.phone"),
        (("event", "contact"), {"name": "Büro\u2028Integration"}, "event.contact.name"),
        (("event", "contact"), {"email": "not-an-address"}, "event.contact.email"),
        (("event", "access_info"), {}, "event.access_info"),
        (("event", "access_info"), {"passcode": "47\x0011"}, "event.access_info.passcode"),
        (("event", "accessibility"), {"captions": "yes"}, "event.accessibility.captions"),
        (("event", "accessibility"), {"sign_language": False}, "event.accessibility"),
        (("event", "title_i18n"), {"fr": "Dialogue"}, "event.title_i18n"),
        (("event", "title_i18n"), {"en": "Dialog\nBcc: x@example.org"}, "event.title_i18n.en"),
        (("event", "title_i18n"), {"en": ""}, "event.title_i18n.en"),
        (("event", "description_i18n"), {"en": "x" * 5001}, "event.description_i18n.en"),
        (("event", "unknown_field"), "x", "event.unknown_field"),
    ],
)
def test_bad_optional_values_are_refused_naming_the_field(
    path: tuple[str, str], value: Any, field: str
) -> None:
    """Every optional field is validated like the rest: a value that could break a header
    (control characters, line breaks), a link that is not http(s), an empty object, a
    language mailer has no templates for, each is refused with the field's name."""
    registration = copy.deepcopy(sample_event_with_everything())
    registration[path[0]][path[1]] = value
    with pytest.raises(InvalidEvent) as caught:
        parse_event(registration)
    assert any(problem.field.startswith(field) for problem in caught.value.problems), caught.value


def test_the_full_sample_is_valid_and_multi_line_descriptions_are_kept() -> None:
    """The sample with every optional field parses; a translated description may hold line
    breaks like the main one."""
    registration = sample_event_with_everything()
    registration["event"]["description_i18n"] = {"en": "First line.\nSecond line."}
    incoming = parse_event(registration)
    assert incoming.event.description_in("en") == "First line.\nSecond line."  # type: ignore[union-attr]


def test_the_json_schema_lists_every_optional_field() -> None:
    """`mailer schema` documents each new field, with the nested objects' own fields."""
    schema = str(json_schema())
    for name in ("reference", "manage_url", "contact", "access_info", "accessibility", "title_i18n"):
        assert f"'{name}'" in schema, name
    for nested in ("meeting_id", "passcode", "dial_in", "sign_language", "captions", "phone"):
        assert f"'{nested}'" in schema, nested


# --- through the real pipeline ------------------------------------------------------------------

FOOTER = {
    "footer_address": "Stadtverwaltung Kaiserslautern; Willy-Brandt-Platz 1; 67657 Kaiserslautern",
    "privacy_url": "https://www.kaiserslautern.de/datenschutz",
    "imprint_url": "https://www.kaiserslautern.de/impressum",
}


def _registration(number: int, locale: str, reference: str | None) -> dict[str, Any]:
    """The full sample for registration `number`, with its own address, code and link (or none)."""
    registration = sample_event_with_everything()
    registration["id"] = f"evt-{number}"
    registration["occurred_at"] = datetime.now(UTC).isoformat()
    registration["registration"] = {
        "id": f"reg-{number}",
        "attendee": {"email": f"person{number}@example.org", "name": f"Person {number}", "locale": locale},
    }
    if reference is not None:
        registration["registration"]["reference"] = reference
        registration["registration"]["manage_url"] = (
            f"https://anmeldung.example.org/r?id={number}&key=k{number}"
        )
    return registration


def _mail_parts(received: Any) -> dict[str, str]:
    return parts(received.message.as_bytes())


async def test_mails_from_a_running_worker_carry_the_new_fields_and_the_footer(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A worker with the footer settings sends each registration its own booking code and
    management link, the event's new fields and the footer, in the confirmation and, read back
    from Redis, in the later cancellation and change notices; one sent again without a code
    loses it."""
    await mail_worker(**FOOTER)
    german, english, bare = (
        _registration(1, "de", "KL-1"),
        _registration(2, "en", "KL-22"),
        _registration(3, "de", None),
    )
    async with MailerClient(redis_url) as client:
        await client.publish_many([german, english, bare])
        await wait_for(lambda: len(smtp_server.handler.received) == 3)
        cancel = {
            "type": "registration.cancelled",
            "id": "evt-cancel",
            "occurred_at": datetime.now(UTC).isoformat(),
            "registration": {"id": "reg-1"},
        }
        start = datetime.fromisoformat(german["event"]["starts_at"]) + timedelta(hours=1)
        moved = dict(
            german["event"], starts_at=start.isoformat(), ends_at=(start + timedelta(hours=2)).isoformat()
        )
        update = {
            "type": "event.updated",
            "id": "evt-move",
            "occurred_at": datetime.now(UTC).isoformat(),
            "event": moved,
        }
        await client.publish(cancel)
        await client.publish(update)
        await wait_for(lambda: len(smtp_server.handler.received) == 6)
    mails = {
        (r.rcpt_tos[0], r.message["X-Mailer-Kind"]): _mail_parts(r) for r in smtp_server.handler.received
    }
    # The sender is the organiser (MAILER_FROM has no name here), and each later mail threads
    # under its registration's confirmation.
    confirmations = {
        r.rcpt_tos[0]: r.message["Message-ID"]
        for r in smtp_server.handler.received
        if r.message["X-Mailer-Kind"] == "confirmation"
    }
    for received in smtp_server.handler.received:
        assert received.message["From"] == "Stadt Kaiserslautern <noreply@example.org>"
        if received.message["X-Mailer-Kind"] != "confirmation":
            assert received.message["In-Reply-To"] == confirmations[received.rcpt_tos[0]]
            assert received.message["References"] == confirmations[received.rcpt_tos[0]]
    assert set(mails) == {
        ("person1@example.org", "confirmation"),
        ("person1@example.org", "registration_cancelled"),
        ("person2@example.org", "confirmation"),
        ("person2@example.org", "event_changed"),
        ("person3@example.org", "confirmation"),
        ("person3@example.org", "event_changed"),
    }
    for (address, kind), found in mails.items():
        number = int(address[len("person")])
        locale = "en" if number == 2 else "de"
        _both(found, {1: "KL-1", 2: "KL-22", 3: "Anmeldenummer"}[number], number != 3)
        manage = f"https://anmeldung.example.org/r?id={number}&key=k{number}"
        _both(found, manage, number != 3 and kind != "registration_cancelled")
        _both(found, EVENT["url"], True)
        _both(found, EVENT["contact"]["phone"], True)
        _both(found, ACCESSIBLE[locale], kind != "registration_cancelled")
        _both(found, MEETING_ID[locale], kind != "registration_cancelled")
        for line in FOOTER["footer_address"].split("; "):
            _both(found, line, True)
        _both(found, FOOTER["privacy_url"], True)
        _both(found, FOOTER["imprint_url"], True)
        if locale == "en":
            assert EVENT["title_i18n"]["en"] in found["subject"]
            assert f"SUMMARY:{EVENT['title_i18n']['en']}" in found["ics"]
        if kind in PUBLISHING:
            assert "calendar.google.com" in found["html"]
        _no_gaps(found)


async def test_a_registration_sent_again_without_its_code_loses_it(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """The stored registration follows the newest record: sent again without reference and
    manage_url, the next mail (here the cancellation notice) has neither."""
    await mail_worker()
    first = _registration(1, "de", "KL-1")
    async with MailerClient(redis_url) as client:
        await client.publish(first)
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
        again = dict(_registration(1, "de", None), id="evt-again")
        await client.publish(again)
        await log_until(redis_url, lambda log: any(e.source_event == "evt-again" for e in log))
        cancel = {
            "type": "registration.cancelled",
            "id": "evt-cancel",
            "occurred_at": datetime.now(UTC).isoformat(),
            "registration": {"id": "reg-1"},
        }
        await client.publish(cancel)
        await wait_for(lambda: len(smtp_server.handler.received) == 2)
    confirmation, cancellation = (_mail_parts(r) for r in smtp_server.handler.received)
    _both(confirmation, "KL-1", True)
    _both(cancellation, "KL-1", False)
    _both(cancellation, "Anmeldenummer", False)
