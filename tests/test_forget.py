"""`mailer forget --email ADDRESS`: an attendee's erasure request, answered with one command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mailer.durations import parse_offsets
from mailer.events import parse_event
from mailer.lifecycle.planner import Planner
from mailer.state.deliverylog import DeliveryLog, LogEntry
from mailer.state.logquery import read_log
from mailer.state.queue import connect_client
from mailer.state.store import load_registrations
from tests.clocks import SettableClock
from tests.conftest import event_day, make_event
from tests.test_cli import mailer
from tests.test_retention import created, everything, mentions

ADDRESS = "maria.mueller@example.org"


def env(redis_url: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return clean | {"MAILER_REDIS_URL": redis_url}


async def two_attendees(redis: Any) -> None:
    """Maria registered for two events (once in other letter case), Jo for one; log entries name them."""
    clock = SettableClock()
    planner = Planner(redis, default_offsets=parse_offsets("P1D"), clock=clock)
    await planner.apply(
        [
            created("evt-a", "reg-1", "Maria.Mueller@Example.org", "Maria Müller", event_day(10)),
            created("evt-b", "reg-2", ADDRESS, "Maria Müller", event_day(20)),
            created("evt-a", "reg-3", "jo@example.org", "Jo Beispiel", event_day(10)),
        ]
    )
    log = DeliveryLog(redis, max_entries=10_000, echo=None, clock=clock)
    await log.write(
        [
            LogEntry(
                ts=log.now(),
                status="sent",
                message_id=f"{rid}/confirmation",
                registration_id=rid,
                recipient=to,
            )
            for rid, to in [
                ("reg-1", "Maria.Mueller@Example.org"),
                ("reg-2", ADDRESS),
                ("reg-3", "jo@example.org"),
            ]
        ]
    )


async def test_forget_leaves_the_address_and_name_nowhere_but_keeps_the_counts(
    redis_url: str, tmp_path: Path
) -> None:
    """After `mailer forget --email` (in another letter case), no key or value outside the log
    holds the address or the name in any letter case; her registrations are cancelled and out of
    their events' fan-out sets, with their message states kept; Jo's are untouched; the command
    says what it removed; the erasure is logged with who ran it, without the address."""
    redis = await connect_client(redis_url)
    try:
        await two_attendees(redis)
        done = mailer("forget", "--email", "MARIA.Mueller@example.ORG", cwd=tmp_path, env=env(redis_url))
        assert done.returncode == 0, done.stderr
        out = done.stdout.decode()
        assert "2 registration(s)" in out
        assert "reg-1 (evt-a)" in out
        assert "reg-2 (evt-b)" in out
        stored = await everything(redis)
        left = mentions(stored, ADDRESS, "Maria Müller", log=False)
        assert not left, sorted(left)
        regs = (await load_registrations(redis, ["reg-1", "reg-2", "reg-3"])).found
        assert regs["reg-1"].attendee is None
        assert regs["reg-1"].status == "cancelled"
        assert "m:confirmation" in stored["mailer:reg:reg-1"]
        assert regs["reg-3"].attendee is not None
        assert regs["reg-3"].attendee.email == "jo@example.org"
        assert await redis.smembers("mailer:event:evt-a:regs") == {b"reg-3"}
        assert await redis.smembers("mailer:event:evt-b:regs") == set()
        erasures = [e async for e in read_log(redis) if e.detail.startswith("personal data erased")]
        assert {e.registration_id for e in erasures} == {"reg-1", "reg-2"}
        assert all(ADDRESS not in e.to_json().decode().lower() for e in erasures)
        assert all(e.worker.startswith("mailer forget by ") for e in erasures)
    finally:
        await redis.aclose()


async def test_forget_leaves_the_address_nowhere_in_the_log(redis_url: str, tmp_path: Path) -> None:
    """The delivery log and its indexes no longer name the address either (forget_recipient)."""
    redis = await connect_client(redis_url)
    try:
        await two_attendees(redis)
        assert mailer("forget", "--email", ADDRESS, cwd=tmp_path, env=env(redis_url)).returncode == 0
        left = mentions(await everything(redis), ADDRESS, "Maria Müller")
        assert not left, sorted(left)
    finally:
        await redis.aclose()


async def test_forget_removes_every_piece_of_a_long_name_and_link(redis_url: str, tmp_path: Path) -> None:
    """Name, booking code and management link too long for one field are stored in pieces
    ("rm", "rm.1", ...): forget leaves none of them, only status, event, locale and states."""
    redis = await connect_client(redis_url)
    try:
        registration = make_event(
            registration_id="reg-9", email=ADDRESS, name="Maria-Theresia Müller-Lüdenscheidt " * 8
        )
        registration["registration"].update(
            reference="Ü€𝄞-" * 16, manage_url="https://anmeldung.example.org/r?token=" + "7f3c" * 400
        )
        planner = Planner(redis, default_offsets=parse_offsets("P1D"), clock=SettableClock())
        await planner.apply([parse_event(registration)])
        assert len(await redis.hkeys("mailer:reg:reg-9")) > 30
        assert mailer("forget", "--email", ADDRESS, cwd=tmp_path, env=env(redis_url)).returncode == 0
        left = {field.decode() for field in await redis.hkeys("mailer:reg:reg-9")}
        assert left == {"s", "t", "c", "e", "al", "m:confirmation"}, sorted(left)
    finally:
        await redis.aclose()


async def test_an_address_nobody_has_is_said_so(redis_url: str, tmp_path: Path) -> None:
    """Forgetting an address nothing holds changes nothing, says so, and is still logged."""
    done = mailer("forget", "--email", "nobody@example.org", cwd=tmp_path, env=env(redis_url))
    assert done.returncode == 0, done.stderr
    assert "no registration holds this address" in done.stdout.decode()
    redis = await connect_client(redis_url)
    try:
        (entry,) = [e async for e in read_log(redis)]
    finally:
        await redis.aclose()
    assert entry.detail.startswith("personal data erased on request, by ")
    assert "nobody" not in entry.to_json().decode()


@pytest.mark.parametrize("value", ["", "not-an-address", "a b@example.org"])
def test_a_value_that_is_no_address_is_a_usage_error(tmp_path: Path, value: str) -> None:
    """`--email` must look like an address: else one line and exit 2, nothing touched."""
    done = mailer("forget", "--email", value, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.decode().count("\n") == 1
    assert "--email" in done.stderr.decode()
