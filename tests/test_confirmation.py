"""The spine end to end: publish → queue → worker → templated mail at a real SMTP server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import icalendar
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer.errors import InvalidEvent
from mailer.intake.client import MailerClient, SyncMailerClient
from mailer.state.logquery import read_log
from mailer.state.queue import connect
from tests.conftest import BERLIN, event_day, log_until, make_event, wait_for


async def log_entries(url: str) -> list[Any]:
    redis = await connect(url)
    try:
        return [e async for e in read_log(redis, newest_first=False)]
    finally:
        await redis.aclose()


async def test_registration_yields_a_german_confirmation_with_calendar(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A registration.created event becomes one German mail with text, HTML and an .ics at 18:00 Berlin."""
    await mail_worker()
    start = event_day(15)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(starts_at=start))

    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    got = smtp_server.handler.received[0]
    assert got.rcpt_tos == ["maria.mueller@example.org"]
    assert got.mail_from == "noreply@example.org"
    msg = got.message
    assert msg["To"].addresses[0].display_name == "Maria Müller"
    assert msg["From"].addresses[0].display_name == "Stadt Kaiserslautern"
    assert msg["Reply-To"].addresses[0].addr_spec == "integration@example.org"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "Digitaler Dialog zu Weltoffenheit" in msg["Subject"]
    text = msg.get_body(("plain",)).get_content()
    html = msg.get_body(("html",)).get_content()
    weekday = {
        0: "Montag",
        1: "Dienstag",
        2: "Mittwoch",
        3: "Donnerstag",
        4: "Freitag",
        5: "Samstag",
        6: "Sonntag",
    }[start.weekday()]
    german_date = f"{weekday}, {start.day}. "
    assert german_date in text
    assert "18:00–20:30 Uhr" in text
    assert german_date in html
    assert "https://meet.example.org/weltoffen" in html
    assert "https://meet.example.org/weltoffen" in text
    attachments = [p for p in msg.iter_attachments() if p.get_content_type() == "text/calendar"]
    assert len(attachments) == 1
    calendar = icalendar.Calendar.from_ical(attachments[0].get_content())
    vevent = next(iter(calendar.walk("VEVENT")))
    dtstart = vevent.decoded("DTSTART")
    assert dtstart == start
    assert dtstart.astimezone(BERLIN).hour == 18
    assert str(vevent["SUMMARY"]) == "Digitaler Dialog zu Weltoffenheit"

    # The `sent` entry is written just after the server's 250: wait for it, not for a moment.
    entries = await log_until(redis_url, lambda log: any(e.status == "sent" for e in log))
    sent = [e for e in entries if e.status == "sent"]
    assert len(sent) == 1
    assert sent[0].kind == "confirmation"
    assert sent[0].registration_id == "reg-1001"
    assert sent[0].recipient == "maria.mueller@example.org"
    assert sent[0].attempt == 1


async def test_same_event_id_twice_sends_one_mail(redis_url: str, smtp_server: Any, mail_worker: Any) -> None:
    """The producer's id is the idempotency key, however long apart the two deliveries are."""
    await mail_worker()
    event = make_event()
    async with MailerClient(redis_url) as client:
        await client.publish(event)
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
        # The same id again, long after the first was applied.
        await client.publish(event)
        again = dict(event, id="evt-other-id-same-registration")
        await client.publish(again)
    entries = await log_until(redis_url, lambda log: sum(e.status == "ignored" for e in log) >= 2)
    assert len(smtp_server.handler.received) == 1
    assert any(e.status == "ignored" and "replay" in e.detail for e in entries)


async def test_html_escapes_markup_in_title(redis_url: str, smtp_server: Any, mail_worker: Any) -> None:
    """A <script> in the title reaches the HTML part escaped, and the text part as written."""
    await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(title="Dialog <script>alert(1)</script> & mehr"))
    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    msg = smtp_server.handler.received[0].message
    html = msg.get_body(("html",)).get_content()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "<script>alert(1)</script>" in msg.get_body(("plain",)).get_content()


ABSENT = object()  # as a value in `change`: the field is left out of the event


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (
            {"registration": {"id": "reg-1", "attendee": {"email": "not-an-address"}}},
            "registration.attendee.email",
            "not a valid email",
        ),
        (
            {
                "registration": {
                    "id": "reg-1",
                    "attendee": {"email": "a@example.org", "name": "Eve\r\nBcc: x@evil"},
                }
            },
            "registration.attendee.name",
            "control characters",
        ),
        ({"event": None}, "event", "valid dictionary"),
        ({"event": ABSENT}, "event", "is required"),
        ({"type": "registration.deleted"}, "type", "must be one of"),
    ],
)
async def test_invalid_events_are_refused_with_field_and_reason(
    redis_url: str, change: dict[str, Any], field: str, fragment: str
) -> None:
    """Bad input fails at the producer with the field and the reason, and nothing is enqueued."""
    event = make_event()
    event.update(change)
    for name in [name for name, value in change.items() if value is ABSENT]:
        del event[name]
    async with MailerClient(redis_url) as client:
        with pytest.raises(InvalidEvent) as caught:
            await client.publish(event)
        report = await client.publish_many([event, make_event(event_id="ok", registration_id="reg-ok")])
    problems = {p.field: p.reason for p in caught.value.problems}
    assert field in problems, problems
    assert fragment in problems[field]
    assert report.accepted == 1
    assert [i for i, _ in report.invalid] == [0]


def test_an_invalid_event_is_refused_by_a_client_that_has_not_connected_yet(redis_url: str) -> None:
    """The sync client connects lazily: its first call may be a refusal, logged like any other."""
    with SyncMailerClient(redis_url) as client, pytest.raises(InvalidEvent):
        client.publish(dict(make_event(), type="registration.exploded"))


async def test_garbage_in_the_queue_is_rejected_and_logged(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Bytes that are no job, an unknown function and a contract-breaking event: logged, worker goes on."""
    await mail_worker()
    redis = await connect(redis_url)
    try:
        now = 1  # arq skips a job whose score is 0 (it reads it as "not queued")
        for job_id, body in [
            ("junk", b"\x80\x03garbage"),
            ("unknown", b'{"f":"rm_rf","a":[],"k":{}}'),
            ("badevent", b'{"f":"ingest","a":[],"k":{"events":[{"type":"registration.created"}]}}'),
        ]:
            await redis.set(f"arq:job:{job_id}", body)
            await redis.zadd("mailer:queue", {job_id: now})
    finally:
        await redis.aclose()
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    entries = await log_until(redis_url, lambda log: sum(e.status == "rejected" for e in log) >= 3)
    rejected = [e.detail for e in entries if e.status == "rejected"]
    assert len(rejected) == 3, rejected
    assert any("not valid JSON" in d for d in rejected)
    assert any("rm_rf" in d for d in rejected)
    assert any("registration" in d for d in rejected)


async def test_event_that_already_started_gets_no_confirmation(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Nothing but cancellations is sent after the start; the log says why."""
    from datetime import UTC, datetime

    await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(starts_at=datetime.now(UTC) - timedelta(minutes=5)))
    entries = await log_until(redis_url, bool)
    assert [e.status for e in entries] == ["skipped"]
    assert "started" in entries[0].detail
    assert smtp_server.handler.received == []


@given(
    st.one_of(
        st.emails(),
        st.builds("{}@example.org".format, st.text(min_size=1, max_size=40)),
        st.from_regex(r"[a-zA-Z0-9._%+\-]{1,70}@[a-zA-Z0-9\-ü.]{1,30}\.[a-z]{2,6}", fullmatch=True),
    )
)
def test_fast_address_check_agrees_with_email_validator(address: str) -> None:
    """The per-domain cache gives email-validator's verdict and normal form for every address."""
    from email_validator import EmailNotValidError, validate_email

    from mailer.events import _normalise_email

    try:
        expected: str | None = validate_email(
            address, check_deliverability=False, allow_smtputf8=False
        ).ascii_email
    except EmailNotValidError:
        expected = None
    try:
        got: str | None = _normalise_email(address)
    except ValueError:
        got = None
    assert got == expected


async def test_internationalised_domain_is_sent_in_ascii_form(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """juergen@bücher.example goes out to juergen@xn--bcher-kva.example, in the envelope and in To."""
    await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish(make_event(email="juergen@bücher.example", name="Jürgen Groß"))
    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    got = smtp_server.handler.received[0]
    assert got.rcpt_tos == ["juergen@xn--bcher-kva.example"]
    assert got.message["To"].addresses[0].addr_spec == "juergen@xn--bcher-kva.example"
    assert got.message["To"].addresses[0].display_name == "Jürgen Groß"
