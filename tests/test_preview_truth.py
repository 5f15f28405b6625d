"""`mailer render` shows what the pipeline sends for the same input: the same text and the same
calendar SEQUENCE, with a change notice built from the real old event, not invented values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email import policy
from email.parser import BytesParser
from typing import Any

import icalendar
import pytest

from mailer.intake.client import MailerClient
from mailer.ops.preview import preview
from tests.conftest import make_event, wait_for


def _parts(data: bytes) -> tuple[str, int | None]:
    message = BytesParser(policy=policy.default).parsebytes(data)
    text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    sequence = None
    for part in message.walk():
        if part.get_content_type() == "text/calendar":
            calendar = icalendar.Calendar.from_ical(part.get_content())
            sequence = int(next(iter(calendar.walk("VEVENT")))["SEQUENCE"])
    return text, sequence


def _moved(event: dict[str, Any], hours: int) -> dict[str, Any]:
    shift = timedelta(hours=hours)
    return dict(
        event,
        starts_at=(datetime.fromisoformat(event["starts_at"]) + shift).isoformat(),
        ends_at=(datetime.fromisoformat(event["ends_at"]) + shift).isoformat(),
    )


def _now() -> str:
    return datetime.now(UTC).isoformat()


async def test_preview_and_pipeline_send_the_same_mail(
    redis_url: str, smtp_server: Any, mail_worker: Any, make_settings: Any
) -> None:
    """Through the real pipeline: a registration, a time change, the registration's
    cancellation; and for another event a registration and the event's cancellation. `preview`
    of each kind from the same input gives the same text and SEQUENCE as the mail sent."""
    await mail_worker()
    first = make_event(event_id="t-1", registration_id="t-r1", email="t1@example.org")
    moved = _moved(first["event"], 1)
    other = make_event(event_id="u-1", registration_id="u-r1", email="u1@example.org", id="other-evening")
    async with MailerClient(redis_url) as client:
        for event in (
            first,
            {"type": "event.updated", "id": "t-2", "occurred_at": _now(), "event": moved},
            {
                "type": "registration.cancelled",
                "id": "t-3",
                "occurred_at": _now(),
                "registration": {"id": "t-r1"},
            },
            other,
            {"type": "event.cancelled", "id": "u-2", "occurred_at": _now(), "event": {"id": "other-evening"}},
        ):
            count = len(smtp_server.handler.received)
            await client.publish(event)
            await wait_for(lambda count=count: len(smtp_server.handler.received) == count + 1)
    sent = {(r.rcpt_tos[0], r.message["X-Mailer-Kind"]): r.data for r in smtp_server.handler.received}
    settings = make_settings()
    cases = [
        ("t1@example.org", "confirmation", first, {}),
        ("t1@example.org", "event_changed", dict(first, event=moved), {"previous": first["event"]}),
        ("t1@example.org", "registration_cancelled", dict(first, event=moved), {"previous": first["event"]}),
        ("u1@example.org", "confirmation", other, {}),
        ("u1@example.org", "event_cancelled", other, {}),
    ]
    for recipient, kind, registration, extra in cases:
        built, _ = preview(settings, kind, registration, "de", **extra)
        assert _parts(built.data) == _parts(sent[(recipient, kind)]), kind


def test_a_change_notice_preview_needs_the_old_event(make_settings: Any) -> None:
    """Without the event as it was, a change notice would show invented old values."""
    from mailer.errors import MailerError
    from mailer.ops.preview import sample_event

    with pytest.raises(MailerError, match="--previous"):
        preview(make_settings(), "event_changed", sample_event(), "de")
