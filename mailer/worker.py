"""The worker process: arq Worker settings, start-up and shutdown, and a loop that outlives Redis outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import Any, TextIO

from arq.cron import cron
from arq.worker import Worker, func

from mailer import jobs
from mailer.clock import Clock, ms, utc_now
from mailer.content.render import Renderer
from mailer.delivery.maildir import MaildirTransport
from mailer.delivery.sender import Sender
from mailer.delivery.smtp import SmtpTransport
from mailer.delivery.transport import Transport
from mailer.intake.inbox import Inbox
from mailer.intake.job_bodies import QueueWorker, worker_options
from mailer.lifecycle.planner import Planner
from mailer.lifecycle.scheduler import Scheduler
from mailer.ops.alerts import AlertMonitor
from mailer.settings import Settings
from mailer.state.connection import RedisTarget
from mailer.state.deliverylog import DeliveryLog
from mailer.state.heartbeat import BEAT_MS, beat
from mailer.state.queue import (
    DRAIN,
    FAN_OUT,
    INGEST,
    NEWER_FORMAT,
    REDIS_DOWN,
    REJECT,
    SEND,
    connect,
)
from mailer.state.retention import Retention

logger = logging.getLogger("mailer.worker")

# After the drain, cancelled jobs get this long to unwind; then each kept-open SMTP connection
# gets up to QUIT_WAIT_SECONDS for its QUIT (mailer.delivery.smtp_session caps it at 2 s).
CANCEL_WAIT_SECONDS = 2.0
QUIT_WAIT_SECONDS = 2.0


def drain_seconds(settings: Settings) -> float:
    """How long SIGTERM lets running jobs finish their sends in flight: one SMTP timeout and a margin."""
    return settings.smtp_timeout + 5


def stop_seconds(settings: Settings) -> float:
    """The longest a worker takes from SIGTERM to exit: the drain, cancelled jobs unwinding, and a
    QUIT on each connection. A supervisor's stop timeout (systemd TimeoutStopSec, Kubernetes
    terminationGracePeriodSeconds, compose stop_grace_period) must be longer, or its SIGKILL
    cuts sends in flight (resent later as `uncertain`)."""
    return drain_seconds(settings) + CANCEL_WAIT_SECONDS + QUIT_WAIT_SECONDS * settings.smtp_max_connections


def _app(
    settings: Settings,
    redis: Any,
    *,
    transport: Transport,
    renderer: Renderer,
    clock: Clock,
    echo: TextIO | None,
) -> jobs.App:
    """The planner, sender, scheduler, inbox and log one worker's jobs share."""
    log = DeliveryLog(
        redis,
        max_entries=settings.log_max_entries,
        echo=echo if settings.print_outcomes else None,
        worker=settings.worker_name,
        clock=clock,
    )
    sender = Sender(
        redis=redis, settings=settings, transport=transport, renderer=renderer, log=log, clock=clock
    )
    return jobs.App(
        planner=Planner(
            redis, default_offsets=settings.reminder_offsets, clock=clock, worker=settings.worker_name
        ),
        sender=sender,
        scheduler=Scheduler(redis, batch_size=settings.batch_size, clock=clock, circuit=sender.circuit),
        inbox=Inbox(redis, clock=clock),
        log=log,
        retention=Retention(redis, days=settings.retention_days, clock=clock),
        alerts=AlertMonitor(redis, settings=settings, transport=transport, log=log, clock=clock),
    )


def build_worker(
    settings: Settings,
    redis: Any,
    *,
    transport: Transport,
    renderer: Renderer,
    clock: Clock = utc_now,
    echo: TextIO | None = sys.stdout,
    burst: bool = False,
) -> Worker:
    """An arq Worker wired to mailer's jobs; `redis` is a pool from mailer.state.queue.connect."""

    async def startup(ctx: dict[str, Any]) -> None:
        ctx["app"] = _app(settings, redis, transport=transport, renderer=renderer, clock=clock, echo=echo)

    timeout = settings.job_timeout
    return QueueWorker(
        functions=[
            func(jobs.ingest, name=INGEST, timeout=timeout),
            func(jobs.drain, name=DRAIN, timeout=timeout),
            func(jobs.send, name=SEND, timeout=timeout),
            func(jobs.fan_out, name=FAN_OUT, timeout=timeout),
            # Results and tries default to worker_options; a malformed job is never worth a retry.
            func(jobs.reject, name=REJECT, timeout=timeout, max_tries=1),
            func(jobs.newer_format, name=NEWER_FORMAT, timeout=timeout),
        ],
        cron_jobs=[
            cron(jobs.tick, name="cron:tick", second=set(range(60)), timeout=timeout, run_at_startup=True)
        ],
        redis_pool=redis,
        on_startup=startup,
        **worker_options(
            max_jobs=settings.worker_max_jobs, poll_delay=settings.poll_delay, job_timeout=timeout
        ),
        burst=burst,
        health_check_interval=10,
    )


async def run(settings: Settings, where: RedisTarget | str, *, echo: TextIO | None = sys.stdout) -> int:
    """Run until SIGTERM/SIGINT; survive Redis going away. Returns the exit status."""
    transport = build_transport(settings)
    renderer = Renderer(settings.template_dir)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_redis_down_in_one_line)
    stop = _Stop(loop)
    delay = 0.5
    try:
        while not stop.requested.is_set():
            try:
                redis = await connect(where)
                await redis.ping()
            except REDIS_DOWN as exc:
                logger.warning("Redis unreachable (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.requested.wait(), delay)
                delay = min(delay * 2, 10)
                continue
            delay = 0.5
            try:
                worker = build_worker(settings, redis, transport=transport, renderer=renderer, echo=echo)
                await _serve(worker, stop, grace=drain_seconds(settings), worker_name=settings.worker_name)
            finally:
                with contextlib.suppress(Exception):
                    await redis.aclose()
    finally:
        await transport.close()
    logger.info("worker stopped")
    return 0


def _redis_down_in_one_line(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A task arq started in the moment Redis went away fails where no one awaits it (its
    first pipeline); asyncio would print that with a traceback. One line: the work is
    re-driven from mailer's own state. Anything else goes to asyncio's default handler."""
    failure = context.get("exception")
    if isinstance(failure, REDIS_DOWN):
        logger.warning("a job could not start, Redis went away (%r); re-driven from mailer's state", failure)
        return
    loop.default_exception_handler(context)


class _Stop:
    """SIGTERM or Ctrl-C: take no new jobs and finish the sends in flight; a second one: now."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.requested = asyncio.Event()
        self.worker: Worker | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            logger.warning("second %s: stopping now", name)
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            return
        logger.info("%s received: taking no new jobs, finishing the sends in flight", name)
        self.requested.set()
        if self.worker is not None:
            self.worker.allow_pick_jobs = False
            app: jobs.App | None = self.worker.ctx.get("app")
            if app is not None:
                app.stop()


async def _serve(worker: Worker, stop: _Stop, *, grace: float, worker_name: str) -> None:
    """Run one arq worker until Redis goes away (return, to reconnect) or a stop is asked for."""
    stop.worker = worker
    beating = asyncio.create_task(_beat(worker.pool, worker_name))
    try:
        await _run_until_stopped(worker, stop, grace=grace)
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating


async def _beat(redis: Any, name: str) -> None:
    """This worker's heartbeat, every few seconds while it serves (a missed beat is no error:
    Redis is gone, and the serve loop deals with that)."""
    while True:
        with contextlib.suppress(*REDIS_DOWN):
            await beat(redis, name, now_ms=ms(utc_now()))
        await asyncio.sleep(BEAT_MS / 1000)


async def _run_until_stopped(worker: Worker, stop: _Stop, *, grace: float) -> None:
    main = asyncio.create_task(worker.main())
    stop_wait = asyncio.create_task(stop.requested.wait())
    done, _ = await asyncio.wait({main, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if main in done:
        stop_wait.cancel()
        failure = main.exception()
        if failure is not None and not isinstance(failure, REDIS_DOWN):
            raise failure
        logger.warning("lost Redis (%s); reconnecting", failure)
        await _drain(worker, grace)
        return
    await _drain(worker, grace)
    main.cancel()
    with contextlib.suppress(asyncio.CancelledError, *REDIS_DOWN):
        await main


async def _drain(worker: Worker, grace: float) -> None:
    """Let running jobs (and their sends in flight) finish, up to `grace` seconds.

    After Redis went away, arq's own bookkeeping at the end of a job fails too; those
    failures are collected here (one line), not left to asyncio's "exception never retrieved".
    """
    tasks = list(worker.tasks.values())
    running = [t for t in tasks if not t.done()]
    if running:
        _, pending = await asyncio.wait(running, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CANCEL_WAIT_SECONDS)
    unfinished = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if unfinished:
        logger.warning(
            "%d job(s) could not record their end (%r); their work is re-driven from mailer's own state",
            len(unfinished),
            unfinished[0].exception(),
        )


def build_transport(settings: Settings) -> Transport:
    """SMTP when MAILER_SMTP_HOST is set, else the Maildir outbox."""
    if settings.smtp_host:
        return SmtpTransport(settings)
    return MaildirTransport(settings.effective_outbox_dir)
