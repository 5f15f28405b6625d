"""Previews for template authors: one message of any kind built from one event file or sample data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import ValidationError

from mailer.content.render import Renderer, all_kinds_and_locales
from mailer.delivery.builder import Built, MessageBuilder
from mailer.errors import InvalidEvent, MailerError
from mailer.events import Attendee, Event, RegistrationCreated, parse_event
from mailer.lifecycle.changes import notified_changes
from mailer.lifecycle.kinds import kind_named
from mailer.settings import Settings
from mailer.state.messages import MessageRef
from mailer.state.store import StoredEvent, StoredRegistration


def sample_event(today: datetime | None = None) -> dict[str, Any]:
    """The city's dialog evening, two weeks from today (so samples never lie in the past)."""
    zone = ZoneInfo("Europe/Berlin")
    day = (today or datetime.now(UTC)).astimezone(zone).date() + timedelta(days=14)
    start = datetime(day.year, day.month, day.day, 18, 0, tzinfo=zone)
    deadline = datetime(day.year, day.month, day.day, 23, 59, tzinfo=zone) - timedelta(days=10)
    return {
        "type": "registration.created",
        "id": "evt-sample",
        "occurred_at": datetime.now(UTC).isoformat(),
        "registration": {
            "id": "reg-sample",
            "attendee": {"email": "maria.mueller@example.org", "name": "Maria Müller", "locale": "de"},
        },
        "event": {
            "id": "weltoffen-sample",
            "title": "Digitaler Dialog zu Weltoffenheit",
            "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=2, minutes=30)).isoformat(),
            "timezone": "Europe/Berlin",
            "location": "Online",
            "join_url": "https://meet.example.org/weltoffen",
            "organizer": {"name": "Stadt Kaiserslautern", "email": "integration@example.org"},
            "registration_deadline": deadline.isoformat(),
        },
    }


# Every optional field of the contract, as the city would fill them in.
SAMPLE_OPTIONAL: dict[str, dict[str, Any]] = {
    "registration": {
        "reference": "KL-2026-0815",
        "manage_url": "https://anmeldung.example.org/weltoffen/meine-anmeldung?id=7f3c9a&key=b41e",
    },
    "event": {
        "url": "https://www.example.org/weltoffene-kommune/dialog",
        "description": "Wie weltoffen ist Kaiserslautern? Wo könnten Dinge besser laufen? "
        "Darüber wollen wir mit Ihnen ins Gespräch kommen.",
        "registration_url": "https://anmeldung.example.org/weltoffen",
        "contact": {
            "name": "Büro für Integration",
            "email": "buero.integration@example.org",
            "phone": "+49 631 365-4030",
        },
        "access_info": {
            "platform": "BigBlueButton",
            "meeting_id": "123 456 789",
            "passcode": "4711",
            "dial_in": "+49 69 7104 9922",
        },
        "accessibility": {
            "sign_language": True,
            "captions": True,
            "note": "Unterlagen vorab in Leichter Sprache",
        },
        "title_i18n": {"en": "Digital dialogue on openness"},
        "description_i18n": {
            "en": "How open is Kaiserslautern? What could work better? Let us talk about it together."
        },
    },
}


def sample_event_with_everything(today: datetime | None = None) -> dict[str, Any]:
    """The sample with every optional field of the contract set (SAMPLE_OPTIONAL)."""
    sample = sample_event(today)
    sample["registration"].update(SAMPLE_OPTIONAL["registration"])
    sample["event"].update(SAMPLE_OPTIONAL["event"])
    return sample


def _previous(event: Event) -> Event:
    """Stand-in for the values before a change: an hour earlier, in the town hall."""
    return event.model_copy(
        update={
            "starts_at": event.starts_at - timedelta(hours=1),
            "ends_at": event.ends_at - timedelta(hours=1),
            "location": "Rathaus, Großer Sitzungssaal",
        }
    )


def sample_previous(registration: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for the event before a change, as JSON: an hour earlier, in the town hall.

    For sample data only (`templates check`, template tests); a real preview of a change
    notice takes the real old event (`mailer render event_changed --previous FILE`).
    """
    return _previous(Event.model_validate(registration["event"])).model_dump(mode="json", exclude_none=True)


def preview(
    settings: Settings,
    kind: str,
    event_json: bytes | dict[str, Any],
    locale: str | None,
    *,
    previous: bytes | dict[str, Any] | Event | None = None,
) -> tuple[Built, str]:
    """Build one message of `kind` for the registration in `event_json`, as the pipeline would.

    `previous` is the event as it was before its latest change (required for a change notice,
    whose "before" column it fills). The calendar SEQUENCE follows the planner's rules: a
    visible change and the event's cancellation each raise the version.
    """
    incoming = parse_event(event_json)
    if not isinstance(incoming, RegistrationCreated):
        raise InvalidEvent([], event_id=incoming.id) from None
    attendee: Attendee = incoming.registration.attendee
    if locale:
        attendee = attendee.model_copy(update={"locale": locale})
    event = incoming.event
    row = kind_named(kind)
    before = _old_event(previous)
    if row.shows_changes and before is None:
        raise MailerError(
            f"a {kind} notice shows what changed: give the event as it was with --previous FILE"
        )
    changed = before is not None and bool(notified_changes(before, event))
    stored = StoredEvent(
        event=event,
        version=1 + changed + (row.event == "cancelled"),
        occurred_ms=0,
        status=row.event or "active",
        previous=before if changed else None,
    )
    given = incoming.registration
    reg = StoredRegistration(
        given.id, attendee, event.id, row.registration, 0, 0, given.reference, given.manage_url
    )
    disc = row.preview_disc(stored, settings.reminder_offsets) if row.preview_disc else ""
    ref = MessageRef(reg.id, row.name, disc)
    builder = MessageBuilder(settings=settings, renderer=Renderer(settings.template_dir))
    now = datetime.now(UTC)
    return builder.build(ref, reg, stored, now), attendee.locale


def _old_event(previous: bytes | dict[str, Any] | Event | None) -> Event | None:
    if previous is None or isinstance(previous, Event):
        return previous
    try:
        if isinstance(previous, bytes):
            return Event.model_validate_json(previous)
        return Event.model_validate(previous)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "event"
        raise MailerError(f"--previous: {where}: {error['msg']}") from None


def check_all(settings: Settings) -> list[tuple[str, str, str]]:
    """(kind, locale, problem or "") for every template pair, rendered against sample data."""
    results = []
    # Both samples: the optional fields' branches must render too.
    samples = (sample_event(), sample_event_with_everything())
    for kind, locale in all_kinds_and_locales():
        try:
            for sample in samples:
                before = sample_previous(sample) if kind_named(kind).shows_changes else None
                built, _ = preview(settings, kind, sample, locale, previous=before)
                if not built.text.strip() or "<html" not in built.html:
                    raise MailerError("rendered an empty text or HTML part")
            results.append((kind, locale, ""))
        except MailerError as exc:
            results.append((kind, locale, str(exc)))
    return results
