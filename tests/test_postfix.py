"""Against a real Postfix: STARTTLS required, SASL logins, strict pipelining, delivery to a Maildir."""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mailer.intake.client import MailerClient
from tests.conftest import log_until, make_event, wait_for
from tests.postfix import PostfixRelay, postfix_relay

__all__ = ["postfix_relay"]  # the fixture, imported so that pytest finds it here

StartRelay = Callable[..., PostfixRelay]

# What Postfix logs when a client breaks the protocol or is refused; none may appear.
POSTFIX_COMPLAINTS = (
    "improper command pipelining",
    "reject:",
    "bare <LF>",
    "lost connection",
    "timeout after",
    "too many errors",
    "warning:",
    "fatal:",
    "panic:",
)


def registrations(n: int, relay: PostfixRelay, prefix: str) -> list[dict[str, Any]]:
    return [
        make_event(
            event_id=f"{prefix}-e{i}",
            registration_id=f"{prefix}-r{i}",
            email=f"{prefix}{i}@{relay.domain}",
        )
        for i in range(n)
    ]


async def publish(redis_url: str, events: list[dict[str, Any]]) -> None:
    async with MailerClient(redis_url) as client:
        report = await client.publish_many(events)
    assert report.accepted == len(events), report.invalid


def copies_per_recipient(relay: PostfixRelay) -> Counter[str]:
    """How many times each address got a mail, by the Delivered-To header Postfix adds."""
    return Counter(str(m["Delivered-To"]) for m in relay.messages())


def sent_to(entries: list[Any]) -> Counter[str]:
    return Counter(e.recipient for e in entries if e.status == "sent")


async def no_failed_for(redis_url: str, seconds: float) -> list[Any]:
    """Watch the delivery log for `seconds`: the test fails at the first `failed` entry."""
    deadline = time.monotonic() + seconds
    entries: list[Any] = []

    def settled(found: list[Any]) -> bool:
        nonlocal entries
        entries = found
        failed = [e for e in found if e.status == "failed"]
        assert not failed, f"dead-lettered while the relay was at fault: {failed[:3]}"
        return time.monotonic() >= deadline

    await log_until(redis_url, settled, within=seconds + 5)
    return entries


def error_lines(log_path: Any, setting: str) -> list[str]:
    return [
        line
        for line in log_path.read_text(errors="replace").splitlines()
        if "ERROR" in line and setting in line
    ]


def test_private_relays_side_by_side_are_strict_and_stop_clean(postfix_relay: StartRelay) -> None:
    """Two relays, own ports and logs; a command pipelined after EHLO is refused; stop leaves nothing."""
    strict, other = postfix_relay(), postfix_relay(auth=False)
    assert strict.port != other.port
    assert strict.processes()
    assert other.processes()
    with socket.create_connection((strict.host, strict.port), 5) as conn, conn.makefile("rb") as reader:
        assert reader.readline().startswith(b"220 ")
        conn.sendall(b"EHLO mailer.test\r\nNOOP\r\n")  # EHLO is a sync point (RFC 2920)
        assert reader.readline().startswith(b"554 5.5.0")
        assert reader.read() == b""  # and Postfix hangs up
    assert strict.logged("improper command pipelining after EHLO"), strict.log()
    assert "improper command pipelining" not in other.log()

    strict.stop()
    assert not strict.processes()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((strict.host, strict.port), 5).close()
    assert other.processes()  # stopping one instance leaves the other alone


async def test_confirmations_arrive_once_each_and_parse_without_defects(
    redis_url: str, postfix_relay: StartRelay, worker_process: Any
) -> None:
    """20 confirmations over STARTTLS and AUTH: each delivered once, clean MIME, no Postfix complaint."""
    relay = postfix_relay()
    events = registrations(20, relay, "conf")
    addresses = {e["registration"]["attendee"]["email"] for e in events}
    worker_process(redis_url, relay, **relay.worker_env())
    await publish(redis_url, events)

    entries = await log_until(redis_url, lambda es: set(sent_to(es)) >= addresses, within=30)
    await wait_for(lambda: len(relay.delivered()) >= len(addresses), 15, 0.05)
    # Postfix's queue manager has delivered everything it accepted: a late copy would show now.
    await wait_for(lambda: relay.deliveries_logged() >= len(addresses), 15, 0.05)

    assert copies_per_recipient(relay) == Counter({a: 1 for a in addresses})
    assert sent_to(entries) == Counter({a: 1 for a in addresses})
    assert not [e for e in entries if e.status in {"failed", "retrying", "uncertain", "rejected"}]
    for message in relay.messages():
        for part in message.walk():
            assert not part.defects, (message["To"], part.get_content_type(), part.defects)
        assert message["Subject"]
        assert {p.get_content_type() for p in message.walk()} >= {"text/plain", "text/html", "text/calendar"}
    log = relay.log()
    assert "TLS connection established" in log
    assert f"sasl_username={relay.username}@{relay.domain}" in log
    assert not [line for line in log.splitlines() if any(c in line for c in POSTFIX_COMPLAINTS)]


async def test_wrong_password_holds_the_queue_until_it_is_fixed(
    redis_url: str, postfix_relay: StartRelay, worker_process: Any
) -> None:
    """535 is the relay's fault: nothing dead-lettered, an ERROR names the password; fixed, all arrive."""
    relay = postfix_relay()
    events = registrations(5, relay, "auth")
    addresses = {e["registration"]["attendee"]["email"] for e in events}
    wrong = "not the password"
    worker = worker_process(
        redis_url,
        relay,
        **relay.worker_env(MAILER_SMTP_PASSWORD=wrong),
        MAILER_MAX_ATTEMPTS="3",
    )
    await publish(redis_url, events)

    await no_failed_for(redis_url, 10)
    assert "authentication failed" in relay.log()
    # After a refused login, no second mechanism on the same connection (Postfix: auth=0/2).
    assert not [line for line in relay.log().splitlines() if " auth=0/2" in line]
    assert error_lines(worker.log_path, "MAILER_SMTP_PASSWORD"), worker.log_path.read_text()[-2000:]
    assert wrong not in worker.log_path.read_text(), "the password itself must never be logged"
    assert not relay.delivered()

    relay.set_password(wrong)  # the operator fixes the relay's side: the worker's login now holds
    entries = await log_until(redis_url, lambda es: set(sent_to(es)) >= addresses, within=60)
    await wait_for(lambda: relay.deliveries_logged() >= len(addresses), 15, 0.05)
    assert copies_per_recipient(relay) == Counter({a: 1 for a in addresses})
    assert not [e for e in entries if e.status == "failed"]


@pytest.mark.parametrize("auth", [False, True], ids=["no-login", "login"])
async def test_plaintext_against_a_relay_that_requires_starttls_holds_the_queue(
    redis_url: str, postfix_relay: StartRelay, worker_process: Any, auth: bool
) -> None:
    """Plaintext where STARTTLS is required (530 5.7.0, or no AUTH offered): held and shouted, not failed."""
    relay = postfix_relay(auth=auth)
    worker = worker_process(
        redis_url,
        relay,
        **relay.worker_env(MAILER_SMTP_SECURITY="none", MAILER_SMTP_ALLOW_PLAINTEXT_AUTH="true"),
        MAILER_MAX_ATTEMPTS="3",
    )
    await publish(redis_url, registrations(5, relay, "plain"))

    await no_failed_for(redis_url, 10)
    if not auth:  # Postfix logs no line for its 530 to MAIL, only the refused count at disconnect
        assert " mail=0/" in relay.log()
    assert error_lines(worker.log_path, "MAILER_SMTP_SECURITY"), worker.log_path.read_text()[-2000:]
    assert worker.alive
    assert not relay.delivered()


async def test_an_untrusted_certificate_holds_the_queue_and_names_the_fix(
    redis_url: str, postfix_relay: StartRelay, worker_process: Any
) -> None:
    """STARTTLS to a relay whose certificate the worker does not trust (no SSL_CERT_FILE): a relay
    fault waiting will not cure: held, not failed, and an ERROR says what to set."""
    relay = postfix_relay(auth=False)
    env = relay.worker_env()
    del env["SSL_CERT_FILE"]
    worker = worker_process(
        redis_url,
        relay,
        **env,
        MAILER_MAX_ATTEMPTS="2",
    )
    await publish(redis_url, registrations(3, relay, "cert"))
    entries = await no_failed_for(redis_url, 6)
    assert sum(e.status == "held" for e in entries) == 3
    assert error_lines(worker.log_path, "SSL_CERT_FILE"), worker.log_path.read_text()[-2000:]
    assert worker.alive
    assert not relay.delivered()
