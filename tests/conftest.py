"""Real parts for every test: a redis-server and an aiosmtpd server on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session
from hypothesis import Phase
from hypothesis import settings as hypothesis_settings

from mailer.ops.embedded import redis_server_command
from mailer.settings import Settings, load_settings

BERLIN = ZoneInfo("Europe/Berlin")

# `make test` must pass or fail the same way every run: property tests use a fixed seed
# sequence and no per-example deadline (a loaded 2-core CI box is no reason to fail).
# HYPOTHESIS_PROFILE=explore searches with fresh randomness.
# No "explain" phase: it parses test source with ast, which trips CPython 3.11.7's
# "AST constructor recursion depth mismatch" bug (gh-106905) now and then.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]
hypothesis_settings.register_profile("repeatable", derandomize=True, deadline=None, phases=_PHASES)
hypothesis_settings.register_profile("explore", deadline=None, max_examples=2000, phases=_PHASES)
hypothesis_settings.load_profile(__import__("os").environ.get("HYPOTHESIS_PROFILE", "repeatable"))


# Debian's chromium as the tests run it (the dashboard's Playwright tests, the phone-width pipe):
# as root, headless, and quiet on a machine without internet, where its background fetches
# would each be refused.
CHROMIUM_FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A real redis-server in a temp dir; `kill()` and `start()` simulate crashes and restarts."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            redis_server_command(
                directory=self.directory,
                listen=["--port", str(self.port), "--bind", "127.0.0.1"],
                appendfsync="always",
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(7).startswith(b"+PONG"):
                    return
            time.sleep(0.01)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), 2) as c:
            c.sendall(b"FLUSHALL\r\n")
            c.recv(16)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private server for tests that kill it."""
    server = RedisServer(tmp_path / "redis-own")
    server.directory.mkdir()
    server.start()
    yield server
    server.kill()


# --- SMTP -------------------------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    helo: str = ""  # the EHLO name of the session it came in on (MAILER_SMTP_LOCAL_HOSTNAME)
    at: float = 0.0  # when the server accepted it (time.time())

    @property
    def message(self) -> EmailMessage:
        parsed = BytesParser(policy=policy.default).parsebytes(self.data)
        assert isinstance(parsed, EmailMessage)
        return parsed


class RecordingHandler:
    """Records every message; `fault` lets a test make the *server* misbehave.

    fault(recipient, attempt_number) returns None (accept), an SMTP reply string to send
    instead (e.g. "451 4.7.1 try later"), "drop" to close the connection mid-DATA, or
    "stall" to wait past the client's timeout.
    """

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.attempts: dict[str, int] = {}
        self.fault: Callable[[str, int], str | None] | None = None
        self.delay = 0.0  # seconds per DATA, to stretch a burst out
        self.arrived = asyncio.Event()
        # Most relays offer PIPELINING (RFC 2920); aiosmtpd handles it but does not say so.
        self.pipelining = True

    async def handle_EHLO(
        self, server: SMTPServer, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(
        self, server: SMTPServer, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        recipient = envelope.rcpt_tos[0]
        self.attempts[recipient] = self.attempts.get(recipient, 0) + 1
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.fault(recipient, self.attempts[recipient]) if self.fault else None
        if answer == "drop":
            assert server.transport is not None
            server.transport.close()
            return "421 closing"
        if answer == "stall":
            await asyncio.sleep(5)
            return "451 too late"
        if answer:
            return answer
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        self.received.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                content,
                helo=str(session.host_name or ""),
                at=time.time(),
            )
        )
        return "250 2.0.0 OK queued"

    def to(self, address: str) -> list[Received]:
        return [r for r in self.received if address in r.rcpt_tos]


@dataclass
class SmtpServer:
    host: str
    port: int
    handler: RecordingHandler
    controller: Controller


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        decode_data=False,
        data_size_limit=10_000_000,
        ready_timeout=10,
    )
    controller.start()
    server = SmtpServer("127.0.0.1", port, handler, controller)
    yield server
    server.controller.stop()


# --- settings, events, clocks ---------------------------------------------------------------


@pytest.fixture
def make_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Settings]:
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's checkout

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "MAILER_FROM": "Stadt Kaiserslautern <noreply@example.org>",
            "data_dir": tmp_path / "var",
            "smtp_security": "none",
            "smtp_timeout": 2.0,
            "smtp_local_hostname": "mailer.test",
            "print_outcomes": False,
            "worker_name": "test-worker",
            "retry_base_seconds": 0.2,
            "retry_max_seconds": 1.0,
            "relay_probe_base_seconds": 0.2,
            "relay_probe_max_seconds": 1.0,
            "poll_delay": 0.01,
        }
        base.update(overrides)
        return load_settings(**base)

    return make


def event_day(days_ahead: int = 15) -> datetime:
    """18:00 Europe/Berlin, `days_ahead` days from today: never stale."""
    day = datetime.now(BERLIN).date() + timedelta(days=days_ahead)
    return datetime(day.year, day.month, day.day, 18, 0, tzinfo=BERLIN)


def make_event(
    *,
    event_id: str = "evt-1",
    registration_id: str = "reg-1001",
    email: str = "maria.mueller@example.org",
    name: str = "Maria Müller",
    locale: str = "de",
    starts_at: datetime | None = None,
    duration: timedelta = timedelta(hours=2, minutes=30),
    occurred_at: datetime | None = None,
    event: dict[str, Any] | None = None,
    **event_overrides: Any,
) -> dict[str, Any]:
    """A registration.created event for the city's dialog evening, relative to today."""
    start = starts_at or event_day()
    ev: dict[str, Any] = {
        "id": "weltoffen",
        "title": "Digitaler Dialog zu Weltoffenheit",
        "starts_at": start.isoformat(),
        "ends_at": (start + duration).isoformat(),
        "timezone": "Europe/Berlin",
        "location": "Online",
        "join_url": "https://meet.example.org/weltoffen",
        "organizer": {"name": "Stadt Kaiserslautern", "email": "integration@example.org"},
        "registration_deadline": (start - timedelta(days=10)).isoformat(),
    }
    ev.update(event or {})
    ev.update(event_overrides)
    return {
        "type": "registration.created",
        "id": event_id,
        "occurred_at": (occurred_at or datetime.now(UTC)).isoformat(),
        "registration": {"id": registration_id, "attendee": {"email": email, "name": name, "locale": locale}},
        "event": ev,
    }


async def wait_for(predicate: Callable[[], bool], within: float = 10.0, interval: float = 0.01) -> None:
    """Poll until `predicate()` holds; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


async def until(check: Callable[[], Awaitable[Any]], within: float = 30.0, interval: float = 0.02) -> None:
    """Poll until `await check()` is true (a Redis read, an HTTP answer); fail after `within` s."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


@pytest.fixture
async def running_worker(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process workers (real arq Worker, real transport) for the test; stopped after."""
    from mailer.content.render import Renderer
    from mailer.state.queue import connect
    from mailer.worker import build_transport, build_worker

    started: list[tuple[Any, asyncio.Task[None], Any, Any]] = []

    async def start(settings: Settings, *, clock: Any = None, transport: Any = None) -> Any:
        redis = await connect(settings.redis_url or redis_url)
        transport = transport or build_transport(settings)
        kwargs = {"clock": clock} if clock else {}
        worker = build_worker(
            settings,
            redis,
            transport=transport,
            renderer=Renderer(settings.template_dir),
            echo=None,
            **kwargs,
        )
        task = asyncio.create_task(worker.main())
        started.append((worker, task, redis, transport))
        return worker

    yield start
    failed = sum(worker.jobs_failed for worker, *_ in started)
    for _worker, task, redis, transport in started:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await transport.close()
        with contextlib.suppress(Exception):
            await redis.aclose()
    # A job that raised is a bug even when the mail got out: make every test say so.
    assert failed == 0, f"{failed} worker job(s) raised; see the captured log"


@dataclass
class WorkerProcess:
    """`python -m mailer worker` as its own process, as operators run it."""

    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import sys

        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailer", "worker"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log_path.open("ab"),
            cwd=self.log_path.parent,
        )

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait: the exit status."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout=timeout)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def coverage_env() -> dict[str, str]:
    """Under `make test` (coverage on), a worker process measures itself too: the environment
    that makes coverage start in it, writing a data file that pytest-cov combines at the end.
    Only worker processes: measuring every short CLI call as well cost more than it showed."""
    import copy
    import os

    import coverage

    current = coverage.Coverage.current()
    if current is None:
        return {}
    config = copy.copy(current.config)
    config.data_file = os.path.abspath(config.data_file)  # the worker runs in the test's tmp dir
    config.parallel = True
    return {"COVERAGE_PROCESS_CONFIG": config.serialize()}


@pytest.fixture
def worker_process(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    import os

    made: list[WorkerProcess] = []

    def make(redis_url: str, smtp: SmtpServer, **extra: str) -> WorkerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
        env.update(
            {
                "MAILER_REDIS_URL": redis_url,
                "MAILER_SMTP_HOST": smtp.host,
                "MAILER_SMTP_PORT": str(smtp.port),
                "MAILER_SMTP_SECURITY": "none",
                "MAILER_SMTP_TIMEOUT": "2",
                "MAILER_SMTP_LOCAL_HOSTNAME": "mailer.test",
                "MAILER_FROM": "Stadt Kaiserslautern <noreply@example.org>",
                "MAILER_PRINT_OUTCOMES": "false",
                "MAILER_JOB_TIMEOUT": "5",
                "MAILER_RETRY_BASE_SECONDS": "0.2",
                "MAILER_RETRY_MAX_SECONDS": "1",
                "MAILER_RELAY_PROBE_BASE_SECONDS": "0.2",
                "MAILER_RELAY_PROBE_MAX_SECONDS": "1",
                "MAILER_DATA_DIR": str(tmp_path / "var"),
            }
        )
        env.update(extra)
        env.update(coverage_env())
        worker = WorkerProcess(env, tmp_path / f"worker-{len(made)}.log")
        worker.start()
        made.append(worker)
        return worker

    yield make
    for worker in made:
        if worker.alive:
            worker.kill()
    # Jobs that raised show up as arq errors in the worker's log: a bug even if mail got out.
    raised = [
        line
        for w in made
        for line in w.log_path.read_text(errors="replace").splitlines()
        if "arq.worker" in line and " failed, " in line
    ]
    assert not raised, raised[:5]


@pytest.fixture
def mail_worker(
    redis_url: str, smtp_server: SmtpServer, make_settings: Callable[..., Settings], running_worker: Any
) -> Callable[..., Any]:
    """Start an in-process worker sending to the test's SMTP server; returns its settings."""

    async def start(**overrides: Any) -> Settings:
        settings = make_settings(
            redis_url=redis_url, smtp_host=smtp_server.host, smtp_port=smtp_server.port, **overrides
        )
        await running_worker(settings)
        return settings

    return start


async def log_until(url: str, predicate: Callable[[list[Any]], bool], within: float = 10.0) -> list[Any]:
    """Poll the delivery log until `predicate(entries)` holds; return the entries (oldest first)."""
    from mailer.state.logquery import read_log
    from mailer.state.queue import connect

    redis = await connect(url)
    try:
        deadline = time.monotonic() + within
        while True:
            entries = [e async for e in read_log(redis, newest_first=False)]
            if predicate(entries):
                return entries
            if time.monotonic() > deadline:
                raise AssertionError(f"log condition not met in time; log: {entries[-5:]}")
            await asyncio.sleep(0.01)
    finally:
        await redis.aclose()


async def settled(url: str, within: float = 30.0) -> None:
    """Wait until mailer has nothing left in flight: every planned message in a final state (the
    due index is empty), the inbox drained and no drain holding its lease. After this, no further
    mail can go out until something new arrives or a reminder falls due, so a test may count."""
    from mailer.constants import DUE_KEY, INBOX_KEY, INBOX_LEASE_KEY
    from mailer.state.queue import connect

    redis = await connect(url)
    try:
        deadline = time.monotonic() + within
        while True:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.zrange(DUE_KEY, 0, 4)
                pipe.llen(INBOX_KEY)
                pipe.exists(INBOX_LEASE_KEY)
                due, waiting, leased = await pipe.execute()
            if not (due or waiting or leased):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"not settled in time: due {due}, inbox {waiting}, lease {leased}")
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()
