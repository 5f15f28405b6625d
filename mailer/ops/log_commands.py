"""The commands on the delivery log and on attendees' personal data, and how they print.

Registered on the `mailer` group by mailer/cli.py, which maps their errors to one line and an
exit status (Redis unreachable: 3).
"""

from __future__ import annotations

import asyncio
import getpass
import os
from dataclasses import dataclass

import click

from mailer.ops.embedded import resolve_redis_url
from mailer.settings import Settings, load_settings
from mailer.state.deliverylog import DeliveryLog, LogEntry, LogStatus, forget_recipient
from mailer.state.queue import connect_client
from mailer.state.retention import erase_address

# The status of the entry that records an erasure. The log has no status of its own for it
# yet ("forgotten" is asked of the log's owner); "ignored" is the one no delivery count reads.
ERASURE_STATUS: LogStatus = "ignored"


def operator() -> str:
    """Who runs this command, for the log: the login name, else the uid."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        return f"uid {os.getuid()}"


def _redis_url(settings: Settings) -> str:
    return resolve_redis_url(settings.redis_url, settings.data_dir)


def _address(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    address = value.strip()
    if "@" not in address or any(ch.isspace() for ch in address):
        raise click.BadParameter(f"{value!r} is not an email address")
    return address


@dataclass(frozen=True, slots=True)
class Forgotten:
    """What `mailer forget` removed, and the log entries that record it."""

    registrations: list[tuple[str, str]]  # (registration id, event id)
    log_entries: int
    logged: list[LogEntry]


async def forget_address(settings: Settings, address: str, *, who: str) -> Forgotten:
    """Erase `address` from the registrations and the log; log the erasure without the address."""
    redis = await connect_client(_redis_url(settings))
    try:
        registrations = await erase_address(redis, address)
        entries = await forget_recipient(redis, address)
        log = DeliveryLog(
            redis, max_entries=settings.log_max_entries, echo=None, worker=f"mailer forget by {who}"
        )
        ts = log.now()
        detail = (
            f"personal data erased on request, by {who}: {len(registrations)} registration(s) and "
            f"{entries} log entries named the address"
        )
        logged = [
            LogEntry(
                ts=ts,
                status=ERASURE_STATUS,
                registration_id=rid,
                event_id=event,
                detail=detail,
                worker=log.worker,
            )
            for rid, event in registrations
        ] or [LogEntry(ts=ts, status=ERASURE_STATUS, detail=detail, worker=log.worker)]
        await log.write(logged)
    finally:
        await redis.aclose()
    return Forgotten(registrations, entries, logged)


@click.command()
@click.option("--email", "address", required=True, callback=_address, help="The address, in any letter case.")
def forget(address: str) -> None:
    """Erase an attendee's address and name (GDPR): from every registration and log entry.

    Their registrations end as cancelled, so nothing more is sent to them; message states and
    log entries stay as anonymous counts. The erasure is logged with who ran it and when,
    without the address.
    """
    settings = load_settings()
    done = asyncio.run(forget_address(settings, address, who=operator()))
    click.echo(f"forgot {address}:")
    if done.registrations:
        listed = ", ".join(f"{rid} ({event or 'no event'})" for rid, event in done.registrations)
        click.echo(
            f"  {len(done.registrations)} registration(s): address, name, reference and manage link "
            f"removed; cancelled, no further mail: {listed}"
        )
    else:
        click.echo("  no registration holds this address")
    click.echo(f"  {done.log_entries} delivery-log entries no longer name it")
    click.echo(f"  logged at {done.logged[0].ts} ({done.logged[0].worker})")


COMMANDS: list[click.Command] = [forget]
