"""The delivery log's indexes: a registration's and an address's entries, read without a scan."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.constants import LOG_STREAM
from mailer.intake.client import MailerClient
from mailer.state.deliverylog import DeliveryLog, LogEntry, recipient_index, registration_index
from mailer.state.logquery import indexed_entries, read_log
from mailer.state.queue import connect_client
from tests.conftest import log_until, make_event

REGISTRATIONS = ["reg-1", "reg-2", "reg-3", ""]
ADDRESSES = ["maria@example.org", "Maria@Example.org", "jo@example.org", ""]

entries_strategy = st.lists(
    st.builds(
        LogEntry,
        ts=st.just("2026-12-02T10:00:00.000+00:00"),
        status=st.sampled_from(["planned", "sent", "retrying", "failed", "redriven"]),
        message_id=st.sampled_from(["m1", "m2", "m3"]),
        registration_id=st.sampled_from(REGISTRATIONS),
        recipient=st.sampled_from(ADDRESSES),
        attempt=st.integers(min_value=0, max_value=5),
        detail=st.text(max_size=20),
    ),
    min_size=1,
    max_size=40,
)


async def scan(redis: Any, keep: Any) -> list[bytes]:
    """What the index must give: a brute-force pass over the whole log, newest first."""
    return [e.to_json() async for e in read_log(redis) if keep(e)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(entries_strategy, min_size=1, max_size=4))
async def test_each_index_lists_exactly_what_a_scan_finds(
    redis_url: str, batches: list[list[LogEntry]]
) -> None:
    """For random logs written in random batches: a registration's index gives its entries and
    an address's index gives that address's in any letter case, newest first, as a scan does."""
    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        log = DeliveryLog(redis, max_entries=10_000, echo=None)
        for batch in batches:
            await log.write(batch)
        for registration in filter(None, REGISTRATIONS):
            found = [e.to_json() for e in await indexed_entries(redis, registration_index(registration))]
            assert found == await scan(redis, lambda e, r=registration: e.registration_id == r)
        for address in filter(None, ADDRESSES):
            found = [e.to_json() for e in await indexed_entries(redis, recipient_index(address))]
            assert found == await scan(redis, lambda e, a=address: e.recipient.lower() == a.lower())
        newest = await indexed_entries(redis, registration_index("reg-1"), limit=2)
        assert [e.to_json() for e in newest] == (await scan(redis, lambda e: e.registration_id == "reg-1"))[
            :2
        ]
    finally:
        await redis.aclose()


async def test_entries_the_stream_trimmed_are_skipped(redis_url: str) -> None:
    """An index member whose entry was trimmed from the stream is left out, not an error."""
    redis = await connect_client(redis_url)
    try:
        log = DeliveryLog(redis, max_entries=10_000, echo=None)
        await log.write(
            [LogEntry(ts=log.now(), status="planned", registration_id="r", detail=str(n)) for n in range(5)]
        )
        await redis.execute_command("XTRIM", LOG_STREAM, "MAXLEN", 2)
        kept = await indexed_entries(redis, registration_index("r"))
        assert [e.detail for e in kept] == ["4", "3"]
    finally:
        await redis.aclose()


async def test_the_send_path_indexes_what_it_logs(
    redis_url: str, make_settings: Any, running_worker: Any
) -> None:
    """Entries written by the send path's step script (sent) and by the planner are both in
    their registration's and their address's index; `mailer log --registration` and
    `--recipient` (any case) print what a scan of the whole log prints."""
    settings_ = make_settings(redis_url=redis_url)
    await running_worker(settings_)
    events = [
        make_event(event_id=f"evt-{n}", registration_id=f"reg-{n}", email=f"person{n % 2}@example.org")
        for n in range(4)
    ]
    async with MailerClient(redis_url) as client:
        await client.publish_many(events)
    await log_until(redis_url, lambda log: sum(e.status == "sent" for e in log) == 4)
    redis = await connect_client(redis_url)
    try:
        reg = [e.to_json() for e in await indexed_entries(redis, registration_index("reg-2"))]
        assert reg == await scan(redis, lambda e: e.registration_id == "reg-2")
        assert any(b'"status":"sent"' in line for line in reg)
        by_address = await indexed_entries(redis, recipient_index("PERSON1@example.org"))
        assert {e.registration_id for e in by_address if e.status == "sent"} == {"reg-1", "reg-3"}
    finally:
        await redis.aclose()
    for option in (["--registration", "reg-2"], ["--recipient", "Person1@Example.org"]):
        shown = await asyncio.to_thread(mailer_log, redis_url, *option)
        everything = await asyncio.to_thread(mailer_log, redis_url, "--limit", "1000")
        field = "registration_id" if option[0] == "--registration" else "recipient"
        expected = [line for line in everything if f'"{field}":"{option[1].lower()}"' in line.lower()]
        assert shown, option
        assert shown == expected, option


def mailer_log(redis_url: str, *options: str) -> list[str]:
    """`mailer log --json` with these options, as an operator runs it; its lines."""
    env = {**os.environ, "MAILER_REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "mailer", "log", "--json", *options],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()
