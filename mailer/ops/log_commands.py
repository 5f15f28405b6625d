"""The commands on the delivery log and on attendees' personal data: log, show, stats, export, forget.

What they read is mailer.ops.log_reading's, how they print mailer.ops.log_views'. Registered on
the `mailer` group by mailer/cli.py, which maps their errors to one line and an exit status
(Redis unreachable: 3).
"""

from __future__ import annotations

import asyncio
import csv
import getpass
import os
import sys
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO, TypeVar

import click
import orjson
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from mailer.clock import utc_now
from mailer.constants import LOG_KINDS
from mailer.content.ics import calendar_uid
from mailer.durations import Offset
from mailer.errors import MailerError
from mailer.lifecycle.kinds import KINDS
from mailer.ops import log_views
from mailer.ops.embedded import resolve_redis_target
from mailer.ops.log_reading import LogQuery, entries, stats, timeline
from mailer.settings import Settings, load_settings
from mailer.state.deliverylog import LOG_STATUSES, DeliveryLog, LogEntry, LogStatus, position_of
from mailer.state.logerase import forget_recipient
from mailer.state.logquery import top_position
from mailer.state.messages import MessageRef
from mailer.state.queue import connect_client
from mailer.state.redis_types import RedisClient
from mailer.state.retention import erase_address, registrations_holding
from mailer.state.store import load_registrations

T = TypeVar("T")

# `mailer log` without --limit or --all; the output says so when it cut something.
DEFAULT_LIMIT = 50
# --follow looks for new entries this often.
FOLLOW_POLL_SECONDS = 0.5
# Rows per table when --all prints a table: one table per page, so memory stays flat.
TABLE_PAGE = 500

# The status of the entry that records an erasure. The log has no status of its own for it
# yet ("forgotten" is asked of the log's owner); "ignored" is the one no delivery count reads.
ERASURE_STATUS: LogStatus = "ignored"


def operator() -> str:
    """Who runs this command, for the log: the login name, else the uid."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        return f"uid {os.getuid()}"


def _with_redis(settings: Settings, work: Callable[[RedisClient], Coroutine[Any, Any, T]]) -> T:
    async def go() -> T:
        redis = await connect_client(resolve_redis_target(settings))
        try:
            return await work(redis)
        finally:
            await redis.aclose()

    return asyncio.run(go())


def _moment(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    """A time for --since/--until: an ISO 8601 duration back from now (PT1H, P7D), or an ISO 8601
    date or time with a UTC offset (2026-12-02, 2026-12-02T10:00+01:00)."""
    if value is None:
        return None
    text = value.strip()
    if text.upper().startswith("P"):
        try:
            back = Offset.parse(text)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        return utc_now() - timedelta(days=back.days, seconds=back.seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither a duration (PT1H) nor a date or time (2026-12-02)"
        ) from None
    if moment.tzinfo is None:
        if "T" in text or " " in text:
            raise click.BadParameter(f"{value!r} needs a UTC offset, e.g. {text}+01:00 or {text}Z")
        moment = moment.replace(tzinfo=UTC)  # a date alone: midnight UTC
    return moment


def _message_id(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            MessageRef.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The filter options `mailer log` and `mailer export` share."""
    options = [
        click.option("--recipient", help="Only this address (any letter case)."),
        click.option("--registration", help="Only this registration id."),
        click.option("--reference", help="Only this reference (the registration system's booking code)."),
        click.option(
            "--message", callback=_message_id, help="Only this message id (REGISTRATION/KIND[/DETAIL])."
        ),
        click.option("--event", "event_id", help="Only this event id."),
        click.option("--status", type=click.Choice(LOG_STATUSES), help="Only this status."),
        click.option("--kind", type=click.Choice(LOG_KINDS), help="Only this kind of message."),
        click.option(
            "--since", callback=_moment, help="From this time on: PT1H (an hour ago), 2026-12-02, ..."
        ),
        click.option("--until", callback=_moment, help="Before this time (same forms as --since)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _query(filters: dict[str, Any]) -> LogQuery:
    return LogQuery(
        recipient=filters["recipient"],
        registration=filters["registration"],
        reference=filters["reference"],
        message=filters["message"],
        event=filters["event_id"],
        status=filters["status"],
        kind=filters["kind"],
        since=filters["since"],
        until=filters["until"],
    )


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
    redis = await connect_client(resolve_redis_target(settings))
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


@click.command("log")
@_filters
@click.option(
    "--limit", type=click.IntRange(min=1), default=DEFAULT_LIMIT, show_default=True, help="At most this many."
)
@click.option("--all", "every", is_flag=True, help="Every matching entry, page by page (no limit).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option(
    "-f", "--follow", is_flag=True, help="Oldest first, then new entries as they come (Ctrl-C ends)."
)
def log_command(limit: int, every: bool, as_json: bool, follow: bool, **filters: Any) -> None:
    """Show the delivery log, newest first: did Ms X get her mail, and if not, why?

    Every filter reads an index kept with each entry (by registration, address, event,
    status, kind), so the first page comes at once whatever the log's size.
    """
    settings = load_settings()
    query = _query(filters)
    printer = _Printer(as_json=as_json)

    async def go(redis: RedisClient) -> None:
        shown: list[LogEntry] = []
        # One more than the limit tells whether the limit cut something.
        async for entry in entries(redis, query, page=500 if every else limit + 1):
            if not every and len(shown) >= limit:
                click.echo(
                    f"mailer log: showing the newest {limit} entries; more match (--limit N or --all)",
                    err=True,
                )
                break
            shown.append(entry)
            if not follow:
                printer.add(entry, flush_at=TABLE_PAGE if every else None)
        if follow:
            for entry in reversed(shown):
                printer.add(entry)
        printer.flush()
        if follow:
            await _follow(redis, query, shown, printer)

    try:
        _with_redis(settings, go)
    except KeyboardInterrupt:
        printer.flush()


class _Printer:
    """Entries out as JSON lines at once, or as tables of up to a page (a table needs its rows)."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self.pending: list[LogEntry] = []
        self.console = log_views.console()
        self.tables = 0

    def add(self, entry: LogEntry, *, flush_at: int | None = None) -> None:
        if self.as_json:
            sys.stdout.write(entry.to_json().decode() + "\n")
            return
        self.pending.append(entry)
        if flush_at is not None and len(self.pending) >= flush_at:
            self.flush()

    def flush(self) -> None:
        if self.as_json:
            sys.stdout.flush()
            return
        if self.pending:
            self.console.print(log_views.entry_table(self.pending, header=self.tables == 0))
            self.tables += 1
        self.pending = []


async def _follow(redis: RedisClient, query: LogQuery, shown: list[LogEntry], printer: _Printer) -> None:
    """Print new matching entries, oldest first, as they are written (polling; Ctrl-C ends).

    Stream ids only grow, so what is new is what lies above the newest id seen."""
    last = max((position_of(e.entry_id) for e in shown if e.entry_id), default=await top_position(redis))
    while True:
        await asyncio.sleep(FOLLOW_POLL_SECONDS)
        fresh: list[LogEntry] = []
        async for entry in entries(redis, query):
            if position_of(entry.entry_id) <= last:
                break
            fresh.append(entry)
        for entry in reversed(fresh):
            printer.add(entry)
        if fresh:
            last = position_of(fresh[0].entry_id)
        printer.flush()


def _since(query: LogQuery, moment: datetime) -> LogQuery:
    if query.since is not None and query.since > moment:
        return query
    return replace(query, since=moment)


@click.command()
@click.argument("ident", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The entries as JSON lines, oldest first.")
def show(ident: str, as_json: bool) -> None:
    """The timeline of a registration (ID) or of one message (REGISTRATION/KIND[/DETAIL]): every
    message, every attempt, with its calendar file's UID, oldest first."""
    settings = load_settings()
    if "/" in ident:
        try:
            MessageRef.parse(ident)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="ID") from None
    story = _with_redis(settings, lambda redis: timeline(redis, ident))
    if not story.messages and not story.other:
        raise MailerError(f"no log entries for {ident}")
    if as_json:
        for message in story.messages:
            for entry in message.entries:
                click.echo(entry.to_json().decode())
        for entry in story.other:
            click.echo(entry.to_json().decode())
        return

    def uid(event_id: str, message_id: str) -> str | None:
        ref = MessageRef.parse(message_id)
        if KINDS[ref.kind].calendar is None:
            return None
        return calendar_uid(event_id, ref.registration_id, uid_domain=settings.sender_domain)

    log_views.console().print(log_views.timeline_view(story, uid=uid))


@click.command("stats")
@click.option("--event", "event_id", help="Only this event id.")
@click.option("--since", callback=_moment, help="From this time on: PT1H (an hour ago), 2026-12-02, ...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def stats_command(event_id: str | None, since: datetime | None, as_json: bool) -> None:
    """Counts per status and kind, delivery latency (planned → sent), dead letters, and the oldest
    message not yet sent, failed or skipped: for one event or all."""
    settings = load_settings()
    result = _with_redis(settings, lambda redis: stats(redis, LogQuery(event=event_id, since=since)))
    if as_json:
        body = {"event_id": event_id, "since": since.isoformat() if since else None} | result.as_dict()
        click.echo(orjson.dumps(body).decode())
        return
    title = f"delivery log{f' of event {event_id}' if event_id else ''}"
    title += f" since {since:%Y-%m-%d %H:%M} UTC" if since else ""
    log_views.console().print(log_views.stats_view(result, title=title))


@click.command()
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), required=True, help="CSV or JSON lines."
)
@_filters
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, writable=True), help="A file instead of stdout."
)
def export(fmt: str, output: str | None, **filters: Any) -> None:
    """Write the matching log entries as CSV or JSON lines, newest first, with a progress bar on
    stderr; streamed, so memory does not grow with the number of entries.

    With --recipient it answers an access request: the registrations holding the address come
    first (record "registration": name, address, locale, reference, manage link), then every
    log entry naming it (record "log").
    """
    settings = load_settings()
    query = _query(filters)
    with ExitStack() as stack:
        out: TextIO = (
            stack.enter_context(open(output, "w", newline="", encoding="utf-8")) if output else sys.stdout
        )
        counts = _with_redis(settings, lambda redis: _export(redis, query, fmt, out))
    where = output or "stdout"
    click.echo(f"exported {counts[0]} registration(s) and {counts[1]} log entries to {where}", err=True)


async def _export(redis: RedisClient, query: LogQuery, fmt: str, out: TextIO) -> tuple[int, int]:
    writer = csv.writer(out, lineterminator="\n")

    def put(record: dict[str, Any]) -> None:
        if fmt == "csv":
            writer.writerow(log_views.csv_row(record))
        else:
            out.write(orjson.dumps(log_views.jsonl_record(record)).decode() + "\n")

    if fmt == "csv":
        writer.writerow(log_views.EXPORT_FIELDS)
    registrations = logged = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("exporting: {task.completed} rows"),
        TimeElapsedColumn(),
        console=log_views.console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task("export", total=None)
        if query.recipient:
            ids = await registrations_holding(redis, query.recipient)
            for registration in (await load_registrations(redis, ids)).found.values():
                put(log_views.registration_record(registration))
                registrations += 1
        async for entry in entries(redis, query):
            put(log_views.log_record(entry))
            logged += 1
            if logged % 1000 == 0:
                progress.update(task, completed=registrations + logged)
                out.flush()
        progress.update(task, completed=registrations + logged)
    out.flush()
    return registrations, logged


COMMANDS: list[click.Command] = [log_command, show, stats_command, export, forget]
