"""Redis Sentinel for real: a worker process and `mailer serve` find the master through three
Sentinels, and outlive a failover (the master killed mid-burst) without a restart."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mailer.intake.client import MailerClient
from mailer.state.queue import connect
from tests.conftest import make_event, settled, wait_for
from tests.redis_sentinel import MASTER_NAME, SentinelSet, sentinel_client
from tests.test_cli import clean_env, mailer
from tests.test_confirmation import log_entries
from tests.test_crashes import burst
from tests.test_http import start_service, stop_service

TOKEN = "sentinel-test-token"  # noqa: S105 - the test service's token


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    servers = SentinelSet(tmp_path / "sentinel-set")
    servers.start()
    yield servers
    servers.stop()


async def test_a_failover_mid_burst_loses_nothing_and_duplicates_only_uncertain(
    sentinel_set: SentinelSet, smtp_server: Any, worker_process: Any, tmp_path: Path
) -> None:
    """1 000 registrations; the master is killed (SIGKILL) a third of the way through. The
    Sentinels promote the replica, the dead node returns as its replica, and the same worker
    process and HTTP service carry on: every recipient gets the confirmation, a second copy
    only where the log says `uncertain`; afterwards /readyz is 200 naming the new master, and
    a POST is sent."""
    smtp_server.handler.delay = 0.004  # stretch the burst so the master dies under running sends
    env = sentinel_set.env()
    worker = worker_process(env["MAILER_REDIS_URL"], smtp_server, **env, MAILER_WORKER_NAME="w-sentinel")
    pid = worker.process.pid
    service = start_service(env["MAILER_REDIS_URL"], tmp_path, **env, MAILER_API_TOKEN=TOKEN)
    target = sentinel_set.target()
    try:
        async with MailerClient(target) as client:
            report = await client.publish_many(burst(1000, "s"))
        assert report.accepted == 1000
        received = smtp_server.handler
        await wait_for(lambda: len(received.received) >= 300, 30)
        old_master = sentinel_set.master.port
        sentinel_set.master.kill()
        at_kill = len(received.received)
        began = time.monotonic()
        await wait_for(lambda: sentinel_set.master_port() not in (None, old_master), 20, 0.1)
        promoted = time.monotonic() - began
        # The dead node comes back (as after a reboot) and the Sentinels make it the new
        # master's replica: with MAILER_REDIS_MIN_REPLICAS=1 no mail goes out until then.
        sentinel_set.master.start()
        await wait_for(lambda: sentinel_set.replicas_in_sync(sentinel_set.replica.port) >= 1, 30, 0.1)
        rejoined = time.monotonic() - began
        await wait_for(lambda: len({r.rcpt_tos[0] for r in received.received}) == 1000, 45, 0.1)
        delivered = time.monotonic() - began
        await settled(target)
        copies = Counter(r.rcpt_tos[0] for r in received.received)
        duplicates = {address for address, n in copies.items() if n > 1}
        uncertain = {e.recipient for e in await log_entries(target) if e.status == "uncertain"}
        print(
            f"\nfailover mid-burst: received before the kill {at_kill}, replica promoted after "
            f"{promoted:.1f} s, old master back as its replica after {rejoined:.1f} s, all "
            f"delivered {delivered:.1f} s after the kill; copies "
            f"{sum(copies.values())}, duplicates {len(duplicates)}, marked uncertain {len(uncertain)}"
        )
        assert len(copies) == 1000
        assert duplicates <= uncertain
        assert worker.alive
        assert worker.process.pid == pid
        await _service_answers_after_failover(service.url, sentinel_set.replica.port, received)
        health = await asyncio.to_thread(mailer, "health", cwd=tmp_path, env=clean_env() | env)
        assert health.returncode == 0, health.stdout
        said = health.stdout.decode()
        assert f"redis: ok (Sentinel master mailer at 127.0.0.1:{sentinel_set.replica.port} via" in said
        assert "secret" not in said
    finally:
        stop_service(service)
    log = worker.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "Traceback" not in service.log.read_text()


async def _service_answers_after_failover(url: str, new_master: int, received: Any) -> None:
    """/readyz turns 200 (the worker's heartbeat is in the new master) and names the master the
    Sentinels gave; a POSTed registration is accepted and sent."""
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        deadline = time.monotonic() + 20
        while (ready := await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            await asyncio.sleep(0.1)  # the heartbeat is a key in Redis, polled through the API
        assert f"at 127.0.0.1:{new_master} via" in ready.json()["checks"]["redis"]["at"]
        event = make_event(event_id="after-failover", registration_id="r-after", email="after@example.org")
        answer = await http.post("/v1/events", json=event)
        assert answer.status_code == 202, answer.text
    await wait_for(lambda: bool(received.to("after@example.org")), 20, 0.05)


async def test_a_switchover_demotes_the_master_under_running_sends(
    sentinel_set: SentinelSet, smtp_server: Any, worker_process: Any
) -> None:
    """SENTINEL FAILOVER mid-burst: the master is demoted to a replica while the worker holds
    connections to it, so its writes meet READONLY; that is an outage like any other (no job
    fails as a bug), and everyone gets the confirmation once, or twice only where `uncertain`."""
    smtp_server.handler.delay = 0.004
    env = sentinel_set.env()
    worker = worker_process(env["MAILER_REDIS_URL"], smtp_server, **env)
    target = sentinel_set.target()
    async with MailerClient(target) as client:
        await client.publish_many(burst(400, "d"))
    received = smtp_server.handler
    await wait_for(lambda: len(received.received) >= 100, 30)
    old_master = sentinel_set.master.port
    with sentinel_client(sentinel_set.sentinels[0].port) as sentinel:
        assert sentinel.sentinel_failover(MASTER_NAME)
    await wait_for(lambda: sentinel_set.master_port() not in (None, old_master), 20, 0.1)
    # Until the Sentinels demote it (seconds later), the old master still takes writes: count
    # only once it is the new master's replica and has dropped what it took meanwhile.
    await wait_for(lambda: sentinel_set.replicas_in_sync(sentinel_set.replica.port) >= 1, 30, 0.1)
    await wait_for(lambda: len({r.rcpt_tos[0] for r in received.received}) == 400, 45, 0.1)
    await settled(target)
    copies = Counter(r.rcpt_tos[0] for r in received.received)
    uncertain = {e.recipient for e in await log_entries(target) if e.status == "uncertain"}
    assert {address for address, n in copies.items() if n > 1} <= uncertain
    assert worker.alive
    assert "Traceback" not in worker.log_path.read_text()


async def test_no_master_known_is_an_outage_naming_the_sentinels(sentinel_set: SentinelSet) -> None:
    """A master name the Sentinels do not monitor: QueueUnavailable naming the master and the
    Sentinels asked, the passwords masked."""
    from dataclasses import replace

    from mailer.errors import QueueUnavailable

    wrong = replace(sentinel_set.target(), master="nosuchmaster")
    with pytest.raises(QueueUnavailable) as caught:
        await connect(wrong)
    message = str(caught.value)
    assert "Sentinel master nosuchmaster via 127.0.0.1:" in message
    assert "secret" not in message


async def test_an_event_no_replica_confirmed_is_not_acknowledged(redis_url: str) -> None:
    """MAILER_REDIS_MIN_REPLICAS=1 against a Redis without replicas: publish raises
    QueueUnavailable saying so (the producer retries; ids make a retry apply once)."""
    from mailer.errors import QueueUnavailable
    from mailer.state.connection import RedisTarget

    async with MailerClient(RedisTarget(url=redis_url, min_replicas=1)) as client:
        with pytest.raises(QueueUnavailable) as caught:
            await client.publish(make_event())
    assert "only 0 of 1 Redis replica(s) confirmed the event" in str(caught.value)
