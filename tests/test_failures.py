"""Failures: SMTP replies classified, transient ones retried, permanent ones dead-lettered and re-driven."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer.delivery.retry import backoff_seconds, enhanced_code, is_transient
from mailer.intake.client import MailerClient
from tests.conftest import log_until, make_event, settled, wait_for
from tests.test_confirmation import log_entries


async def entries_for(url: str, message_id: str = "reg-1001/confirmation") -> list[Any]:
    return [e for e in await log_entries(url) if e.message_id == message_id]


async def statuses(url: str, message_id: str) -> list[str]:
    return [e.status for e in await entries_for(url, message_id)]


async def mailer_retry(redis_url: str, *args: str) -> tuple[int | None, bytes, bytes]:
    """`mailer retry ARGS` as its own process against this Redis: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailer",
        "retry",
        *args,
        env={**os.environ, "MAILER_REDIS_URL": redis_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode, out, err


async def publish_one_and_wait_for_delivery(url: str, smtp_server: Any) -> list[Any]:
    """Publish the standard registration, wait for its mail; its confirmation's log entries."""
    async with MailerClient(url) as client:
        await client.publish(make_event())
    await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)
    # The `sent` entry is written just after the server's 250.
    await log_until(url, lambda log: any(e.status == "sent" for e in log))
    return await entries_for(url)


async def test_greylisting_is_retried_until_accepted(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """451 twice, then 250: two `retrying` entries with the SMTP codes, then `sent`, one mail."""
    smtp_server.handler.fault = lambda rcpt, n: "451 4.7.1 Greylisted, try later" if n <= 2 else None
    await mail_worker()
    entries = await publish_one_and_wait_for_delivery(redis_url, smtp_server)
    assert [e.status for e in entries] == ["retrying", "retrying", "sent"]
    assert entries[0].smtp_code == 451
    assert entries[0].enhanced_code == "4.7.1"
    assert [e.attempt for e in entries] == [1, 2, 3]


async def test_unknown_user_fails_permanently_and_can_be_redriven(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """550 5.1.1 is never retried; `mailer retry` sends it again with the same Message-ID."""
    rejecting = {"on": True}
    smtp_server.handler.fault = lambda rcpt, n: "550 5.1.1 User unknown" if rejecting["on"] else None
    await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await log_until(redis_url, lambda log: any(e.status == "failed" for e in log))
    await settled(redis_url)  # final: nothing will try it again
    assert await statuses(redis_url, "reg-1001/confirmation") == ["failed"]
    assert smtp_server.handler.attempts["maria.mueller@example.org"] == 1

    rejecting["on"] = False
    returncode, out, err = await mailer_retry(redis_url, "--status", "failed")
    assert returncode == 0, err
    assert b"re-driven 1" in out
    await wait_for(lambda: len(smtp_server.handler.received) == 1)
    assert (await statuses(redis_url, "reg-1001/confirmation"))[-2:] == ["redriven", "sent"]


async def test_retry_of_a_sent_message_is_refused_and_sends_nothing(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """`mailer retry MESSAGE_ID` plans a message again only from failed or skipped: a sent one
    is named with its status, exit 1, and the attendee gets no second copy."""
    await mail_worker()
    await publish_one_and_wait_for_delivery(redis_url, smtp_server)
    await settled(redis_url)
    returncode, out, err = await mailer_retry(redis_url, "reg-1001/confirmation", "reg-1001/reminder/P1D")
    assert returncode == 1
    assert b"re-driven 0 message(s)" in out
    assert b"reg-1001/confirmation not re-driven: it is sent" in err
    assert b"reg-1001/reminder/P1D not re-driven: mailer has no such message" in err
    assert b"Traceback" not in err
    await settled(redis_url)
    assert len(smtp_server.handler.received) == 1
    assert await statuses(redis_url, "reg-1001/confirmation") == ["sent"]


async def test_server_down_then_back_loses_nothing(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Connection refused is the relay's fault: the mail is held, and goes out once it is back."""
    smtp_server.controller.stop()
    await mail_worker()
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await log_until(redis_url, lambda log: any(e.status == "held" for e in log))
    # A new server on the same port, as after a relay's maintenance window.
    from aiosmtpd.controller import Controller

    revived = Controller(
        smtp_server.handler, hostname=smtp_server.host, port=smtp_server.port, decode_data=False
    )
    revived.start()
    smtp_server.controller = revived
    await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)


# Reply texts that carry no enhanced code, so the basic code alone decides.
plain_texts = st.text(max_size=30).filter(lambda text: enhanced_code(text) is None)


@given(st.sampled_from([421, 432, 450, 451, 452]), st.sampled_from(["", "4.0.0 ", "4.7.1 "]), plain_texts)
def test_4xx_replies_are_transient(code: int, enhanced: str, text: str) -> None:
    """Any 4xx is worth retrying, whether or not an agreeing enhanced code comes with it."""
    assert is_transient(code, enhanced + text)


@given(
    st.sampled_from([550, 551, 552, 553, 554]),
    st.one_of(st.none(), st.tuples(st.integers(0, 9), st.integers(0, 9))),
    plain_texts,
)
def test_5xx_replies_are_permanent(code: int, detail: tuple[int, int] | None, text: str) -> None:
    """Any 5xx is final, whether or not an agreeing enhanced code comes with it."""
    enhanced = f"5.{detail[0]}.{detail[1]}" if detail else None
    reply = f"{enhanced} {text}" if enhanced else text
    assert not is_transient(code, reply)
    assert enhanced_code(reply) == enhanced


def test_enhanced_code_wins_over_the_basic_code() -> None:
    """Greylisting sent as "550 4.7.1" is transient."""
    assert is_transient(550, "4.7.1 try again later")


@given(st.integers(1, 50), st.floats(0.1, 100), st.floats(100, 10_000))
def test_backoff_stays_within_the_full_jitter_window(attempt: int, base: float, cap: float) -> None:
    """Each retry delay lies in the full-jitter window [0, min(cap, base·2^(attempt-1))]."""
    delay = backoff_seconds(attempt, base=base, cap=cap)
    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1))


async def test_attempts_run_out_and_the_message_is_dead_lettered(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A relay that keeps greylisting: after MAILER_MAX_ATTEMPTS the message is `failed`, not retried."""
    smtp_server.handler.fault = lambda rcpt, n: "451 4.7.1 try later"
    await mail_worker(max_attempts=2)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await log_until(redis_url, lambda log: any(e.status == "failed" for e in log))
    entries = await entries_for(redis_url)
    assert [e.status for e in entries] == ["retrying", "failed"]
    assert "no attempts or time left" in entries[-1].detail


async def test_a_template_that_fails_on_this_data_fails_permanently(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any, tmp_path: Any
) -> None:
    """An operator's template error is logged as `failed` with the template's message, never retried."""
    broken = tmp_path / "tpl" / "confirmation"
    broken.mkdir(parents=True)
    (broken / "subject.de.txt").write_text("{{ attendee.phone }}")
    settings = make_settings(
        redis_url=redis_url,
        smtp_host=smtp_server.host,
        smtp_port=smtp_server.port,
        template_dir=tmp_path / "tpl",
    )
    await running_worker(settings)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await log_until(redis_url, bool)
    await settled(redis_url)  # final: nothing will try it again
    entries = await entries_for(redis_url)
    assert [e.status for e in entries] == ["failed"]
    assert "subject.de.txt" in entries[0].detail
    assert "phone" in entries[0].detail
    assert smtp_server.handler.received == []


@given(st.integers(1, 40), st.floats(0.1, 100), st.floats(100, 10_000))
def test_backoff_window_grows_monotonically_up_to_the_cap(attempt: int, base: float, cap: float) -> None:
    """The jitter window doubles per attempt and never exceeds MAILER_RETRY_MAX_SECONDS."""
    top = _TopOfWindow()
    now, later = (backoff_seconds(n, base=base, cap=cap, rng=top) for n in (attempt, attempt + 1))
    assert now <= later <= cap
    assert later == min(cap, base * 2**attempt)


class _TopOfWindow(random.Random):
    """A 'random' source that always picks the top of the window, to read the window itself."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_an_ingest_job_that_raises_is_retried_then_its_events_are_logged_as_rejected(
    redis_url: str, make_settings: Any
) -> None:
    """arq drops a job that raised, and a batch's events exist nowhere else: mailer retries it
    with back-off, and after INGEST_TRIES writes every event off in the delivery log."""
    from arq.worker import Retry

    from mailer import jobs
    from mailer.content.render import Renderer
    from mailer.state.queue import connect
    from mailer.worker import build_transport, build_worker

    settings = make_settings(redis_url=redis_url)
    redis = await connect(redis_url)
    transport = build_transport(settings)
    try:
        worker = build_worker(settings, redis, transport=transport, renderer=Renderer(settings.template_dir))
        ctx: dict[str, Any] = {}
        await worker.on_startup(ctx)  # type: ignore[misc]
        # Someone else's data under mailer's key: every read of this registration fails.
        await redis.set("mailer:reg:reg-1001", "not a hash")
        event = make_event()
        with pytest.raises(Retry) as retry:
            await jobs.ingest({**ctx, "job_try": 1}, events=[event])
        assert retry.value.defer_score == 2000
        result = await jobs.ingest({**ctx, "job_try": jobs.INGEST_TRIES}, events=[event])
        assert result == {"rejected": 1}
        (entry,) = [e for e in await log_entries(redis_url) if e.status == "rejected"]
        assert entry.source_event == event["id"]
        assert "could not be applied in 12 tries" in entry.detail
        assert "WRONGTYPE" in entry.detail
    finally:
        await transport.close()
        await redis.aclose()


async def test_a_transport_that_raises_costs_only_its_own_message(
    redis_url: str, make_settings: Any, running_worker: Any
) -> None:
    """A transport raising something that is not a DeliveryError (a bug, for one recipient) makes
    that message `retrying` as uncertain, with the error named; the other messages of the batch
    go out, and no job raises (running_worker fails the test if one did)."""
    from mailer.delivery.maildir import MaildirTransport

    settings = make_settings(redis_url=redis_url, smtp_max_connections=2, max_attempts=2)

    class BuggyForOne(MaildirTransport):
        async def send(self, *, sender: str, recipient: str, data: bytes) -> Any:
            if recipient.startswith("bug@"):
                raise RuntimeError("a bug in the transport")
            return await super().send(sender=sender, recipient=recipient, data=data)

    await running_worker(settings, transport=BuggyForOne(settings.effective_outbox_dir))
    events = [
        make_event(event_id=f"evt-{n}", registration_id=f"reg-{n}", email=f"{who}@example.org")
        for n, who in enumerate(["bug", "ok", "fine"])
    ]
    async with MailerClient(redis_url) as client:
        await client.publish_many(events)
    log = await log_until(
        redis_url,
        lambda log: (
            {e.message_id for e in log if e.status == "sent"} == {"reg-1/confirmation", "reg-2/confirmation"}
            and any(e.message_id == "reg-0/confirmation" and e.status == "retrying" for e in log)
        ),
    )
    bug = next(e for e in log if e.message_id == "reg-0/confirmation" and e.status == "retrying")
    assert "RuntimeError: a bug in the transport" in bug.detail
