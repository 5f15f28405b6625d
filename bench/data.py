"""The benchmark's input: registrations for one event dated relative to today, and one real message."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from typing import Any

from bench.infra import LOCAL_HOSTNAME, SENDER
from mailer.ops.preview import preview, sample_event
from mailer.settings import Settings, load_settings

_NAMES = ("Maria Müller", "Jürgen Weiß", "Ayşe Yılmaz", "Anna Schmidt", "Björn Köhler")


def bench_settings() -> Settings:
    """mailer's settings as the benchmark's workers get them (MAILER_ variables still apply)."""
    return load_settings(
        _env_file=None,
        MAILER_FROM=SENDER,
        smtp_host="127.0.0.1",
        smtp_security="none",
        smtp_local_hostname=LOCAL_HOSTNAME,
        print_outcomes=False,
    )


def address(run: str, i: int) -> str:
    return f"a{i}.{run}@example.org"


def registrations(
    n: int, *, run: str, days_ahead: int = 14, start: int = 0, today: datetime | None = None
) -> list[dict[str, Any]]:
    """`n` registration.created events for one event, distinct registration ids and addresses.

    The event lies `days_ahead` days after `today` (default: now) by the Berlin calendar: a
    caller that builds the same event twice passes the same `today`, or midnight in Berlin
    between the two calls moves it by a day."""
    base = sample_event(today)
    if days_ahead != 14:
        shift = timedelta(days=days_ahead - 14)
        for name in ("starts_at", "ends_at", "registration_deadline"):
            moved = datetime.fromisoformat(base["event"][name]) + shift
            base["event"][name] = moved.isoformat()
    base["event"]["id"] = f"bench-{run}"
    occurred = datetime.now(UTC).isoformat()
    events = []
    for i in range(start, start + n):
        event = {
            "type": "registration.created",
            "id": f"e-{run}-{i}",
            "occurred_at": occurred,
            "registration": {
                "id": f"r-{run}-{i}",
                "attendee": {"email": address(run, i), "name": _NAMES[i % len(_NAMES)], "locale": "de"},
            },
            # Each event carries its own copy, as records decoded from a queue or file would.
            "event": copy.deepcopy(base["event"]),
        }
        events.append(event)
    return events


def moved_event(registration: dict[str, Any], *, hours: int, version: int) -> dict[str, Any]:
    """An event.updated that moves the registration's event by `hours` (a visible change)."""
    event = copy.deepcopy(registration["event"])
    for name in ("starts_at", "ends_at"):
        event[name] = (datetime.fromisoformat(event[name]) + timedelta(hours=hours)).isoformat()
    occurred = datetime.now(UTC) + timedelta(seconds=version)
    return {
        "type": "event.updated",
        "id": f"upd-{event['id']}-{version}",
        "occurred_at": occurred.isoformat(),
        "event": event,
    }


@dataclass(frozen=True, slots=True)
class SampleMessage:
    """One German confirmation as mailer builds it, and its parts for the naive baseline."""

    data: bytes
    subject: str
    text: str
    html: str
    ics: bytes
    ics_filename: str


def sample_message(settings: Settings) -> SampleMessage:
    """Built once with mailer's own MessageBuilder and compose (through mailer.ops.preview)."""
    built, _ = preview(settings, "confirmation", sample_event(), "de")
    parsed = BytesParser(policy=policy.default).parsebytes(built.data)
    ics, filename = b"", "veranstaltung.ics"
    for part in parsed.walk():
        if part.get_content_type() == "text/calendar":
            ics = part.get_payload(decode=True)  # type: ignore[assignment]
            filename = part.get_filename() or filename
    if not ics:
        raise RuntimeError("the sample confirmation has no calendar attachment")
    return SampleMessage(built.data, built.subject, built.text, built.html, ics, filename)
