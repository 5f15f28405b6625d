"""How the log commands print: Rich tables and trees for people, JSON lines and CSV for programs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from mailer.ops.log_reading import LogStats, Timeline, kind_of
from mailer.state.deliverylog import LOG_STATUSES, LogEntry
from mailer.state.store import StoredRegistration

STYLES = {
    "sent": "green",
    "failed": "bold red",
    "retrying": "yellow",
    "held": "yellow",
    "uncertain": "bold yellow",
    "skipped": "dim",
    "ignored": "dim",
    "rejected": "magenta",
    "redriven": "cyan",
    "foreign": "red",
}

# One schema for both export formats: log entries and, for an access request, the registrations
# that hold the address, told apart by `record`.
REGISTRATION_FIELDS = ("name", "locale", "reference", "manage_url", "registration_status")
EXPORT_FIELDS = ("record", *LogEntry.__slots__, *REGISTRATION_FIELDS)


def console(*, stderr: bool = False) -> Console:
    """A console for stdout (or stderr); into a pipe or a file, wide enough that each row stays
    one line for grep, as no terminal's width applies there."""
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        out = Console(stderr=stderr, highlight=False, width=max(out.width, 1000))
    return out


def shown_time(entry: LogEntry) -> str:
    """ "2026-12-02 10:00:00.123" (UTC; the log writes UTC)."""
    return entry.ts.replace("T", " ").removesuffix("+00:00")


def detail_of(entry: LogEntry) -> str:
    """The reply and the reason, in one cell: "451 4.7.1 greylisted", "skipped: event started"."""
    parts = [str(entry.smtp_code) if entry.smtp_code else "", entry.enhanced_code or "", entry.detail]
    if entry.source_event:
        parts.append(f"(event {entry.source_event})")
    return " ".join(p for p in parts if p)


def entry_table(entries: Iterable[LogEntry], *, header: bool = True) -> Table:
    """The entries as a table, one row each, in the order given."""
    table = Table(box=box.SIMPLE_HEAD, show_header=header, show_edge=False, pad_edge=False)
    for name, style in (("time (UTC)", "dim"), ("status", ""), ("kind", ""), ("recipient", "")):
        table.add_column(name, style=style, no_wrap=True)
    table.add_column("message", overflow="fold")
    table.add_column("try", justify="right")
    table.add_column("detail", overflow="fold")
    for e in entries:
        table.add_row(
            shown_time(e),
            Text(e.status, style=STYLES.get(e.status, "")),
            kind_of(e),
            e.recipient,
            e.message_id,
            str(e.attempt) if e.attempt else "",
            detail_of(e),
        )
    return table


def log_record(entry: LogEntry) -> dict[str, Any]:
    return {"record": "log"} | {name: getattr(entry, name) for name in LogEntry.__slots__}


def registration_record(registration: StoredRegistration) -> dict[str, Any]:
    """A stored registration as an export row: what an access request must show."""
    attendee = registration.attendee
    return {
        "record": "registration",
        "registration_id": registration.id,
        "event_id": registration.event_id or "",
        "recipient": attendee.email if attendee else "",
        "name": attendee.name if attendee else "",
        "locale": attendee.locale if attendee else "",
        "reference": registration.reference or "",
        "manage_url": registration.manage_url or "",
        "registration_status": registration.status,
    }


def csv_row(record: dict[str, Any]) -> list[str]:
    return ["" if record.get(name) is None else str(record.get(name, "")) for name in EXPORT_FIELDS]


def jsonl_record(record: dict[str, Any]) -> dict[str, Any]:
    """Without empty fields, as `mailer log --json` writes entries."""
    return {k: v for k, v in record.items() if v not in (None, "")}


_VERSION = re.compile(r"/v(\d+)$")


def timeline_view(story: Timeline, *, uid: Callable[[str, str], str | None]) -> RenderableType:
    """A registration's messages as a tree: each message, its outcome, its calendar file, its entries.

    `uid(event_id, message_id)` is the calendar UID of the message's file, None if it has none.
    """
    title = Text.assemble(("registration ", "bold"), story.registration_id)
    if story.event_id:
        title.append(f" · event {story.event_id}")
    if story.recipient:
        title.append(f" · {story.recipient}")
    tree = Tree(title)
    for message in story.messages:
        label = Text.assemble(
            (f"{message.kind:<22} ", "bold"),
            (message.status, STYLES.get(message.status, "")),
            f"  {message.message_id}  attempts: {message.attempts}",
        )
        now = message.current
        if now is not None and not now.final:
            due = f", next look {message.due:%Y-%m-%d %H:%M} UTC" if message.due else ""
            label.append(f"  now: {now.status}{due}", style=STYLES.get(now.status, ""))
        calendar = uid(story.event_id, message.message_id) if story.event_id else None
        if calendar:
            # The SEQUENCE the file was sent with; an older log has only the id's version.
            version = _VERSION.search(message.message_id)
            sequence = message.sequence if message.sequence is not None else version and version.group(1)
            label.append(f"  calendar UID {calendar}" + ("" if sequence is None else f" SEQUENCE {sequence}"))
        branch = tree.add(label)
        if message.entries:
            branch.add(entry_table(message.entries, header=False))
    if story.other:
        tree.add(Text("not about one message", style="bold")).add(entry_table(story.other, header=False))
    if not story.messages and not story.other:
        tree.add(Text("no log entries", style="dim"))
    return tree


def stats_view(result: LogStats, *, title: str) -> RenderableType:
    """Counts per kind and status, latency percentiles, dead letters, the oldest message waiting."""
    statuses = [s for s in LOG_STATUSES if any(status == s for status, _ in result.counts)]
    kinds = sorted({kind for _, kind in result.counts})
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, title_justify="left")
    table.add_column("kind")
    for status in statuses:
        table.add_column(Text(status, style=STYLES.get(status, "")), justify="right")
    table.add_column("all", justify="right", style="bold")
    for kind in kinds:
        row = [result.counts.get((status, kind), 0) for status in statuses]
        table.add_row(kind or "(none)", *(str(n) if n else "" for n in row), str(sum(row)))
    totals = [sum(n for (s, _), n in result.counts.items() if s == status) for status in statuses]
    table.add_row(Text("all", style="bold"), *(str(n) for n in totals), str(sum(totals)))
    lines: list[RenderableType] = [table]
    if result.latency_ms:
        shown = ", ".join(f"{name} {value / 1000:.1f} s" for name, value in result.latency_ms.items())
        lines.append(Text(f"planned → sent, {result.sent} messages: {shown}"))
    lines.append(Text(f"dead letters (failed, `mailer retry` re-drives them): {result.dead_letters}"))
    if result.oldest_waiting:
        message_id, waiting, since = result.oldest_waiting
        lines.append(
            Text(f"oldest message not yet final: {message_id} ({waiting}, since {since:%Y-%m-%d %H:%M} UTC)")
        )
    if result.uncounted_before:
        lines.append(
            Text(
                f"entries before {result.uncounted_before:%Y-%m-%d %H:%M} UTC were written by an older "
                "mailer and are not in these counts (`mailer stats --since` counts entry by entry)",
                style="yellow",
            )
        )
    return Group(*lines)
