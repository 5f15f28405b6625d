"""Which changes of an event send a change notice, and that the notice says what changed:
each notified field alone, in every locale, in preview and through a running worker."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import markupsafe
import pytest

from mailer.constants import LOCALES
from mailer.content.render import CHANGE_LABELS
from mailer.events import Event
from mailer.intake.client import MailerClient
from mailer.lifecycle.changes import NOTIFIED, notified_changes, unnotified_changes
from mailer.ops.preview import preview, sample_event_with_everything
from tests.conftest import BERLIN, log_until, make_event, settled, wait_for
from tests.test_optional_fields import parts

# Spelled out, not read from NOTIFIED: a field dropped from it must fail here.
TOLD = ("time", "location", "join_url", "access", "title", "accessibility")
DETAILS_HEADING = {"de": "Die aktuellen Angaben", "en": "The current details"}
OLD_PASSCODE = {"de": "Kenncode: 1234", "en": "Passcode: 1234"}
NEW_PASSCODE = {"de": "Kenncode: 4711", "en": "Passcode: 4711"}


def _earlier(event: dict[str, Any], field: str) -> dict[str, Any]:
    """The event as it was before a change of `field` alone (the sample holds the new values)."""
    old = copy.deepcopy(event)
    if field == "time":
        start = datetime.fromisoformat(old["starts_at"]) - timedelta(hours=1)
        old["starts_at"], old["ends_at"] = start.isoformat(), (start + timedelta(hours=2)).isoformat()
    elif field == "location":
        old["location"] = "Rathaus, Großer Sitzungssaal"
    elif field == "join_url":
        old["join_url"] = "https://meet.example.org/alt"
    elif field == "access":
        old["access_info"] = {**old["access_info"], "passcode": "1234"}
    elif field == "title":
        old["title"] = "Dialog zu Weltoffenheit"
        old["title_i18n"] = {"en": "Dialogue on openness"}
    elif field == "accessibility":
        old["accessibility"] = {"captions": True}
    return old


# What the notice prints as before and now, per field and locale (text part).
def _expected(field: str, locale: str, old: dict[str, Any], new: dict[str, Any]) -> tuple[str, str]:
    if field == "access":
        return OLD_PASSCODE[locale], NEW_PASSCODE[locale]
    if field == "title":
        return (
            (old["title"], new["title"])
            if locale == "de"
            else ("Dialogue on openness", new["title_i18n"]["en"])
        )
    if field == "accessibility":
        return (
            ("Live-Untertitelung", "Gebärdensprachdolmetschung, Live-Untertitelung")
            if locale == "de"
            else ("Live captions", "Sign language interpretation, live captions")
        )
    if field == "time":
        return ("17:00", "18:00") if locale == "de" else ("5:00", "6:00")
    return old[field], new[field]


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("field", TOLD)
def test_a_change_of_one_notified_field_alone_is_reported_with_before_and_now(
    field: str, locale: str, make_settings: Any
) -> None:
    """Only `field` differs from the event before: the notice lists that one change, with the
    old and the new value, in text and HTML (the sample shares its link in the confirmation)."""
    assert field in NOTIFIED
    registration = sample_event_with_everything()
    old = _earlier(registration["event"], field)
    assert notified_changes(Event.model_validate(old), Event.model_validate(registration["event"])) == [field]
    built, _ = preview(make_settings(), "event_changed", registration, locale, previous=old)
    found = parts(built.data)
    before, now = _expected(field, locale, old, registration["event"])
    for value in (before, now):
        assert value in found["text"], (value, found["text"])
        assert str(markupsafe.escape(value)) in found["html"], value
    changes = found["text"].replace("\r\n", "\n").split(DETAILS_HEADING[locale])[0]
    listed = [label for label in CHANGE_LABELS[locale].values() if f"\n{label}:\n" in changes]
    assert listed == [CHANGE_LABELS[locale][field]]


WITHHELD = {
    "access": (
        {"de": "die neuen Zugangsdaten erhalten Sie", "en": "receive the new access details"},
        ("1234", "4711"),
    ),
    "join_url": (
        {"de": "den neuen Link erhalten Sie", "en": "receive the new link"},
        ("https://meet.example.org/alt", "https://meet.example.org/weltoffen"),
    ),
}


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("field", WITHHELD)
def test_a_withheld_link_or_access_details_change_without_showing_them(
    field: str, locale: str, make_settings: Any
) -> None:
    """With join_url_in_confirmation: false a new link or passcode is announced (the reminder
    brings it) and neither the old nor the new value is in text, HTML or calendar file."""
    registration = sample_event_with_everything()
    registration["event"]["join_url_in_confirmation"] = False
    old = _earlier(registration["event"], field)
    built, _ = preview(make_settings(), "event_changed", registration, locale, previous=old)
    found = parts(built.data)
    announcement, values = WITHHELD[field]
    assert announcement[locale] in " ".join(found["text"].split())
    assert announcement[locale] in found["html"]
    for value in values:
        for name in ("text", "html", "ics"):
            assert value not in found[name], (value, name)


def test_a_removed_link_on_a_shared_event_is_not_announced_as_coming_with_the_reminder(
    make_settings: Any,
) -> None:
    """A join link dropped (the event moves on site) shows before and "(keine Angabe)", not the
    promise of a new link that only a withheld link may make."""
    registration = sample_event_with_everything()
    old = copy.deepcopy(registration["event"])
    registration["event"].pop("join_url")
    built, _ = preview(make_settings(), "event_changed", registration, "de", previous=old)
    text = parts(built.data)["text"].replace("\r\n", "\n")
    assert "bisher: https://meet.example.org/weltoffen\n  neu:    (keine Angabe)" in text
    assert "mit der Erinnerung" not in text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("description", "Neue Tagesordnung"),
        ("description_i18n", {"en": "New agenda"}),
        ("url", "https://www.example.org/neu"),
        ("contact", {"phone": "+49 631 365-1"}),
        ("registration_url", "https://anmeldung.example.org/neu"),
        ("organizer", {"name": "Stadtverwaltung Kaiserslautern", "email": "integration@example.org"}),
        ("reminder_offsets", ["PT1H"]),
        # Reads the same in every locale: a German title equal to the main one.
        ("title_i18n", {"de": "Digitaler Dialog zu Weltoffenheit", "en": "Digital dialogue on openness"}),
    ],
)
def test_edits_that_reach_attendees_with_the_next_mail_send_no_notice(field: str, value: Any) -> None:
    """Description, event page, contact, organiser, registration link, reminder offsets: no
    notice of their own (templates/README.md says why), but the operator's log names them."""
    event = sample_event_with_everything()["event"]
    old, new = Event.model_validate(event), Event.model_validate({**event, field: value})
    assert notified_changes(old, new) == []
    assert unnotified_changes(old, new) == ([] if field == "title_i18n" else [field])


async def test_a_running_worker_notifies_each_change_and_only_where_it_shows(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A new passcode alone sends every attendee a notice with old and new passcode; a new
    English title alone reaches the English attendee (the German one is skipped: nothing
    changed in German); a new description alone sends nothing and the log names it."""
    await mail_worker()
    start = datetime.now(BERLIN).replace(microsecond=0) + timedelta(days=10)
    extras = {"access_info": {"meeting_id": "123 456 789", "passcode": "1234"}}
    german = make_event(starts_at=start, event=extras)
    english = make_event(
        starts_at=start, event=extras, event_id="evt-2", registration_id="reg-2",
        email="john@example.org", name="John Smith", locale="en",
    )  # fmt: skip

    def update(number: int, **fields: Any) -> dict[str, Any]:
        event = {**german["event"], **fields}
        return {
            "type": "event.updated",
            "id": f"evt-upd-{number}",
            "occurred_at": (datetime.now(UTC) + timedelta(milliseconds=number)).isoformat(),
            "event": event,
        }

    new_access = {"meeting_id": "123 456 789", "passcode": "4711"}
    async with MailerClient(redis_url) as client:
        await client.publish_many([german, english])
        await wait_for(lambda: len(smtp_server.handler.received) == 2)
        await client.publish(update(1, access_info=new_access))
        await wait_for(lambda: len(smtp_server.handler.received) == 4)
        await client.publish(update(2, access_info=new_access, title_i18n={"en": "Digital dialogue"}))
        await wait_for(lambda: len(smtp_server.handler.received) == 5)
        await client.publish(
            update(3, access_info=new_access, title_i18n={"en": "Digital dialogue"}, description="Neu")
        )
    log = await log_until(
        redis_url,
        lambda log: (
            any(e.source_event == "evt-upd-3" for e in log)
            and any("nothing changed in the attendee's language" in e.detail for e in log)
        ),
    )
    await settled(redis_url)
    assert len(smtp_server.handler.received) == 5
    for address, locale in (("maria.mueller@example.org", "de"), ("john@example.org", "en")):
        notice = parts(smtp_server.handler.to(address)[1].message.as_bytes())
        assert OLD_PASSCODE[locale] in notice["text"]
        assert NEW_PASSCODE[locale] in notice["text"]
        assert NEW_PASSCODE[locale] in notice["ics"]
    (title_notice,) = smtp_server.handler.to("john@example.org")[2:]
    assert title_notice.message["Subject"] == "Event update: Digital dialogue"
    skipped = [e for e in log if "nothing changed in the attendee's language" in e.detail]
    assert [(e.status, e.recipient) for e in skipped] == [("skipped", "maria.mueller@example.org")]
    (quiet,) = [e for e in log if e.source_event == "evt-upd-3"]
    assert quiet.status == "ignored"
    assert quiet.detail.endswith("changed: description"), quiet.detail


@pytest.mark.parametrize("locale", LOCALES)
def test_without_reminders_a_withheld_change_promises_none(locale: str, make_settings: Any) -> None:
    """An event with no reminders (reminder_offsets: []) and its link withheld: the new link is
    announced "in good time", not "with the reminder" that will never come."""
    registration = sample_event_with_everything()
    registration["event"].update(join_url_in_confirmation=False, reminder_offsets=[])
    old = _earlier(registration["event"], "join_url")
    built, _ = preview(make_settings(), "event_changed", registration, locale, previous=old)
    found = parts(built.data)
    for name in ("text", "html"):
        said = " ".join(found[name].split())
        assert {"de": "rechtzeitig vor Beginn.", "en": "in good time before the event."}[locale] in said
        assert {"de": "mit der Erinnerung", "en": "with the reminder"}[locale] not in said
