"""The relay's health is not a message's fate: relay faults hold mail behind a shared circuit.

Each test makes a real server misbehave (closed port, 421, 535, 530, a proxy that hangs up)
and checks that no message is failed or loses attempts because of it, that the mail goes
out once the relay is well, and that an operator is told what to fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.delivery.smtp import SmtpTransport, _map_connect_error, _map_smtp_error, is_fully_qualified
from mailer.errors import DeliveryError, RelayFault, TimeoutDeliveryError
from mailer.intake.client import MailerClient
from mailer.state.circuit import RelayCircuit, relay_states
from mailer.state.queue import connect
from tests.conftest import RecordingHandler, free_port, log_until, make_event, wait_for


def _events(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [
        make_event(
            event_id=f"{prefix}-e{i}", registration_id=f"{prefix}-{i}", email=f"{prefix}{i}@example.org"
        )
        for i in range(n)
    ]


def _statuses(entries: list[Any]) -> Counter[str]:
    return Counter(e.status for e in entries)


def _start_controller(handler: Any, port: int, **kwargs: Any) -> Controller:
    controller = Controller(handler, hostname="127.0.0.1", port=port, decode_data=False, **kwargs)
    controller.start()
    return controller


async def test_relay_down_for_20_seconds_loses_nothing_and_fails_nothing(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A relay that refuses connections for 20 s with MAILER_MAX_ATTEMPTS=3: every message is
    held (no attempt used), and all are delivered once it is back; none fails."""
    smtp_server.controller.stop()
    await mail_worker(max_attempts=3)
    async with MailerClient(redis_url) as client:
        await client.publish_many(_events(20))
    down_until = time.monotonic() + 20
    await log_until(redis_url, lambda log: sum(e.status == "held" for e in log) >= 20, 15)
    await asyncio.sleep(max(0, down_until - time.monotonic()))  # the outage itself is the test
    smtp_server.controller = _start_controller(smtp_server.handler, smtp_server.port)
    await wait_for(lambda: len(smtp_server.handler.received) == 20, 30)
    entries = await log_until(redis_url, lambda log: _statuses(log)["sent"] == 20)
    assert _statuses(entries)["failed"] == 0
    assert Counter(r.rcpt_tos[0] for r in smtp_server.handler.received).most_common(1)[0][1] == 1


async def test_a_421_outage_of_10_seconds_burns_no_attempts(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """421 for 10 s (a relay in maintenance): with MAILER_MAX_ATTEMPTS=3, nothing is failed and
    all 20 arrive afterwards, each once."""
    healthy_at = time.monotonic() + 10
    smtp_server.handler.fault = lambda rcpt, n: (
        "421 4.3.2 Service not available, try later" if time.monotonic() < healthy_at else None
    )
    await mail_worker(max_attempts=3)
    async with MailerClient(redis_url) as client:
        await client.publish_many(_events(20))
    await wait_for(lambda: len(smtp_server.handler.received) == 20, 40)
    entries = await log_until(redis_url, lambda log: _statuses(log)["sent"] == 20)
    assert _statuses(entries)["failed"] == 0
    assert _statuses(entries)["held"] >= 1
    assert len({r.rcpt_tos[0] for r in smtp_server.handler.received}) == 20


class _Logins:
    """An authenticator that refuses every login until `accept_from` (monotonic time)."""

    def __init__(self, accept_from: float) -> None:
        self.accept_from = accept_from
        self.tries: list[tuple[int, float]] = []  # (connection, when)
        self._numbers = itertools.count()

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        # A number given to the session itself: id() is reused once a session is gone, and so
        # can a client port be, soon after the server closed first (its TIME_WAIT, not ours).
        if not hasattr(session, "test_number"):
            session.test_number = next(self._numbers)
        self.tries.append((session.test_number, time.monotonic()))
        return AuthResult(success=time.monotonic() >= self.accept_from, handled=False)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
async def test_wrong_password_for_10_seconds_holds_the_queue_and_names_the_settings(
    redis_url: str, smtp_server: Any, mail_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """535 for 10 s, then accepted: nothing fails, everything arrives, an ERROR names
    MAILER_SMTP_USERNAME / _PASSWORD, one mechanism is tried per connection, and failed logins
    come one probe at a time, not one per message or lane."""
    smtp_server.controller.stop()
    logins = _Logins(accept_from=time.monotonic() + 10)
    smtp_server.controller = _start_controller(
        smtp_server.handler,
        smtp_server.port,
        authenticator=logins,
        auth_required=True,
        auth_require_tls=False,
    )
    caplog.set_level(logging.WARNING, logger="mailer")
    await mail_worker(max_attempts=3, smtp_username="mailer", smtp_password="secret")  # noqa: S106 (a test credential)
    async with MailerClient(redis_url) as client:
        await client.publish_many(_events(20))
    await wait_for(lambda: len(smtp_server.handler.received) == 20, 40)
    entries = await log_until(redis_url, lambda log: _statuses(log)["sent"] == 20)
    assert _statuses(entries)["failed"] == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("MAILER_SMTP_USERNAME / MAILER_SMTP_PASSWORD" in m for m in errors), errors
    per_connection = Counter(session for session, _ in logins.tries)
    assert max(per_connection.values()) == 1  # no second mechanism after a refusal
    failed = [at for _, at in logins.tries if at < logins.accept_from]
    # One probe per interval (0.1-1 s here): at most about one a tenth of a second, not 20 a go.
    assert len(failed) <= 10 / 0.1 + 3
    assert all(b - a >= 0.05 for a, b in itertools.pairwise(failed)), failed


class _MailRefusingHandler(RecordingHandler):
    """Answers MAIL FROM like a Postfix that requires STARTTLS, until `accept_from`."""

    def __init__(self, accept_from: float) -> None:
        super().__init__()
        self.accept_from = accept_from

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if time.monotonic() < self.accept_from:
            return "530 5.7.0 Must issue a STARTTLS command first"
        envelope.mail_from = address
        return "250 OK"


async def test_starttls_required_is_a_relay_fault_named_for_its_setting(
    redis_url: str, smtp_server: Any, mail_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """ "530 5.7.0 Must issue a STARTTLS command first" (Postfix to MAILER_SMTP_SECURITY=none)
    dead-lettered every message at attempt 1; now the queue waits and an ERROR names the setting."""
    smtp_server.controller.stop()
    handler = _MailRefusingHandler(accept_from=time.monotonic() + 4)
    smtp_server.controller = _start_controller(handler, smtp_server.port)
    caplog.set_level(logging.WARNING, logger="mailer")
    await mail_worker(max_attempts=2)
    async with MailerClient(redis_url) as client:
        await client.publish_many(_events(5))
    await wait_for(lambda: len(handler.received) == 5, 30)
    entries = await log_until(redis_url, lambda log: _statuses(log)["sent"] == 5)
    assert _statuses(entries)["failed"] == 0
    assert any("MAILER_SMTP_SECURITY" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


class _GatedProxy:
    """A TCP proxy in front of the SMTP server: while `down`, it accepts and hangs up at once
    (a relay whose listener is broken); it counts every connection it was asked for."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.down = True
        self.connections: list[float] = []
        self.server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append(time.monotonic())
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_two_worker_processes_share_one_circuit_and_one_probe(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """Two worker processes against a relay that hangs up on every connection for 6 s: the
    circuit in Redis lets one probe through at a time for both, so the relay sees about one
    connection per probe interval (0.1-1 s), not one per worker or message; then all 40 arrive."""
    proxy = _GatedProxy(smtp_server.port)
    await proxy.start()
    try:

        class Via:
            host, port = "127.0.0.1", proxy.port

        for _ in range(2):
            worker_process(redis_url, Via(), MAILER_MAX_ATTEMPTS="3")
        async with MailerClient(redis_url) as client:
            await client.publish_many(_events(40, "w"))
        await log_until(redis_url, lambda log: _statuses(log)["held"] >= 40, 20)
        opened_at = proxy.connections[0]
        await asyncio.sleep(6)  # the outage
        during = [t for t in proxy.connections if t - opened_at < 6]
        proxy.down = False
        await wait_for(lambda: len(smtp_server.handler.received) == 40, 30, 0.05)
        # Before the first fault each worker may open a connection of its own; after it, probes
        # of the shared circuit only: one per hold of 0.1-1 s.
        assert len(during) <= 2 + 6 / 0.1, during
        probes = during[2:]
        gaps = [b - a for a, b in itertools.pairwise(probes)]
        assert not gaps or min(gaps) >= 0.05, gaps
        entries = await log_until(redis_url, lambda log: _statuses(log)["sent"] == 40)
        assert _statuses(entries)["failed"] == 0
        assert len(smtp_server.handler.received) == 40
    finally:
        await proxy.stop()


async def test_a_held_message_fails_when_its_deadline_passes(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A relay down for longer than MAILER_MESSAGE_TTL: the message is `failed` with the reason,
    not held forever."""
    smtp_server.controller.stop()
    await mail_worker(message_ttl="PT2S")
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    entries = await log_until(redis_url, lambda log: _statuses(log)["failed"] == 1, 15)
    failed = next(e for e in entries if e.status == "failed")
    assert "deadline" in failed.detail
    smtp_server.controller = _start_controller(smtp_server.handler, smtp_server.port)


async def test_the_circuit_state_is_readable_for_ops(redis_url: str) -> None:
    """`relay_states` shows an open circuit with its reason and the setting to fix, and a
    closed one after a good probe; the hold doubles after each failed probe."""
    redis = await connect(redis_url)
    try:
        circuit = RelayCircuit(redis, relay="smtp:relay:587", base_ms=1000, cap_ms=8000)
        fault = RelayFault(
            "535 5.7.8 bad credentials", code=535, healable=False, setting="MAILER_SMTP_PASSWORD"
        )
        first = await circuit.trip(fault, now_ms=10_000)
        assert first.fresh
        assert 10_500 <= first.until_ms <= 11_000
        again = await circuit.trip(fault, now_ms=10_100)  # a late fault from the same outage
        assert not again.fresh
        assert again.until_ms == first.until_ms
        assert again.failures == 1
        second = await circuit.trip(fault, now_ms=first.until_ms)  # a failed probe
        assert second.failures == 2
        assert 1000 <= second.until_ms - first.until_ms <= 2000
        (state,) = await relay_states(redis)
        assert state.open
        assert state.setting == "MAILER_SMTP_PASSWORD"
        assert not state.healable
        assert state.code == 535
        assert "bad credentials" in state.reason
        assert await circuit.close(now_ms=20_000)
        (state,) = await relay_states(redis)
        assert not state.open
    finally:
        await redis.aclose()


def _instances() -> list[BaseException]:
    """One instance of every exception class aiosmtplib.errors defines."""
    made: list[BaseException] = []
    for _name, cls in inspect.getmembers(aiosmtplib.errors, inspect.isclass):
        if not issubclass(cls, BaseException) or cls.__module__ != "aiosmtplib.errors":
            continue
        if issubclass(cls, aiosmtplib.SMTPRecipientsRefused):
            made.append(cls([aiosmtplib.SMTPRecipientRefused(550, "no", "a@b.c")]))
        elif issubclass(cls, (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPRecipientRefused)):
            made.append(cls(550, "no", "a@b.c"))
        elif issubclass(cls, aiosmtplib.SMTPResponseException):
            made.append(cls(-1, "malformed"))
        else:
            made.append(cls("something"))
    return made


@pytest.mark.parametrize("exc", _instances(), ids=lambda e: type(e).__name__)
def test_every_aiosmtplib_error_is_mapped(exc: BaseException) -> None:
    """Each aiosmtplib exception becomes one of mailer's DeliveryErrors, in a transaction and
    when connecting, and none is mistaken for an internal error."""
    in_transaction = _map_smtp_error(exc, recipient="a@b.c", data_sent=False)
    connecting = _map_connect_error(exc)
    for mapped in (in_transaction, connecting):
        assert isinstance(mapped, DeliveryError)
        assert "internal error" not in mapped.detail
    assert isinstance(connecting, RelayFault)  # nothing before MAIL is the message's fault
    if isinstance(exc, TimeoutError):
        assert isinstance(in_transaction, TimeoutDeliveryError)


def test_a_bug_is_an_internal_error_not_a_retry() -> None:
    """A TypeError in the send path is not "delivery trouble" to retry for hours."""
    mapped = _map_smtp_error(TypeError("oops"), recipient="a@b.c", data_sent=False)
    assert mapped.detail.startswith("internal error")
    assert not isinstance(mapped, RelayFault)
    from mailer.errors import PermanentDeliveryError

    assert isinstance(mapped, PermanentDeliveryError)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("mail.example.org", True),
        ("localhost", False),
        ("web1", False),
        ("[127.0.0.1]", True),
        ("127.0.0.1", False),
        ("host.localdomain", False),
    ],
)
def test_fully_qualified_ehlo_names(name: str, ok: bool) -> None:
    """EHLO takes a dotted domain that is not *.localdomain, or a bracketed address literal; a bare IP
    or a single label is refused."""
    assert is_fully_qualified(name) is ok


def test_a_non_fqdn_ehlo_name_is_warned_about(make_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    """`localhost` in EHLO is refused by relays with reject_non_fqdn_helo_hostname: say so at start."""
    caplog.set_level(logging.WARNING, logger="mailer")
    SmtpTransport(make_settings(smtp_host="127.0.0.1", smtp_local_hostname="localhost"))
    assert any("MAILER_SMTP_LOCAL_HOSTNAME" in r.getMessage() for r in caplog.records)


class _QuitRecorder(RecordingHandler):
    def __init__(self) -> None:
        super().__init__()
        self.quits = 0

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        self.quits += 1
        return "221 Bye"


async def test_an_idle_connection_is_closed_with_quit(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A kept-open connection idle for MAILER_SMTP_IDLE_SECONDS is ended with QUIT by us, before
    the relay's own timeout ends it (Postfix logs that as "timeout after END-OF-MESSAGE")."""
    smtp_server.controller.stop()
    handler = _QuitRecorder()
    smtp_server.controller = _start_controller(handler, smtp_server.port)
    await mail_worker(smtp_idle_seconds=0.5)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await wait_for(lambda: len(handler.received) == 1)
    await wait_for(lambda: handler.quits == 1, 5)


async def test_a_message_that_cannot_be_built_fails_alone(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A message whose build raises something nobody foresaw (here: a stored locale Babel does
    not know) is `failed` once with the reason; the rest of its batch is sent, and nothing
    stays `claimed` with a growing attempt count."""
    from mailer.events import parse_event
    from mailer.lifecycle.planner import Planner
    from mailer.lifecycle.scheduler import Scheduler
    from mailer.state.store import registration_key

    settings = await mail_worker(max_attempts=3)
    redis = await connect(redis_url)
    try:
        # Planned but not yet sent, as after a restart: the re-drive sends them as one batch.
        await Planner(redis, default_offsets=settings.reminder_offsets).apply(
            [parse_event(e) for e in _events(3, "b")]
        )
        await redis.hset(registration_key("b-1"), "al", "zz")
        await Scheduler(redis, batch_size=50).redrive_due(now_ms=int(time.time() * 1000) + 60_000)
        entries = await log_until(
            redis_url, lambda log: _statuses(log)["sent"] == 2 and _statuses(log)["failed"]
        )
        failed = [e for e in entries if e.status == "failed"]
        assert [e.registration_id for e in failed] == ["b-1"]
        assert "internal error" in failed[0].detail
        state = await redis.hget(registration_key("b-1"), "m:confirmation")
        assert state.startswith(b"failed|1|")
    finally:
        await redis.aclose()


async def test_workers_agree_on_the_text_after_a_description_only_update(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """A description changed by event.updated sends no notice, but every later mail shows the
    new text: the worker's caches are keyed on the content, not on the version."""
    await mail_worker()
    first = make_event(
        event_id="d1", registration_id="d-1", email="d1@example.org", description="Alte Beschreibung"
    )
    async with MailerClient(redis_url) as client:
        await client.publish(first)
        await wait_for(lambda: len(smtp_server.handler.received) == 1)
        updated = dict(first["event"], description="Neue Beschreibung")
        later = datetime.now(UTC).isoformat()
        # One inbox, drained in order: the update is applied before the next registration.
        await client.publish({"type": "event.updated", "id": "d2", "occurred_at": later, "event": updated})
        second = make_event(event_id="d3", registration_id="d-2", email="d2@example.org", event=updated)
        await client.publish(second)
    await wait_for(lambda: len(smtp_server.handler.received) == 2)
    text = smtp_server.handler.received[1].message.get_body(("plain",)).get_content()
    assert "Neue Beschreibung" in text
    assert "Alte Beschreibung" not in text


# --- hostile relays: arbitrary replies never crash the send path ---------------------------

_reply_lines = st.one_of(
    st.binary(max_size=60),
    st.sampled_from(
        [
            b"250 OK\r\n",
            b"354 go\r\n",
            b"421 4.3.2 bye\r\n",
            b"550 5.1.1 no\r\n",
            b"451 later\r\n",
            b"250-more\r\n",
            b"999 what\r\n",
            b"\r\n",
            b"2",
            b"250 " + b"x" * 70_000 + b"\r\n",
            b"HANGUP",
        ]
    ),
)


async def _hostile_send(greeting: bytes, replies: list[bytes], make_settings: Any) -> Any:
    """Send one message through mailer's transport to a server that greets and answers EHLO as
    told, then answers each later line it gets with the next of `replies` ("HANGUP" closes)."""
    script = list(replies)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(greeting)
            while line := await reader.readline():
                if line.upper().startswith(b"EHLO"):
                    writer.write(b"250-relay.example.org\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n")
                elif script:
                    answer = script.pop(0)
                    if answer == b"HANGUP":
                        break
                    writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(smtp_host="127.0.0.1", smtp_port=port, smtp_timeout=0.3)
    transport = SmtpTransport(settings)
    try:
        return await asyncio.wait_for(
            transport.send(
                sender="a@example.org", recipient="b@example.org", data=b"Subject: x\r\n\r\nhi\r\n"
            ),
            5,
        )
    except DeliveryError as exc:
        return exc
    finally:
        await transport.close()
        server.close()


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replies=st.lists(_reply_lines, max_size=6))
def test_arbitrary_replies_after_the_greeting_end_in_a_delivery_outcome(
    replies: list[bytes], make_settings: Any
) -> None:
    """Whatever a relay answers to MAIL, RCPT, DATA and the message, the transport returns an
    acceptance or raises one of mailer's DeliveryErrors, within its timeouts: never another
    exception, never a hang."""
    outcome = asyncio.run(_hostile_send(b"220 relay.example.org ESMTP\r\n", replies, make_settings))
    assert isinstance(outcome, DeliveryError) or outcome.code in range(200, 300)
    if isinstance(outcome, DeliveryError):
        assert "internal error" not in outcome.detail


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(greeting=_reply_lines)
def test_an_arbitrary_greeting_is_a_relay_fault(greeting: bytes, make_settings: Any) -> None:
    """A relay that greets with garbage (or not at all) is a relay fault, never the message's."""
    outcome = asyncio.run(_hostile_send(greeting, [], make_settings))
    if not isinstance(outcome, DeliveryError):
        return  # a greeting that happens to be valid: then an empty script means no reply
    assert isinstance(outcome, RelayFault) or outcome.detail.startswith(("timed out", "connection lost"))
    assert "internal error" not in outcome.detail


async def test_a_stored_record_that_cannot_be_read_fails_its_messages_alone(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """An event or registration in Redis that no longer decodes (written by an older version,
    edited by hand) fails the messages that need it, with the reason; the rest of the batch is sent."""
    from mailer.events import parse_event
    from mailer.lifecycle.planner import Planner
    from mailer.lifecycle.scheduler import Scheduler
    from mailer.state.store import event_key, registration_key

    settings = await mail_worker(max_attempts=3)
    other_event = {"id": "other-evening", "title": "Zweiter Abend"}
    events = [
        *_events(2, "s"),
        make_event(event_id="s-x", registration_id="s-9", email="s9@example.org", event=other_event),
    ]
    redis = await connect(redis_url)
    try:
        await Planner(redis, default_offsets=settings.reminder_offsets).apply(
            [parse_event(e) for e in events]
        )
        await redis.hset(event_key("other-evening"), "data", b"{not json")
        await redis.hset(registration_key("s-1"), "c", b"yesterday")
        await Scheduler(redis, batch_size=50).redrive_due(now_ms=int(time.time() * 1000) + 60_000)
        entries = await log_until(
            redis_url, lambda log: _statuses(log)["sent"] == 1 and _statuses(log)["failed"] == 2
        )
        failed = {e.registration_id: e.detail for e in entries if e.status == "failed"}
        assert set(failed) == {"s-1", "s-9"}
        assert all("cannot be read" in detail for detail in failed.values()), failed
        assert [r.rcpt_tos[0] for r in smtp_server.handler.received] == ["s0@example.org"]
    finally:
        await redis.aclose()


async def test_held_mail_is_left_alone_while_a_probe_is_out(
    redis_url: str, make_settings: Any, running_worker: Any
) -> None:
    """A relay that accepts connections and never greets: each probe takes MAILER_SMTP_TIMEOUT.
    Meanwhile the tick does not re-drive the held mail (it would only be claimed and held again,
    every second, all of it): a held message's state changes about twice per probe, not per tick."""
    from mailer.state.store import registration_key

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never a greeting; the client gives up after its timeout
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # One message per send job: only the probing job holds claims; the others would churn.
        settings = make_settings(
            redis_url=redis_url, smtp_host="127.0.0.1", smtp_port=port, smtp_timeout=3.0, batch_size=1
        )
        await running_worker(settings)
        async with MailerClient(redis_url) as client:
            await client.publish_many(_events(10, "p"))
        await log_until(redis_url, lambda log: _statuses(log)["held"] >= 10, 15)
        redis = await connect(redis_url)
        states: dict[str, set[bytes]] = {f"p-{i}": set() for i in range(10)}
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                async with redis.pipeline(transaction=False) as pipe:
                    for rid in states:
                        pipe.hget(registration_key(rid), "m:confirmation")
                    for rid, state in zip(states, await pipe.execute(), strict=True):
                        states[rid].add(state)
                await asyncio.sleep(0.05)
        finally:
            await redis.aclose()
        most = max(len(seen) for seen in states.values())
        # About two probes of 3 s in 8 s, each a claim and a hold: not a re-hold every second.
        assert most <= 6, {rid: sorted(seen) for rid, seen in states.items()}
    finally:
        server.close()


async def test_a_late_outcome_does_not_overwrite_what_another_worker_recorded(redis_url: str) -> None:
    """A send that outlived its lease was re-claimed and sent by another worker (sent, attempt 2);
    the first worker's late 'retrying' must not overwrite it (that made it go out a third time).
    Its log entry is still written: it says what that worker saw."""
    from mailer.state.deliverylog import LogEntry, append_parts
    from mailer.state.message_states import MessageStore
    from mailer.state.messages import MessageRef, MessageState
    from mailer.state.store import registration_key

    entry = LogEntry(ts="2026-12-02T10:00:00+00:00", status="retrying", message_id="late-1/confirmation")
    logged = append_parts(entry, max_entries=1000, indexed=False)
    redis = await connect(redis_url)
    try:
        ref = MessageRef("late-1", "confirmation")
        theirs = MessageState("sent", 2, 1, 2, 0).encode()
        await redis.hset(registration_key("late-1"), ref.field, theirs)
        late = MessageState("retrying", 1, 1, 3, 99_999)
        await MessageStore(redis).step((ref, late, 1, logged), None)
        assert await redis.hget(registration_key("late-1"), ref.field) == theirs.encode()
        assert await redis.zscore("mailer:due", ref.id) is None
        assert await redis.xlen("mailer:log") == 1
        # While it is still ours (sending, attempt 1), the outcome is recorded.
        await redis.hset(registration_key("late-1"), ref.field, MessageState("sending", 1, 1, 2, 9).encode())
        await MessageStore(redis).step((ref, late, 1, logged), None)
        assert await redis.hget(registration_key("late-1"), ref.field) == late.encode().encode()
    finally:
        await redis.aclose()


def test_an_unforeseen_connect_error_is_a_relay_fault_not_a_dead_letter() -> None:
    """An IDNA error for a host name (or any surprise while connecting) holds the mail and names
    the setting; before, it failed every message permanently and a probe took it as success."""
    mapped = _map_connect_error(UnicodeError("label too long"))
    assert isinstance(mapped, RelayFault)
    assert not mapped.healable
    assert mapped.setting is not None
    assert "MAILER_SMTP_HOST" in mapped.setting


async def test_a_probe_opens_a_fresh_connection_not_a_pooled_one(
    smtp_server: Any, make_settings: Any
) -> None:
    """A probe must ask the relay: a connection kept from before the fault would answer nothing."""
    transport = SmtpTransport(make_settings(smtp_host=smtp_server.host, smtp_port=smtp_server.port))
    opened: list[int] = []
    real_open = transport._open

    async def counting_open() -> Any:
        opened.append(1)
        return await real_open()

    transport._open = counting_open  # type: ignore[method-assign]
    try:
        await transport.send(
            sender="a@example.org", recipient="b@example.org", data=b"Subject: x\r\n\r\nx\r\n"
        )
        assert len(opened) == 1  # one connection, now idle in the pool
        await transport.probe()
        assert len(opened) == 2  # the probe did not take the pooled one
    finally:
        await transport.close()


async def test_a_hold_does_not_overwrite_a_message_another_worker_now_sends(redis_url: str) -> None:
    """The tail of a slow batch: its claims lapsed and another worker re-claimed and is sending
    them. The first worker's hold (or skip, or failure) must leave them alone; written over
    'sending', a third worker would send them again when the hold ran out."""
    from mailer.state.message_states import MessageStore
    from mailer.state.messages import MessageRef, MessageState
    from mailer.state.store import registration_key

    redis = await connect(redis_url)
    try:
        store = MessageStore(redis)
        ours, theirs = MessageRef("tail-1", "confirmation"), MessageRef("tail-2", "confirmation")
        await redis.hset(registration_key("tail-1"), ours.field, MessageState("claimed", 1, 1, 2, 9).encode())
        busy = MessageState("sending", 2, 1, 3, 9).encode()  # re-claimed (attempt 2) elsewhere
        await redis.hset(registration_key("tail-2"), theirs.field, busy)
        held = MessageState("held", 0, 1, 4, 99_000)
        assert await store.settle([(ours, 1, held), (theirs, 1, held)]) == [True, False]
        assert await redis.hget(registration_key("tail-1"), ours.field) == held.encode().encode()
        assert await redis.hget(registration_key("tail-2"), theirs.field) == busy.encode()
        assert await redis.zscore("mailer:due", ours.id) == 99_000
        assert await redis.zscore("mailer:due", theirs.id) is None
    finally:
        await redis.aclose()
