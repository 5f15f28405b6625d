"""MAILER_ALERT_EMAIL: ops get a mail when the dead letters grow past a threshold, a relay circuit
stays open, or delivery stalls; at most one an hour per cause, each logged as `ops_alert`.

The monitor is driven directly against a real Redis and a real aiosmtpd (a clock the test sets
stands in for the minutes that pass); one test shows a running worker's tick sending the mail.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest

from mailer.clock import iso, ms
from mailer.constants import ALERT_CHECK_KEY, ALERT_QUIET_KEY, DUE_KEY
from mailer.delivery.smtp import SmtpTransport
from mailer.errors import RelayFault
from mailer.intake.client import MailerClient
from mailer.ops.alerts import AlertMonitor
from mailer.settings import Settings
from mailer.state.circuit import RelayCircuit
from mailer.state.deliverylog import DeliveryLog, LogEntry
from mailer.state.logquery import LogFilter, log_page
from mailer.state.queue import connect_client
from mailer.state.redis_types import RedisClient
from tests.clocks import SettableClock
from tests.conftest import SmtpServer, make_event, wait_for
from tests.test_log_cli import run

OPS = "ops@example.org"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = await connect_client(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def monitor(
    redis: RedisClient, smtp_server: SmtpServer, make_settings: Callable[..., Settings], redis_url: str
) -> Callable[..., AlertMonitor]:
    def make(clock: SettableClock | None = None, **overrides: Any) -> AlertMonitor:
        settings = make_settings(
            redis_url=redis_url,
            smtp_host=smtp_server.host,
            smtp_port=smtp_server.port,
            alert_email=OPS,
            **overrides,
        )
        log = log_of(redis)
        transport = SmtpTransport(settings)
        return AlertMonitor(
            redis, settings=settings, transport=transport, log=log, clock=clock or SettableClock()
        )

    return make


def log_of(redis: RedisClient) -> DeliveryLog:
    return DeliveryLog(redis, max_entries=100_000, worker="test-worker")


async def fail(redis: RedisClient, count: int, start: int = 0) -> None:
    """`count` messages whose newest log entry is `failed`: dead letters."""
    log = log_of(redis)
    entries = [
        LogEntry(
            ts=iso(SettableClock().now),
            status="failed",
            message_id=f"reg-{i}/confirmation",
            event_id="evt-1",
            recipient=f"person{i}@example.org",
            smtp_code=550,
            detail="550 5.1.1 no such user",
        )
        for i in range(start, start + count)
    ]
    await log.write(entries)


async def check_now(redis: RedisClient, monitor: AlertMonitor) -> int:
    """One check, as the next tick after the 30 s check lock ran out would make it."""
    await redis.delete(ALERT_CHECK_KEY)
    return await monitor.check()


async def test_dead_letters_past_the_threshold_mail_ops_once_an_hour_and_again_when_they_grow(
    redis: RedisClient, monitor: Callable[..., AlertMonitor], smtp_server: SmtpServer, redis_url: str
) -> None:
    alerts = monitor(alert_dead_letters=3)
    await fail(redis, 2)
    assert await check_now(redis, alerts) == 0  # under the threshold
    await fail(redis, 1, start=2)
    assert await check_now(redis, alerts) == 1
    (mail,) = smtp_server.handler.to(OPS)
    message = mail.message
    assert message["Subject"] == "mailer: 3 Nachrichten endgültig fehlgeschlagen"
    assert message["Auto-Submitted"] == "auto-generated"
    body = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "mailer retry --status failed" in body
    assert "Schwelle 3" in body

    await fail(redis, 5, start=3)
    assert await check_now(redis, alerts) == 0  # within the hour: quiet
    await redis.delete(ALERT_QUIET_KEY.format(cause="dead_letters"))  # the hour has passed
    assert await check_now(redis, alerts) == 1
    assert "8 Nachrichten" in smtp_server.handler.to(OPS)[-1].message["Subject"]
    # An hour later again, and no more dead letters than last told: no news, no mail.
    await redis.delete(ALERT_QUIET_KEY.format(cause="dead_letters"))
    assert await check_now(redis, alerts) == 0

    page = await log_page(redis, LogFilter(kind="ops_alert"), limit=10)
    assert [(e.status, e.recipient, e.kind) for e in page.entries] == [("sent", OPS, "ops_alert")] * 2
    assert page.entries[0].message_id_header  # the Message-ID it carried, for a support question
    shown = await asyncio.to_thread(run, redis_url, "log", "--kind", "ops_alert", "--json")
    assert [orjson.loads(line)["recipient"] for line in shown.stdout.splitlines()] == [OPS, OPS]


async def test_a_relay_circuit_open_past_the_limit_is_one_mail_naming_the_setting(
    redis: RedisClient, monitor: Callable[..., AlertMonitor], smtp_server: SmtpServer
) -> None:
    clock = SettableClock()
    alerts = monitor(clock, alert_circuit_minutes=5, alert_locale="en")
    circuit = RelayCircuit(redis, relay="smtp.example.org:587", base_ms=1000, cap_ms=60_000)
    fault = RelayFault("535 5.7.8 authentication failed", code=535, setting="MAILER_SMTP_PASSWORD")
    await circuit.trip(fault, now_ms=ms(clock()))
    clock.advance(timedelta(minutes=4))
    assert await check_now(redis, alerts) == 0  # not yet five minutes
    clock.advance(timedelta(minutes=2))
    assert await check_now(redis, alerts) == 1
    message = smtp_server.handler.to(OPS)[0].message
    assert message["Subject"] == "mailer: relay smtp.example.org:587 has refused mail for 6 minutes"
    body = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "535 5.7.8 authentication failed" in body
    assert "MAILER_SMTP_PASSWORD" in body
    clock.advance(timedelta(minutes=20))
    assert await check_now(redis, alerts) == 0  # still open, but within the hour


async def test_a_stalled_queue_is_one_mail(
    redis: RedisClient, monitor: Callable[..., AlertMonitor], smtp_server: SmtpServer
) -> None:
    clock = SettableClock()
    alerts = monitor(clock, alert_stall_minutes=15)
    await redis.zadd(DUE_KEY, {"reg-9/confirmation": ms(clock())})
    clock.advance(timedelta(minutes=14))
    assert await check_now(redis, alerts) == 0
    clock.advance(timedelta(minutes=2))
    assert await check_now(redis, alerts) == 1
    subject = smtp_server.handler.to(OPS)[0].message["Subject"]
    assert subject == "mailer: Zustellung stockt seit 16 Minuten"


async def test_an_alert_the_relay_refuses_is_logged_and_tried_again_in_five_minutes(
    redis: RedisClient, monitor: Callable[..., AlertMonitor], smtp_server: SmtpServer
) -> None:
    smtp_server.handler.fault = lambda rcpt, n: "451 4.3.0 try later" if n == 1 else None
    alerts = monitor(alert_dead_letters=1)
    await fail(redis, 1)
    assert await check_now(redis, alerts) == 0
    page = await log_page(redis, LogFilter(kind="ops_alert"), limit=10)
    assert [(e.status, e.smtp_code) for e in page.entries] == [("retrying", 451)]
    ttl = await redis.pttl(ALERT_QUIET_KEY.format(cause="dead_letters"))
    assert 0 < ttl <= 300_000  # five minutes, not the hour
    await redis.delete(ALERT_QUIET_KEY.format(cause="dead_letters"))  # five minutes later
    assert await check_now(redis, alerts) == 1
    assert len(smtp_server.handler.to(OPS)) == 1


async def test_one_worker_checks_at_a_time(redis: RedisClient, monitor: Callable[..., AlertMonitor]) -> None:
    first, second = monitor(alert_dead_letters=1), monitor(alert_dead_letters=1)
    await fail(redis, 1)
    await redis.delete(ALERT_CHECK_KEY)
    assert await first.check() == 1
    await redis.delete(ALERT_QUIET_KEY.format(cause="dead_letters"))
    await fail(redis, 1, start=1)
    assert await second.check() == 0  # the check lock of the first still runs


async def test_without_the_setting_nothing_is_checked(
    redis: RedisClient, make_settings: Callable[..., Settings], redis_url: str, smtp_server: SmtpServer
) -> None:
    settings = make_settings(redis_url=redis_url, smtp_host=smtp_server.host, smtp_port=smtp_server.port)
    alerts = AlertMonitor(redis, settings=settings, transport=SmtpTransport(settings), log=log_of(redis))
    await fail(redis, 50)
    assert await alerts.check() == 0
    assert not await redis.exists(ALERT_CHECK_KEY)


async def test_a_running_worker_mails_ops_when_mail_fails_for_good(
    redis_url: str, smtp_server: SmtpServer, mail_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: attendees' mails refused (550), the worker's tick tells ops by mail."""
    monkeypatch.setattr("mailer.ops.alerts.CHECK_EVERY_MS", 200)  # not 30 s: the test would wait
    smtp_server.handler.fault = lambda rcpt, n: None if rcpt == OPS else "550 5.1.1 no such user"
    await mail_worker(alert_email=OPS, alert_dead_letters=2)
    async with MailerClient(redis_url) as client:
        for i in range(2):
            event = make_event(event_id=f"evt-{i}", registration_id=f"reg-{i}", email=f"gone{i}@example.org")
            await client.publish(event)
    await wait_for(lambda: len(smtp_server.handler.to(OPS)) == 1, within=30)
    assert "2 Nachrichten" in smtp_server.handler.to(OPS)[0].message["Subject"]
