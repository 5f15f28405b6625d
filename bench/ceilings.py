"""What mailer is measured against: the SMTP protocol ceiling, the arq queue ceiling, and the naive baseline.

Each `*_phase` function runs in its own spawned process (see bench.infra.run_isolated) on a
plain asyncio loop, as `mailer worker` does, and returns a dict of numbers.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from typing import Any

import aiosmtplib
from arq.worker import Worker, func

from bench.infra import LOCAL_HOSTNAME, SENDER, SENDER_ADDRESS, cpu_seconds
from mailer.constants import QUEUE_NAME
from mailer.intake.job_bodies import worker_options
from mailer.state.queue import SEND, Enqueuer, connect

# First job start and last job end, set by the job functions of the phase's own process.
_marks: dict[str, float] = {}


def _mark_start() -> None:
    _marks.setdefault("first", time.time())


def _mark_end() -> None:
    _marks["last"] = time.time()


async def _protocol(host: str, port: int, n: int, connections: int, data: bytes) -> dict[str, Any]:
    clients = [
        aiosmtplib.SMTP(hostname=host, port=port, local_hostname=LOCAL_HOSTNAME, start_tls=False, timeout=30)
        for _ in range(connections)
    ]
    for client in clients:
        await client.connect()
    counter = iter(range(n))

    async def pump(client: aiosmtplib.SMTP) -> None:
        for i in counter:
            await client.sendmail(SENDER_ADDRESS, [f"p{i}@example.org"], data)

    started = time.time()
    await asyncio.gather(*(pump(c) for c in clients))
    finished = time.time()
    for client in clients:
        await client.quit()
    return {"n": n, "started": started, "finished": finished, "seconds": finished - started}


def protocol_phase(*, host: str, port: int, n: int, connections: int, data: bytes) -> dict[str, Any]:
    """aiosmtplib sending the same pre-built bytes over `connections` kept-open connections."""
    cpu = cpu_seconds(os.getpid())
    result = asyncio.run(_protocol(host, port, n, connections, data))
    result["cpu_seconds"] = cpu_seconds(os.getpid()) - cpu
    return result


async def _transport(settings: Any, n: int, data: bytes) -> dict[str, Any]:
    from mailer.content.compose import WireMessage
    from mailer.delivery.smtp import SmtpTransport

    transport = SmtpTransport(settings)
    wire = WireMessage(data)  # as compose() hands it over
    counter = iter(range(n))

    async def pump() -> None:
        async with transport.lane() as lane:
            for i in counter:
                await lane.send(sender=SENDER_ADDRESS, recipient=f"t{i}@example.org", data=wire)

    lanes = settings.smtp_max_connections
    # Connections opened before the clock starts, as for the aiosmtplib ceiling.
    await asyncio.gather(
        *(
            transport.send(sender=SENDER_ADDRESS, recipient="warm@example.org", data=wire)
            for _ in range(lanes)
        )
    )
    started = time.time()
    await asyncio.gather(*(pump() for _ in range(lanes)))
    finished = time.time()
    await transport.close()
    return {"n": n, "started": started, "finished": finished, "seconds": finished - started}


def transport_phase(*, settings: Any, n: int, data: bytes) -> dict[str, Any]:
    """mailer's own SMTP transport (pipelining session) sending the same pre-built bytes."""
    cpu = cpu_seconds(os.getpid())
    result = asyncio.run(_transport(settings, n, data))
    result["cpu_seconds"] = cpu_seconds(os.getpid()) - cpu
    return result


async def _run_burst(
    redis_url: str,
    n: int,
    job: Callable[..., Awaitable[Any]],
    make_kwargs: Callable[[int], dict[str, object]],
    *,
    max_jobs: int,
    poll_delay: float,
    job_timeout: int,
) -> dict[str, Any]:
    """Enqueue `n` jobs (untimed), then drain them with an arq Worker in burst mode (timed)."""
    pool = await connect(redis_url)
    try:
        jobs = [(f"bench:{i}", SEND, make_kwargs(i)) for i in range(n)]
        await Enqueuer(pool).enqueue(jobs)
        worker = Worker(
            functions=[func(job, name=SEND, timeout=job_timeout, keep_result=0, max_tries=1000)],  # type: ignore[arg-type]
            redis_pool=pool,
            **worker_options(max_jobs=max_jobs, poll_delay=poll_delay, job_timeout=job_timeout),
            burst=True,
        )
        started = time.time()
        await worker.main()
        finished = time.time()
        left = await pool.zcard(QUEUE_NAME)
        return {
            "n": n,
            "started": started,
            "finished": finished,
            "seconds": finished - started,
            "first_job": _marks.get("first"),
            "last_job": _marks.get("last"),
            "completed": worker.jobs_complete,
            "failed": worker.jobs_failed,
            "left_in_queue": int(left),
        }
    finally:
        await pool.aclose()


async def _noop(ctx: dict[str, Any], *, messages: Any = None) -> None:
    _mark_start()
    _mark_end()


def queue_phase(
    *, redis_url: str, n: int, max_jobs: int, poll_delay: float, job_timeout: int
) -> dict[str, Any]:
    """arq running `n` no-op jobs with the worker's settings, JSON serializer and keep_result=0."""
    cpu = cpu_seconds(os.getpid())
    result = asyncio.run(
        _run_burst(
            redis_url,
            n,
            _noop,
            lambda i: {"messages": [f"r-{i}/confirmation"]},
            max_jobs=max_jobs,
            poll_delay=poll_delay,
            job_timeout=job_timeout,
        )
    )
    result["cpu_seconds"] = cpu_seconds(os.getpid()) - cpu
    return result


class _Naive:
    """What a tutorial does: EmailMessage per mail, one `aiosmtplib.send()` (connection) per mail."""

    def __init__(self, host: str, port: int, subject: str, text: str, html: str, ics: bytes, filename: str):
        self.host, self.port = host, port
        self.subject, self.text, self.html = subject, text, html
        self.ics, self.filename = ics.decode(), filename

    async def send(self, ctx: dict[str, Any], *, to: str = "", name: str = "") -> None:
        _mark_start()
        message = EmailMessage()
        message["From"] = SENDER
        message["To"] = f"{name} <{to}>"
        message["Subject"] = self.subject
        message.set_content(self.text)
        message.add_alternative(self.html, subtype="html")
        message.add_attachment(self.ics, subtype="calendar", filename=self.filename)
        # local_hostname as mailer's workers get it here, so neither side pays getfqdn().
        await aiosmtplib.send(message, hostname=self.host, port=self.port, local_hostname=LOCAL_HOSTNAME)
        _mark_end()


def naive_phase(
    *,
    redis_url: str,
    host: str,
    port: int,
    n: int,
    max_jobs: int,
    poll_delay: float,
    job_timeout: int,
    subject: str,
    text: str,
    html: str,
    ics: bytes,
    ics_filename: str,
) -> dict[str, Any]:
    """The naive baseline: one arq job per mail, EmailMessage built per mail, a connection per mail."""
    naive = _Naive(host, port, subject, text, html, ics, ics_filename)
    cpu = cpu_seconds(os.getpid())
    result = asyncio.run(
        _run_burst(
            redis_url,
            n,
            naive.send,
            lambda i: {"to": f"n{i}@example.org", "name": "Maria Müller"},
            max_jobs=max_jobs,
            poll_delay=poll_delay,
            job_timeout=job_timeout,
        )
    )
    result["cpu_seconds"] = cpu_seconds(os.getpid()) - cpu
    return result
