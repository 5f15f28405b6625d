"""Crash safety with real processes: SIGKILL mid-burst, SIGTERM, Redis killed under a running worker."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest

from mailer.intake.client import MailerClient
from mailer.state.queue import connect
from mailer.state.throttle import Throttle
from tests.conftest import make_event, settled, wait_for
from tests.test_confirmation import log_entries
from tests.test_failures import publish_one_and_wait_for_delivery


def burst(n: int, prefix: str = "p") -> list[dict[str, Any]]:
    return [
        make_event(
            event_id=f"{prefix}-e{i}", registration_id=f"{prefix}-r{i}", email=f"{prefix}{i}@example.org"
        )
        for i in range(n)
    ]


async def test_worker_killed_mid_burst_loses_nothing_and_duplicates_only_uncertain(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """SIGKILL during 500 mails, restart: everyone gets theirs; any second copy is logged `uncertain`."""
    smtp_server.handler.delay = 0.004
    first = worker_process(redis_url, smtp_server)
    async with MailerClient(redis_url) as client:
        report = await client.publish_many(burst(500))
    assert report.accepted == 500
    await wait_for(lambda: len(smtp_server.handler.received) >= 150, 30)
    first.kill()
    at_kill = len(smtp_server.handler.received)
    worker_process(redis_url, smtp_server)
    received = smtp_server.handler
    await wait_for(lambda: len({r.rcpt_tos[0] for r in received.received}) == 500, 60, 0.1)
    await settled(redis_url)  # sends left `sending` by the killed worker are resent or final
    copies = Counter(r.rcpt_tos[0] for r in received.received)
    duplicates = {address for address, n in copies.items() if n > 1}
    entries = await log_entries(redis_url)
    uncertain = {e.recipient for e in entries if e.status == "uncertain"}
    print(
        f"\nkill mid-burst: received before kill {at_kill}, delivered {len(copies)}/500, "
        f"copies {sum(copies.values())}, duplicates {len(duplicates)}, marked uncertain {len(uncertain)}, "
        f"lost {500 - len(copies)}"
    )
    assert len(copies) == 500
    assert duplicates <= uncertain
    # Bounded by the sends in flight when it died.
    assert len(uncertain) <= 3  # MAILER_SMTP_MAX_CONNECTIONS: one message per held connection


async def test_sigterm_finishes_sends_in_flight_and_exits_zero(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """SIGTERM mid-burst: exit status 0, nothing half-sent; a new worker delivers the rest once each."""
    smtp_server.handler.delay = 0.004
    first = worker_process(redis_url, smtp_server)
    async with MailerClient(redis_url) as client:
        await client.publish_many(burst(300, "t"))
    await wait_for(lambda: len(smtp_server.handler.received) >= 50, 30)
    assert await asyncio.to_thread(first.stop) == 0
    worker_process(redis_url, smtp_server)
    await wait_for(lambda: len({r.rcpt_tos[0] for r in smtp_server.handler.received}) == 300, 60, 0.1)
    await settled(redis_url)
    copies = Counter(r.rcpt_tos[0] for r in smtp_server.handler.received)
    assert max(copies.values()) == 1
    assert not [e for e in await log_entries(redis_url) if e.status == "uncertain"]


async def test_redis_killed_under_a_running_worker(
    own_redis: Any, smtp_server: Any, worker_process: Any
) -> None:
    """Redis dies hard in the middle of a burst and comes back: the same worker process reconnects,
    queued and new mail all arrive, and its log says so in one line per event, without a traceback."""
    smtp_server.handler.delay = 0.01  # stretch the burst so Redis dies under running jobs
    worker = worker_process(own_redis.url, smtp_server)
    pid = worker.process.pid
    async with MailerClient(own_redis.url) as client:
        await client.publish_many(burst(100, "a"))
    await wait_for(lambda: len(smtp_server.handler.received) >= 10, 30, 0.02)
    own_redis.kill()
    await asyncio.sleep(1.5)  # the outage itself
    assert worker.alive
    own_redis.start()
    async with MailerClient(own_redis.url) as client:
        await client.publish_many(burst(50, "b"))
    await wait_for(lambda: len({r.rcpt_tos[0] for r in smtp_server.handler.received}) == 150, 60, 0.1)
    assert worker.alive
    assert worker.process.pid == pid
    log = worker.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]


async def test_enqueue_fails_clearly_when_redis_is_unreachable(tmp_path: Any) -> None:
    """Nothing is reported as enqueued when Redis is not there: a clear message and exit status 3."""
    from tests.conftest import free_port

    source = tmp_path / "one.json"
    import orjson

    source.write_bytes(orjson.dumps(make_event()))
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mailer", "enqueue", str(source)],
        env={"MAILER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 3
    assert b"cannot reach Redis" in result.stderr
    assert b"enqueued" not in result.stderr


async def test_a_dropped_connection_mid_data_is_retried_as_uncertain(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """The server drops the connection during DATA: outcome unknown, retried, then delivered."""
    smtp_server.handler.fault = lambda rcpt, n: "drop" if n == 1 else None
    await mail_worker()
    entries = await publish_one_and_wait_for_delivery(redis_url, smtp_server)
    assert [e.status for e in entries] == ["retrying", "sent"]
    assert "outcome unknown" in entries[0].detail


async def test_a_stalled_server_times_out_and_the_mail_is_retried(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A server that stops answering past MAILER_SMTP_TIMEOUT: the client is closed, the mail retried."""
    smtp_server.handler.fault = lambda rcpt, n: "stall" if n == 1 else None
    await mail_worker(smtp_timeout=0.5)
    entries = await publish_one_and_wait_for_delivery(redis_url, smtp_server)
    assert [e.status for e in entries] == ["retrying", "sent"]


async def test_rate_limit_is_shared_through_redis(redis_url: str) -> None:
    """Two workers' throttles see one rate window, because it lives in Redis."""
    redis = await connect(redis_url)
    try:
        one = Throttle(redis, per_minute=5)
        two = Throttle(redis, per_minute=5)
        now = int(datetime.now(UTC).timestamp() * 1000)
        granted, _ = await one.grant(3, now)
        assert granted == 3
        granted, next_window = await two.grant(4, now)
        assert granted == 2
        assert next_window > now
        assert (await one.grant(1, now))[0] == 0
    finally:
        await redis.aclose()


async def test_worker_killed_during_a_reminder_fan_out(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """A reminder due for 300 people, the worker killed while it goes out: each gets it, at most
    the uncertain ones twice."""
    from datetime import timedelta

    start = datetime.now(UTC) + timedelta(hours=1, seconds=4)
    events = [
        make_event(
            event_id=f"f-e{i}",
            registration_id=f"f-r{i}",
            email=f"f{i}@example.org",
            starts_at=start,
            reminder_offsets=["PT1H"],
        )
        for i in range(300)
    ]
    first = worker_process(redis_url, smtp_server)
    async with MailerClient(redis_url) as client:
        await client.publish_many(events)
    await wait_for(lambda: len(smtp_server.handler.received) == 300, 30, 0.05)
    smtp_server.handler.delay = 0.004

    def reminders() -> list[str]:
        # Polled every few ms while the server receives: a byte search, not a parse of every mail
        # (parsing them all starved the in-process SMTP server until the send jobs timed out).
        marker = b"\nX-Mailer-Kind: reminder\r\n"
        return [r.rcpt_tos[0] for r in smtp_server.handler.received if marker in r.data]

    await wait_for(lambda: len(reminders()) >= 60, 30, 0.02)
    first.kill()
    worker_process(redis_url, smtp_server)
    await wait_for(lambda: len(set(reminders())) == 300, 60, 0.1)
    await settled(redis_url)  # sends left `sending` by the killed worker are resent or final
    copies = Counter(reminders())
    uncertain = {e.recipient for e in await log_entries(redis_url) if e.status == "uncertain"}
    assert {a for a, n in copies.items() if n > 1} <= uncertain
    assert len(uncertain) <= 3


async def test_a_planned_message_whose_job_was_lost_is_redriven(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> None:
    """State says planned but no job exists (a lost job, an old snapshot): the reconciler sends it."""
    from mailer.events import parse_event
    from mailer.lifecycle.planner import Planner
    from mailer.lifecycle.scheduler import Scheduler

    settings = make_settings(redis_url=redis_url, smtp_host=smtp_server.host, smtp_port=smtp_server.port)
    redis = await connect(redis_url)
    try:
        plan = await Planner(redis, default_offsets=settings.reminder_offsets).apply(
            [parse_event(make_event())]
        )
        assert [r.id for r in plan.deliver_now] == ["reg-1001/confirmation"]  # planned, never sent
        later = int(datetime.now(UTC).timestamp() * 1000) + 31_000  # past the re-check grace
        assert await Scheduler(redis, batch_size=50).redrive_due(now_ms=later) == 1
    finally:
        await redis.aclose()
    await running_worker(settings)
    await wait_for(lambda: len(smtp_server.handler.received) == 1)


async def test_a_job_hit_by_a_redis_outage_is_one_warning_not_a_traceback(
    own_redis: Any, make_settings: Any, caplog: Any
) -> None:
    """Redis gone under the tick, a send or a drain: a warning line and a retry (send) or the next
    tick (tick, drain); never an exception for arq to log with a traceback."""
    import logging

    from arq.worker import Retry

    from mailer import jobs
    from mailer.content.render import Renderer
    from mailer.worker import build_transport, build_worker

    settings = make_settings(redis_url=own_redis.url)
    redis = await connect(own_redis.url)
    worker = build_worker(
        settings, redis, transport=build_transport(settings), renderer=Renderer(None), echo=None
    )
    ctx: dict[str, Any] = {"job_id": "j-1"}
    assert worker.on_startup is not None
    await worker.on_startup(ctx)
    own_redis.kill()
    caplog.set_level(logging.WARNING, logger="mailer.jobs")
    try:
        assert await jobs.tick(ctx) is None
        assert await jobs.drain(ctx) is None
        with pytest.raises(Retry):
            await jobs.send(ctx, messages=["reg-1/confirmation"])
    finally:
        await redis.aclose()
    warnings = [r.getMessage() for r in caplog.records if "Redis went away" in r.getMessage()]
    assert len(warnings) == 3, warnings
