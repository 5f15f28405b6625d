"""The `mailer` command: worker, enqueue, retry, render, templates check, schema; log, show, stats,
export and forget come from mailer.ops.log_commands."""

from __future__ import annotations

import asyncio
import codecs
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from click.exceptions import NoArgsIsHelpError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mailer.constants import MESSAGE_KINDS
from mailer.durations import Offset
from mailer.errors import ConfigError, FieldProblem, InvalidEvent, MailerError, QueueUnavailable
from mailer.ops.serve_process import ServeAddress
from mailer.settings import Settings, load_settings
from mailer.state.connection import RedisTarget

T = TypeVar("T")


def _settings() -> Settings:
    return load_settings()


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's Redis work; Redis failing half-way is mapped here, as at connect."""
    try:
        return asyncio.run(coro)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise QueueUnavailable(f"lost the connection to Redis: {exc}") from exc
    except RedisError as exc:  # a refused command: WRONGTYPE, NOPERM, OOM
        raise MailerError(f"Redis refused a command: {exc}") from exc


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _errors_to_exit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One clear line and an exit status for the errors an operator can fix; no traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            click.echo(f"mailer: configuration error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except QueueUnavailable as exc:
            click.echo(f"mailer: {_one_line(exc)}", err=True)
            sys.exit(3)
        except (RedisConnectionError, RedisTimeoutError) as exc:  # commands that run without _run
            click.echo(f"mailer: lost the connection to Redis: {_one_line(exc)}", err=True)
            sys.exit(3)
        except RedisError as exc:
            click.echo(f"mailer: Redis refused a command: {_one_line(exc)}", err=True)
            sys.exit(1)
        except MailerError as exc:
            click.echo(f"mailer: {_one_line(exc)}", err=True)
            sys.exit(1)
        except BrokenPipeError:
            raise  # `mailer log | head`: click ends quietly
        except OSError as exc:  # a file that cannot be read or written
            click.echo(f"mailer: {_one_line(exc)}", err=True)
            sys.exit(1)

    return wrapper


class _UsageLine(click.UsageError):
    """A usage error as one line, naming the command and its --help (click's own takes four)."""

    def show(self, file: Any = None) -> None:
        names: list[str] = []
        ctx = self.ctx
        while ctx is not None:
            # The root's name is "python -m mailer" or a path to the script; say "mailer".
            names.insert(0, (ctx.info_name or "") if ctx.parent is not None else "mailer")
            ctx = ctx.parent
        path = " ".join(names) or "mailer"
        click.echo(f"{path}: {_one_line(self.format_message())} (see '{path} --help')", err=True)


class _Mailer(click.Group):
    """The `mailer` group: every usage error below it, of any subcommand, is one line (exit 2)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _UsageLine(exc.format_message(), exc.ctx) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (NoArgsIsHelpError, _UsageLine):
            raise
        except click.UsageError as exc:
            raise _UsageLine(exc.format_message(), exc.ctx or ctx) from None


def _message_ids(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    from mailer.state.messages import MessageRef

    for value in values:
        try:
            MessageRef.parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return values


def _parsed_by(parse: Callable[[str], T]) -> Callable[[click.Context, click.Parameter, str | None], T | None]:
    """An option callback: the value parsed, or click's usage error with the parser's reason."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: str | None) -> T | None:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def _redis(settings: Settings) -> RedisTarget:
    """The configured Redis (URL or Sentinels), else the embedded server `mailer worker` runs."""
    from mailer.ops.embedded import resolve_redis_target

    return resolve_redis_target(settings)


@click.group(cls=_Mailer)
@click.option("-v", "--verbose", is_flag=True, help="Log debug details to stderr.")
def main(verbose: bool) -> None:
    """mailer sends the emails of an event-registration system: confirmations, reminders,
    change and cancellation notices. Configure it with MAILER_ environment variables or .env."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        logging.getLogger("arq").setLevel(logging.WARNING)


@main.command()
@click.option(
    "--serve",
    "serve_at",
    metavar="HOST:PORT",
    callback=_parsed_by(ServeAddress.parse),
    help="Also run `mailer serve` (dashboard, intake, API) on this address, stopped with the worker.",
)
@_errors_to_exit
def worker(serve_at: ServeAddress | None) -> None:
    """Run the worker: take events from the queue and send the mails they call for.

    Without MAILER_REDIS_URL (or MAILER_REDIS_SENTINELS) it starts a private Redis under
    MAILER_DATA_DIR (default ./var) and stops it on exit. SIGTERM or Ctrl-C: finish the sends
    in flight, then exit 0. With --serve, the HTTP service runs beside it (what `make run` does).
    """
    from mailer.ops.embedded import EmbeddedRedis
    from mailer.ops.serve_process import ServeProcess
    from mailer.worker import run

    settings = _settings()
    embedded = None
    target = RedisTarget.from_settings(settings)
    if target is None:
        embedded = EmbeddedRedis(settings.data_dir)
        target = RedisTarget(url=embedded.start())
        # A redis-server that dies (OOM killer, a stray kill) is started again, with backoff.
        embedded.supervise()
    where = (
        f"SMTP {settings.smtp_host}:{settings.effective_smtp_port} ({settings.smtp_security})"
        if settings.smtp_host
        else f"Maildir outbox {settings.effective_outbox_dir.resolve()}"
    )
    click.echo(f"mailer worker: Redis {target.describe()}; mail goes to {where}", err=True)
    companion = None
    if serve_at is not None:
        companion = ServeProcess(serve_at)
        companion.start()
        click.echo(
            f"mailer worker: dashboard at {serve_at.url} (mailer serve, stopped with the worker)", err=True
        )
    if embedded is not None:
        click.echo(
            "send the sample event from another terminal in this directory with:\n"
            "    .venv/bin/mailer enqueue examples/registration.json",
            err=True,
        )
    try:
        status = _run(run(settings, target))
    finally:
        if companion is not None:
            companion.stop()
        if embedded is not None:
            embedded.stop()
    sys.exit(status)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True, help="The TCP port.")
@_errors_to_exit
def serve(host: str, port: int) -> None:
    """Run the HTTP service: POST /v1/events for registration systems in any language (with a
    token from MAILER_API_TOKEN), the dashboard at / (login with such a token; no login when
    bound to 127.0.0.1 without one), /healthz and /readyz for probes, /docs for the API.

    It uses the worker's Redis (MAILER_REDIS_URL, or the embedded one under MAILER_DATA_DIR);
    start `mailer worker` too, which sends what comes in."""
    import uvicorn

    from mailer.web.app import create_app

    settings = _settings()
    # Without a token the dashboard needs no login only where nobody else can reach it.
    loopback = host in ("127.0.0.1", "localhost", "::1")
    app = create_app(settings, _redis(settings), open_dashboard=loopback)
    intake = "on" if settings.api_tokens else "off (set MAILER_API_TOKEN)"
    login = "no login (loopback only)" if loopback else "login off: set MAILER_API_TOKEN"
    if settings.api_tokens:
        login = "token login"
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"mailer serve: dashboard at http://{shown}:{port}/ ({login}); API docs at /docs; intake {intake}",
        err=True,
    )
    # uvicorn's access log would print each request line; the app logs its own, with the
    # request id and without query strings.
    uvicorn.run(app, host=host, port=port, access_log=False, log_config=None, server_header=False)


def _read(source: str) -> bytes:
    """The bytes of a file (or stdin), without the byte-order mark Windows editors put first."""
    data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :]
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # PowerShell's `>` writes these
        return data.decode("utf-16", errors="replace").encode()
    return data


def _records(data: bytes) -> list[tuple[str, Any]]:
    """(where, record) from a JSON object, a JSON array or NDJSON; input that is not JSON as
    InvalidEvent. `where` is "line N" (NDJSON, a single object), "item N" (an array file) or
    "line N item M" (an array on one NDJSON line)."""
    try:
        whole = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        whole_error = exc
    else:
        if isinstance(whole, list):
            return [(f"item {i}", item) for i, item in enumerate(whole, start=1)]
        return [("line 1", whole)]
    records: list[tuple[str, Any]] = []
    parsed = lines = 0
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip().removeprefix(codecs.BOM_UTF8)  # files pasted together keep theirs
        if not line:
            continue
        lines += 1
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            records.append(
                (f"line {number}", InvalidEvent([FieldProblem("(line)", f"not valid JSON: {exc}")]))
            )
            continue
        parsed += 1
        if isinstance(value, list):
            records += [(f"line {number} item {i}", item) for i, item in enumerate(value, start=1)]
        else:
            records.append((f"line {number}", value))
    if lines > 1 and not parsed:
        # Not NDJSON at all, but one JSON document with an error: say where, once.
        return [("file", InvalidEvent([FieldProblem("(file)", f"not valid JSON: {whole_error}")]))]
    return records


def _validate(records: list[tuple[str, Any]]) -> tuple[list[Any], list[tuple[str, InvalidEvent]]]:
    """The valid records, and (where, error) for each refused one."""
    from mailer.events import parse_event

    valid: list[Any] = []
    refused: list[tuple[str, InvalidEvent]] = []
    for where, record in records:
        if isinstance(record, InvalidEvent):
            refused.append((where, record))
            continue
        try:
            parse_event(record)
        except InvalidEvent as exc:
            refused.append((where, exc))
        else:
            valid.append(record)
    return valid, refused


@main.command()
@click.argument(
    "source", metavar="PATH|-", type=click.Path(exists=True, dir_okay=False, readable=True, allow_dash=True)
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate and show what would be planned, sent, rescheduled or cancelled; change nothing.",
)
@_errors_to_exit
def enqueue(source: str, dry_run: bool) -> None:
    """Validate events from a JSON or NDJSON file (or - for stdin) and put them on the queue.

    Invalid records are reported with line, field and reason, on stderr and as `rejected`
    entries in the delivery log; the valid ones are still enqueued. A UTF-8 byte-order mark is
    ignored. Exit status 1 if any record was invalid.
    """
    settings = _settings()
    raws, refused = _validate(_records(_read(source)))
    sys.exit(_report_and_publish(settings, raws, refused, dry_run=dry_run, name="mailer enqueue"))


def _report_and_publish(
    settings: Settings,
    raws: list[Any],
    refused: list[tuple[str, InvalidEvent]],
    *,
    dry_run: bool,
    name: str,
) -> int:
    """What every file intake does after validating (enqueue, import-csv): each refusal on
    stderr as "WHERE: FIELD: REASON", then the valid events published and the refusals logged
    as `rejected` under `name`, or the dry run's plan; the exit status (1 if any was refused)."""
    from mailer.intake.client import MailerClient

    for where, error in refused:
        for problem in error.problems or [FieldProblem("(record)", str(error))]:
            click.echo(f"{where}: {problem.field}: {_one_line(problem.reason)}", err=True)

    async def go() -> None:
        if dry_run:
            await _dry_run(settings, raws)
            return
        async with MailerClient(
            _redis(settings), log_max_entries=settings.log_max_entries, name=name
        ) as client:
            report = await client.publish_many(raws)
            await client.log_refusals(refused)
        click.echo(
            f"enqueued {report.accepted} event(s) in {report.jobs} job(s); {len(refused)} invalid", err=True
        )

    _run(go())
    return 1 if refused else 0


async def _dry_run(settings: Settings, raws: list[Any]) -> None:
    from mailer.events import parse_event
    from mailer.lifecycle.planner import Planner
    from mailer.state.queue import connect_client

    redis = await connect_client(_redis(settings))
    try:
        planner = Planner(redis, default_offsets=settings.reminder_offsets)
        plan = await planner.apply([parse_event(r) for r in raws], dry_run=True)
    finally:
        await redis.aclose()
    click.echo(f"dry run: {len(raws)} valid event(s); nothing was changed")
    for (action, kind, locale), count in sorted(plan.counts.items()):
        if count:
            label = "all locales" if locale == "*" else locale
            verb = {"send": "would send", "schedule": "would (re)schedule"}.get(action, action)
            click.echo(f"  {verb:>20} {count:>7} × {kind} ({label})")
    for (_action, kind), sample in sorted(plan.samples.items()):
        click.echo(f"  first recipients of {kind}: {', '.join(sample)}")
    for note in plan.notes:
        click.echo(f"  {note.status}: {note.source_event} {note.message_id} {note.detail}".rstrip())


def _csv_map(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, tuple[str, ...]]:
    from mailer.errors import UnreadableImport
    from mailer.intake.csv_import import parse_map

    try:
        return parse_map(values)
    except UnreadableImport as exc:
        raise click.BadParameter(str(exc)) from None


@main.command("import-csv")
@click.argument("source", metavar="FILE", type=click.Path(exists=True, dir_okay=False, readable=True))
@click.option(
    "--event",
    "event_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, readable=True),
    help="The event every row registers for (JSON: id, title, starts_at, ...; or a whole "
    "registration.created event, whose event part is taken).",
)
@click.option(
    "--map",
    "mapping",
    multiple=True,
    callback=_csv_map,
    metavar="FIELD=COLUMN,...",
    help="Which column fills which field: id, email, name (Vorname+Nachname joins two), locale, "
    "reference, manage_url. Without it, headers such as E-Mail, Name, Sprache are recognised.",
)
@click.option(
    "--encoding", help="The file's encoding. Default: UTF-8 (with or without BOM), else Windows-1252."
)
@click.option(
    "--separator",
    type=click.Choice([";", ",", "tab"]),
    help="The column separator. Default: sniffed from the first rows.",
)
@click.option("--dry-run", is_flag=True, help="Validate and show what would be sent; change nothing.")
@_errors_to_exit
def import_csv(
    source: str,
    event_file: str,
    mapping: dict[str, tuple[str, ...]],
    encoding: str | None,
    separator: str | None,
    dry_run: bool,
) -> None:
    """Register each row of a CSV export (a survey tool's, Excel's) for one event: a
    registration.created event per row, validated and reported as `mailer enqueue` does.

    A row without a mapped id column gets one derived from the event and the address, so
    importing the same file again registers nobody twice. Exit status 1 if any row was
    refused, 2 if the file or the event cannot be used at all.
    """
    from mailer.clock import iso, utc_now
    from mailer.errors import UnreadableImport
    from mailer.intake.csv_import import RowEvents, load_event, read_table, resolve_columns

    settings = _settings()
    try:
        event = load_event(Path(event_file).read_bytes())
    except UnreadableImport as exc:
        raise click.BadParameter(f"{event_file}: {exc}", param_hint="'--event'") from None
    try:
        table = read_table(
            Path(source).read_bytes(), encoding=encoding, separator="\t" if separator == "tab" else separator
        )
        columns = resolve_columns(table.header, mapping)
    except UnreadableImport as exc:
        raise click.UsageError(f"{source}: {exc}") from None
    shown = "tab" if table.separator == "\t" else repr(table.separator)
    click.echo(
        f"{source}: {table.encoding}, separator {shown}, {len(table.rows)} row(s); {columns.describe()}",
        err=True,
    )
    rows = RowEvents(columns, event, iso(utc_now()))
    raws: list[Any] = []
    refused: list[tuple[str, InvalidEvent]] = []
    for row in _progress(table.rows, "checking rows"):
        where, converted = rows.convert(row)
        if isinstance(converted, InvalidEvent):
            refused.append((where, converted))
        else:
            raws.append(converted)
    sys.exit(_report_and_publish(settings, raws, refused, dry_run=dry_run, name="mailer import-csv"))


def _progress(items: list[T], what: str) -> Iterator[T]:
    """The items, with a progress bar on stderr while it is a terminal (never in a pipe or a log)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from mailer.ops.log_views import console

    if not sys.stderr.isatty():
        yield from items
        return
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as progress:
        task = progress.add_task(what, total=len(items))
        for item in items:
            yield item
            progress.advance(task)


@main.command()
@_errors_to_exit
def health() -> None:
    """Say whether Redis answers and whether a relay's circuit holds the mail.

    Exit status 0 ok, 1 degraded (a relay circuit is open: mail is held, nothing lost),
    2 down (Redis unreachable); for container and monitoring health checks.
    """
    from mailer.ops.health import EXIT_STATUS, Health, check

    settings = _settings()
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    try:
        report = _run(check(_redis(settings), now_ms=now_ms))
    except QueueUnavailable as exc:  # the embedded Redis is not running, for one
        report = Health("down", [f"redis: unreachable ({_one_line(exc)})"])
    for line in report.lines:
        click.echo(line)
    click.echo(report.verdict)
    sys.exit(EXIT_STATUS[report.verdict])


@main.command()
def schema() -> None:
    """Print the event contract as JSON Schema."""
    from mailer.events import json_schema

    click.echo(orjson.dumps(json_schema(), option=orjson.OPT_INDENT_2).decode())


@main.command()
@click.argument("message_ids", nargs=-1, callback=_message_ids)
@click.option(
    "--status",
    type=click.Choice(["failed", "skipped"]),
    help="Re-drive every message whose latest log entry has this status.",
)
@click.option("--kind", help="Only this kind.")
@click.option("--event", "event_id", help="Only this event id.")
@click.option(
    "--since",
    callback=_parsed_by(Offset.parse),
    help="Only entries newer than this ISO 8601 duration (e.g. PT6H, P1D).",
)
@_errors_to_exit
def retry(
    message_ids: tuple[str, ...],
    status: str | None,
    kind: str | None,
    event_id: str | None,
    since: Offset | None,
) -> None:
    """Re-drive failed messages: the same Message-ID, a fresh attempt budget."""
    from mailer.ops.redrive import Redriven, latest_with_status, redrive
    from mailer.state.messages import MessageRef
    from mailer.state.queue import connect_client

    if not message_ids and not status:
        raise click.UsageError("name MESSAGE_IDs or --status")
    settings = _settings()
    cutoff = None
    if since:
        cutoff = datetime.now(UTC) - timedelta(days=since.days, seconds=since.seconds)

    async def go() -> Redriven:
        redis = await connect_client(_redis(settings))
        try:
            chosen = list(message_ids)
            if status:
                chosen += await latest_with_status(redis, status, kind=kind, event_id=event_id, since=cutoff)
            refs = [MessageRef.parse(m) for m in dict.fromkeys(chosen)]
            who = f"mailer retry by {_user()}"
            return await redrive(redis, refs, who=who, log_max_entries=settings.log_max_entries)
        finally:
            await redis.aclose()

    done = _run(go())
    for message_id, was in done.refused.items():
        why = f"it is {was}" if was else "mailer has no such message"
        click.echo(
            f"mailer retry: {message_id} not re-driven: {why} (only failed or skipped ones are)", err=True
        )
    click.echo(f"re-driven {len(done.planned)} message(s)")
    if done.refused and message_ids:
        raise SystemExit(1)


def _user() -> str:
    from mailer.ops.log_commands import operator

    return operator()


@main.command()
@click.argument(
    "kind",
    type=click.Choice(MESSAGE_KINDS),
)
@click.option(
    "--event",
    "event_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A registration.created event (JSON) to take the data from.",
)
@click.option("--locale", type=click.Choice(["de", "en"]), help="Override the attendee's locale.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=".", show_default=True)
@click.option(
    "--previous",
    "previous_file",
    type=click.Path(exists=True, dir_okay=False),
    help="The event (JSON) as it was before the change: required for event_changed.",
)
@_errors_to_exit
def render(kind: str, event_file: str, locale: str | None, out_dir: str, previous_file: str | None) -> None:
    """Write KIND.LOCALE.eml and KIND.LOCALE.html: see what attendees get, as the pipeline would
    send it for this registration (and, for a change notice, this previous event)."""
    from mailer.ops.preview import preview

    if kind == "event_changed" and previous_file is None:
        raise click.UsageError("event_changed needs --previous FILE: the event as it was before the change")
    settings = _settings()
    previous = Path(previous_file).read_bytes() if previous_file else None
    built, loc = preview(settings, kind, Path(event_file).read_bytes(), locale, previous=previous)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.{loc}.eml").write_bytes(built.data)
    (out / f"{kind}.{loc}.html").write_text(built.html, encoding="utf-8")
    click.echo(f"{built.subject}\nwrote {out / f'{kind}.{loc}.eml'} and {out / f'{kind}.{loc}.html'}")


@main.group()
def templates() -> None:
    """Work with the email templates."""


@templates.command("check")
@_errors_to_exit
def templates_check() -> None:
    """Render every kind in every locale against sample data; fail on any error."""
    from mailer.ops.preview import check_all

    settings = _settings()
    failures = 0
    for kind, locale, problem in check_all(settings):
        if problem:
            failures += 1
            click.echo(f"FAIL {kind}/{locale}: {problem}", err=True)
        else:
            click.echo(f"ok   {kind}/{locale}")
    sys.exit(1 if failures else 0)


def _register_log_commands() -> None:
    """The log and personal-data commands live in mailer.ops.log_commands; their errors end here."""
    from mailer.ops.log_commands import COMMANDS

    for command in COMMANDS:
        assert command.callback is not None
        command.callback = _errors_to_exit(command.callback)
        main.add_command(command)


_register_log_commands()
