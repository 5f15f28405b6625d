"""Several worker processes on one Redis: each mail sent once, the work spread, one rate limit and
one relay circuit for all of them, a heartbeat each, and a rolling restart that loses nothing."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from mailer.clock import ms, utc_now
from mailer.constants import WORKERS_KEY
from mailer.intake.client import MailerClient
from mailer.state.circuit import CircuitState, relay_states
from mailer.state.heartbeat import fresh_workers
from mailer.state.queue import connect_client
from tests.conftest import WorkerProcess, log_until, make_event, settled, until, wait_for
from tests.test_confirmation import log_entries
from tests.test_crashes import burst

WORKERS = ("scale-1", "scale-2", "scale-3")


def start_worker(
    worker_process: Any, redis_url: str, smtp_server: Any, name: str, **extra: str
) -> WorkerProcess:
    """One `mailer worker` named as systemd's mailer-worker@N would name it; its EHLO name says
    which worker a session at the relay belongs to. The job timeout is the default's: with the
    conftest's 5 s, a loaded 2-core machine timed out ingest jobs queued behind three SMTP
    connections, and a job cancelled mid-send leaves its mail `uncertain` (seen: 2 resent)."""
    worker: WorkerProcess = worker_process(
        redis_url,
        smtp_server,
        MAILER_WORKER_NAME=name,
        MAILER_SMTP_LOCAL_HOSTNAME=f"{name}.test",
        MAILER_JOB_TIMEOUT="40",
        **extra,
    )
    return worker


async def beating_since(redis_url: str, since_ms: int) -> set[str]:
    """The workers whose latest heartbeat is no older than `since_ms`."""
    redis = await connect_client(redis_url)
    try:
        beats = await redis.zrangebyscore(WORKERS_KEY, since_ms, "+inf")
        return {b.decode() for b in beats}
    finally:
        await redis.aclose()


async def start_workers(
    worker_process: Any, redis_url: str, smtp_server: Any, **extra: str
) -> dict[str, WorkerProcess]:
    """Three workers, returned once each has written its own heartbeat."""
    since = ms(utc_now())
    workers = {name: start_worker(worker_process, redis_url, smtp_server, name, **extra) for name in WORKERS}

    async def all_beating() -> bool:
        return await beating_since(redis_url, since) == set(WORKERS)

    await until(all_beating)
    return workers


async def test_three_workers_share_a_burst_and_send_each_mail_once(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """3 worker processes, 3 000 registrations published twice: every recipient gets exactly one
    confirmation, the relay saw mail from all three (by EHLO name, matching the worker the log
    names), and each worker has its own heartbeat."""
    workers = await start_workers(worker_process, redis_url, smtp_server)
    redis = await connect_client(redis_url)
    try:
        assert await fresh_workers(redis, now_ms=ms(utc_now())) == sorted(WORKERS)
    finally:
        await redis.aclose()
    # Jobs of 25 events: arq spreads work by job, so 120 jobs let every worker take some. The
    # producer then sends it all again in other batches (as after a timeout on its side), so two
    # workers often apply the same registration at once and race for its confirmation.
    events = burst(3000, "s")
    async with MailerClient(redis_url, events_per_job=25) as client:
        report = await client.publish_many(events)
    async with MailerClient(redis_url, events_per_job=40) as client:
        await client.publish_many(events)
    assert report.accepted == 3000
    received = smtp_server.handler.received
    await wait_for(lambda: len(received) >= 3000, 90, 0.2)
    await settled(redis_url)
    copies = Counter(r.rcpt_tos[0] for r in received)
    assert len(copies) == 3000
    entries = await log_entries(redis_url)
    uncertain = {e.recipient for e in entries if e.status == "uncertain"}
    assert {address for address, n in copies.items() if n > 1} <= uncertain
    # No worker died and no job timed out: nothing may even be uncertain.
    assert not uncertain
    sent_by = {e.recipient: e.worker for e in entries if e.status == "sent"}
    assert len(sent_by) == 3000
    # The relay's view and the log agree on who sent what.
    assert all(r.helo == f"{sent_by[r.rcpt_tos[0]]}.test" for r in received)
    share = Counter(sent_by.values())
    print(f"\nthree workers, 3 000 mails: sent per worker {dict(sorted(share.items()))}")
    assert set(share) == set(WORKERS)
    assert min(share.values()) >= 150, share  # each at least 5 %
    statuses = await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers.values()))
    assert statuses == [0, 0, 0]


async def test_the_rate_limit_holds_for_all_workers_together(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """MAILER_RATE_LIMIT=12 (per minute) with three workers and 60 mails wanted at once: no more
    than 12 reach the relay per minute window, all workers together; the rest wait as `held`.
    Three limits of 12 (one per worker) would let 36 through."""
    limit, wanted = 12, 60
    await start_workers(worker_process, redis_url, smtp_server, MAILER_RATE_LIMIT=str(limit))
    addresses = {f"rl{i}@example.org" for i in range(wanted)}
    started = time.time()
    async with MailerClient(redis_url, events_per_job=5) as client:  # 12 jobs, spread over the workers
        await client.publish_many(burst(wanted, "rl"))
    received: list[Any] = []

    def every_mail_sent_or_held(log: list[Any]) -> bool:
        received[:] = list(smtp_server.handler.received)
        held = {e.recipient for e in log if e.status == "held" and "MAILER_RATE_LIMIT" in e.detail}
        return {r.rcpt_tos[0] for r in received} | held >= addresses

    entries = await log_until(redis_url, every_mail_sent_or_held, 30)
    ended = time.time()
    # The limit counts per clock minute: the mails of this test fell into these windows.
    windows = int(ended // 60) - int(started // 60) + 1
    held_by = {e.worker for e in entries if e.status == "held" and "MAILER_RATE_LIMIT" in e.detail}
    print(f"\nrate limit {limit}/min: {len(received)} sent in {windows} window(s), held by {sorted(held_by)}")
    assert len(received) <= limit * windows
    if windows == 1:
        assert len(received) == limit
    assert len({r.rcpt_tos[0] for r in received}) == len(received)


async def open_circuit(redis_url: str) -> CircuitState | None:
    redis = await connect_client(redis_url)
    try:
        return next((state for state in await relay_states(redis) if state.open), None)
    finally:
        await redis.aclose()


async def test_a_relay_fault_one_worker_meets_holds_every_worker(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """One worker's mail meets a 421: the circuit opens for all three. Mail published to the
    other workers meanwhile waits as `held` and none reaches the relay before the hold ends;
    then one probe closes the circuit and everything is sent once."""
    await start_workers(
        worker_process,
        redis_url,
        smtp_server,
        MAILER_RELAY_PROBE_BASE_SECONDS="4",
        MAILER_RELAY_PROBE_MAX_SECONDS="8",
        # Two jobs at a time each, so the worker that met the fault cannot take all 12 at once.
        MAILER_WORKER_MAX_JOBS="2",
    )
    handler = smtp_server.handler
    handler.fault = lambda rcpt, n: "421 4.3.2 Service not available, closing channel"
    async with MailerClient(redis_url, events_per_job=5) as client:  # 12 jobs, spread over the workers
        await client.publish_many(
            [make_event(event_id="trip", registration_id="trip", email="trip@example.org")]
        )
        opened: list[CircuitState] = []

        async def circuit_opened() -> bool:
            state = await open_circuit(redis_url)
            opened[:] = [state] if state else []
            return state is not None

        await until(circuit_opened, 20)
        handler.fault = None  # the relay is fine again; only a probe can tell the workers so
        await client.publish_many(burst(60, "c"))
    received = handler.received
    await wait_for(lambda: len({r.rcpt_tos[0] for r in received}) == 61, 40, 0.05)
    await settled(redis_url)
    assert min(r.at for r in received) * 1000 >= opened[0].until_ms
    entries = await log_entries(redis_url)
    (tripped_by,) = {e.worker for e in entries if e.recipient == "trip@example.org" and e.smtp_code == 421}
    held_by = {
        e.worker
        for e in entries
        if e.status == "held" and "relay unavailable" in e.detail and e.recipient != "trip@example.org"
    }
    print(f"\ncircuit opened by {tripped_by}; mail held by {sorted(held_by)}")
    assert held_by - {tripped_by}, "no other worker held its mail"
    assert max(Counter(r.rcpt_tos[0] for r in received).values()) == 1
    assert await open_circuit(redis_url) is None


async def test_a_rolling_restart_during_a_burst_loses_nothing_and_sends_nothing_twice(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """1 500 mails; six times during the burst one of three workers gets SIGTERM and is started
    again (as systemd or Kubernetes would), the next one only once the new one beats. Every stop
    exits 0, every recipient gets exactly one mail, and nothing is `uncertain`: a stopped worker
    finishes its sends in flight and hands back what it had claimed but not begun."""
    total = 1500
    smtp_server.handler.delay = 0.003  # stretch the burst over the restarts
    workers = await start_workers(worker_process, redis_url, smtp_server)
    received = smtp_server.handler.received
    async with MailerClient(redis_url, events_per_job=25) as client:
        await client.publish_many(burst(total, "rr"))
    statuses = []
    for step in range(6):
        name = WORKERS[step % 3]
        # Restart points by progress, not by the clock: the test does the same on any machine.
        point = total * (step + 1) // 8
        await wait_for(lambda: len(received) >= point, 60, 0.02)  # noqa: B023 (awaited in this pass)
        statuses.append(await asyncio.to_thread(workers[name].stop))
        restarted = ms(utc_now())
        workers[name] = start_worker(worker_process, redis_url, smtp_server, name)

        async def replacement_beats() -> bool:
            return name in await beating_since(redis_url, restarted)  # noqa: B023 (awaited in this pass)

        await until(replacement_beats)
    await wait_for(lambda: len({r.rcpt_tos[0] for r in received}) == total, 60, 0.1)
    await settled(redis_url)
    statuses += await asyncio.gather(*(asyncio.to_thread(w.stop) for w in workers.values()))
    copies = Counter(r.rcpt_tos[0] for r in received)
    entries = await log_entries(redis_url)
    uncertain = [e for e in entries if e.status == "uncertain"]
    handed_back = [e for e in entries if e.status == "held" and "worker stopping" in e.detail]
    print(
        f"\nrolling restart: {len(copies)}/{total} delivered, {sum(copies.values())} copies, "
        f"{len(handed_back)} handed back by stopping workers, exit statuses {statuses}"
    )
    assert statuses == [0] * 9
    assert len(copies) == total
    assert max(copies.values()) == 1
    assert not uncertain
    assert handed_back  # the restarts hit workers with mail claimed, which they gave back
