"""`mailer import-csv FILE --event EVENT.json`: survey exports (German Excel's Windows-1252 and
";", UTF-8 with a BOM, quoted cells over several lines) become registrations that a real worker
sends; every bad row is named by line, column and reason, a bad file or mapping is one line."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RedisServer, SmtpServer, log_until, make_event, settled, wait_for
from tests.test_cli import clean_env, enqueue_env, mailer, rejected_entries

ROOT = Path(__file__).resolve().parent.parent
HEADER = "E-Mail;Name;Sprache"


def write_event(directory: Path, **overrides: Any) -> Path:
    """event.json: the event part of the city's dialog evening, relative to today."""
    path = directory / "event.json"
    path.write_bytes(orjson.dumps(make_event(**overrides)["event"]))
    return path


def import_csv(
    tmp_path: Path, redis_url: str, data: bytes, *args: str, name: str = "export.csv"
) -> subprocess.CompletedProcess[bytes]:
    (tmp_path / name).write_bytes(data)
    if not (tmp_path / "event.json").exists():
        write_event(tmp_path)
    return mailer(
        "import-csv", name, "--event", "event.json", *args, cwd=tmp_path, env=enqueue_env(redis_url)
    )


def excel(*rows: str) -> bytes:
    """Rows as German Excel saves "CSV (Trennzeichen-getrennt)": Windows-1252, CRLF."""
    return "".join(row + "\r\n" for row in rows).encode("cp1252")


def stderr_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stderr.decode().strip().splitlines()


async def test_a_windows_1252_export_with_semicolons_reaches_the_attendees_with_their_umlauts(
    tmp_path: Path, redis_url: str, smtp_server: SmtpServer, mail_worker: Callable[..., Any]
) -> None:
    """German Excel's export (cp1252, ";", CRLF, first and last name apart) goes through the
    worker: each confirmation reaches the relay addressed to the right name, umlauts intact."""
    await mail_worker()
    data = excel(
        "Vorname;Nachname;E-Mail;Sprache",
        "Jürgen;Groß;juergen.gross@example.org;Deutsch",
        "Zoë;Weiß;zoe.weiss@example.org;de",
        "Jane;Doe;jane.doe@example.org;English",
    )
    result = await asyncio.to_thread(import_csv, tmp_path, redis_url, data)
    assert result.returncode == 0, result.stderr
    assert stderr_lines(result) == [
        "export.csv: cp1252, separator ';', 3 row(s);"
        " email ← E-Mail, locale ← Sprache, name ← Vorname+Nachname",
        "enqueued 3 event(s) in 1 job(s); 0 invalid",
    ]
    await wait_for(lambda: len(smtp_server.handler.received) == 3, 20)
    by_address = {r.rcpt_tos[0]: r.message for r in smtp_server.handler.received}
    juergen = by_address["juergen.gross@example.org"]
    assert juergen["To"].addresses[0].display_name == "Jürgen Groß"
    plain = juergen.get_body(("plain",))
    assert plain is not None
    assert "Guten Tag Jürgen Groß," in plain.get_content()
    assert by_address["zoe.weiss@example.org"]["To"].addresses[0].display_name == "Zoë Weiß"
    assert by_address["zoe.weiss@example.org"]["Content-Language"] == "de"
    assert by_address["jane.doe@example.org"]["Content-Language"] == "en"


async def test_importing_the_same_export_again_registers_nobody_twice(
    tmp_path: Path, redis_url: str, smtp_server: SmtpServer, mail_worker: Callable[..., Any]
) -> None:
    """The ids come from the event and the address: the next day's export (rows in another
    order, a new one first, an address in capitals) sends only the new registration's mail."""
    await mail_worker()
    first = await asyncio.to_thread(
        import_csv, tmp_path, redis_url, excel(HEADER, "a@example.org;Anna;de", "b@example.org;Bernd;de")
    )
    assert first.returncode == 0, first.stderr
    await wait_for(lambda: len(smtp_server.handler.received) == 2, 20)
    again = excel(HEADER, "c@example.org;Clara;de", "B@Example.org;Bernd;de", "a@example.org;Anna;de")
    second = await asyncio.to_thread(import_csv, tmp_path, redis_url, again)
    assert second.returncode == 0, second.stderr
    await log_until(redis_url, lambda entries: sum(e.status == "ignored" for e in entries) == 2)
    await wait_for(lambda: len(smtp_server.handler.received) == 3, 20)
    await settled(redis_url)
    assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == [
        "a@example.org",
        "b@example.org",
        "c@example.org",
    ]


async def test_utf8_with_a_bom_commas_and_a_cell_over_several_lines(
    tmp_path: Path, redis_url: str, smtp_server: SmtpServer, mail_worker: Callable[..., Any]
) -> None:
    """A UTF-8 export with a BOM and "," separators whose comment cell spans lines: the rows after
    it are read whole, and a refusal names the line its row starts on."""
    await mail_worker()
    text = (
        "\ufeffemail,name,Kommentar,locale\r\n"
        'ayse@example.org,Ayşe Yılmaz,"Ich komme\r\nmit Rollstuhl, bitte\r\nBescheid geben",de\r\n'
        "kaputt,Kein Name,,de\r\n"
        'li@example.org,"Li, Wei",,en\r\n'
    )
    result = await asyncio.to_thread(import_csv, tmp_path, redis_url, text.encode())
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert lines[0] == (
        "export.csv: utf-8, separator ',', 3 row(s); email ← email, name ← name, locale ← locale"
    )
    assert lines[1].startswith("line 5: email: 'kaputt' is not a valid email address"), lines
    assert lines[2] == "enqueued 2 event(s) in 1 job(s); 1 invalid"
    await wait_for(lambda: len(smtp_server.handler.received) == 2, 20)
    names = {r.message["To"].addresses[0].display_name for r in smtp_server.handler.received}
    assert names == {"Ayşe Yılmaz", "Li, Wei"}
    [entry] = rejected_entries(tmp_path, redis_url)
    assert str(entry["detail"]).startswith("line 5: email: 'kaputt' is not a valid email address")
    assert entry["worker"] == "mailer import-csv"


async def test_a_column_mapping_with_a_registration_id_and_reference(
    tmp_path: Path, redis_url: str, smtp_server: SmtpServer, mail_worker: Callable[..., Any]
) -> None:
    """--map names the columns a survey tool chose: the registration id and booking code come
    from the file and show in the delivery log; columns are matched regardless of case."""
    await mail_worker()
    data = excel("Teilnehmer-Nr;Adresse;Wer;Code", "KL-0815;maria@example.org;Maria Müller;B-17")
    result = await asyncio.to_thread(
        import_csv,
        tmp_path,
        redis_url,
        data,
        "--map",
        "id=teilnehmer-nr,email=Adresse",
        "--map",
        "name=Wer,reference=Code",
    )
    assert result.returncode == 0, result.stderr
    assert "id ← Teilnehmer-Nr, email ← Adresse, name ← Wer, reference ← Code" in stderr_lines(result)[0]
    entries = await log_until(redis_url, lambda entries: any(e.status == "sent" for e in entries), 20)
    sent = next(e for e in entries if e.status == "sent")
    assert (sent.registration_id, sent.reference, sent.recipient) == ("KL-0815", "B-17", "maria@example.org")


def test_a_dry_run_checks_and_plans_but_changes_nothing(tmp_path: Path, redis_url: str) -> None:
    """--dry-run reports the bad rows and what would be sent; Redis stays empty (no queue, no log)."""
    result = import_csv(
        tmp_path, redis_url, excel(HEADER, "a@example.org;Anna;de", "kaputt;B;de"), "--dry-run"
    )
    assert result.returncode == 1
    assert "dry run: 1 valid event(s); nothing was changed" in result.stdout.decode()
    assert "would send" in result.stdout.decode()
    assert stderr_lines(result)[1].startswith("line 3: E-Mail: 'kaputt' is not a valid email address")
    assert redis.Redis.from_url(redis_url).dbsize() == 0


# --- hostile files and arguments ------------------------------------------------------------

ROWS_OK = ["a@example.org;Anna;de"]
HOSTILE_ROWS: dict[str, tuple[list[str], str]] = {
    # case: (rows after the header and a good row, what stderr says); one of them is refused
    "too many cells": (["b@example.org;Bernd;de;extra"], "line 3: (row): has 4 cells, the header has 3"),
    "too few cells": (["b@example.org;Bernd"], "line 3: (row): has 2 cells, the header has 3"),
    "invalid email": (
        ["bernd(at)example.org;Bernd;de"],
        "line 3: E-Mail: 'bernd(at)example.org' is not a valid",
    ),
    "empty email": ([";Bernd;de"], "line 3: E-Mail: is empty"),
    "unknown locale": (["b@example.org;Bernd;fr"], "line 3: Sprache: Input should be 'de' or 'en'"),
    "name with a header injection": (
        ['b@example.org;"Bernd\r\nBcc: victim@example.org";de'],
        "line 3: Name: must not contain control characters or line breaks",
    ),
    "name with a control character": (
        ["b@example.org;Be\x1brnd;de"],
        "line 3: Name: must not contain control",
    ),
    "the same address twice": (
        ["b@example.org;Bernd;de", "B@EXAMPLE.ORG;Bernd B.;de"],
        "line 4: E-Mail: the same address as line 3: imported once",
    ),
    "a huge cell": (
        ["b@example.org;" + "x" * 200_000 + ";de"],
        "line 3: (row): a cell holds more than 131072",
    ),
    "a name too long for a header": (
        ["b@example.org;" + "x" * 400 + ";de"],
        "line 3: Name: String should have at most 300",
    ),
    "a quote that never closes": (
        ['b@example.org;"Bernd;de', "c@example.org;C;de"],
        "line 3: (row): a quoted cell is not closed",
    ),
    "a stray quote": (['b@example.org;"Be"rnd;de'], "line 3: (row): not CSV: ';' expected after '\"'"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ROWS))
def test_a_bad_row_is_named_by_line_and_column_and_the_good_rows_still_go(
    case: str, tmp_path: Path, redis_url: str
) -> None:
    """Each bad row: one line per problem naming the line its row starts on, the column and the
    reason; the good row is enqueued, the bad one is a `rejected` log entry; exit status 1."""
    rows, said = HOSTILE_ROWS[case]
    data = "".join(f"{r}\r\n" for r in [HEADER, *ROWS_OK, *rows]).encode("utf-8")
    result = import_csv(tmp_path, redis_url, data)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "Traceback" not in err
    assert said in err, err
    accepted = 2 if case == "the same address twice" else 1
    assert err.strip().splitlines()[-1] == f"enqueued {accepted} event(s) in 1 job(s); 1 invalid", err
    [entry] = rejected_entries(tmp_path, redis_url)
    assert str(entry["detail"]).startswith(said.split(": ", 1)[0] + ": "), entry


def binary_garbage() -> bytes:
    return bytes(range(256)) * 4


HOSTILE_FILES: dict[str, tuple[bytes, list[str], str]] = {
    # case: (file, extra arguments, the one line on stderr)
    "an empty file": (b"", [], "the file is empty: it needs a header row"),
    "only blank lines": (b"\r\n\r\n  \r\n", [], "the file is empty"),
    "only separators": (b";;;\r\n;;\r\n", [], "no header row naming the columns"),
    "no email column": (
        excel("Name;Sprache", "Anna;de"),
        [],
        "no email column (map one with --map email=COLUMN)",
    ),
    "the mapped column twice": (
        excel("E-Mail;Name;E-Mail", "a@example.org;Anna;b@example.org"),
        [],
        "'E-Mail' (column 1) and 'E-Mail' (column 3) could each be email",
    ),
    "two columns that could be email": (
        excel("email;E-Mail;Name", "a@example.org;b@example.org;Anna"),
        [],
        "'email' (column 1) and 'E-Mail' (column 2) could each be email: choose one with --map email=COLUMN",
    ),
    "a mapped column that appears twice": (
        excel("Adresse;Adresse", "a@example.org;b@example.org"),
        ["--map", "email=Adresse"],
        "column 'Adresse' appears 2 times (columns 1, 2): rename one",
    ),
    "mapped columns the file lacks": (
        excel(HEADER, *ROWS_OK),
        ["--map", "email=Mail,name=Vorname+Nachname"],
        "no column 'Mail'; no column 'Vorname'; no column 'Nachname';"
        " the header has 'E-Mail', 'Name', 'Sprache'",
    ),
    "binary garbage": (binary_garbage(), [], "not utf-8 nor cp1252 text: byte 0x81 on line 2"),
    "not UTF-8 nor Windows-1252": (
        b"E-Mail;Name\r\na@example.org;\x81\x8d\r\n",
        [],
        "not utf-8 nor cp1252 text: byte 0x81 on line 2",
    ),
    "a spreadsheet instead of CSV": (
        b"PK\x03\x04\x14\x00\x06\x00" + bytes(40),
        [],
        "the file holds NUL bytes",
    ),
    "a wrong --encoding": (
        excel(HEADER, "a@example.org;Jürgen;de"),
        ["--encoding", "utf-8"],
        "not utf-8 text: byte 0xfc on line 2",
    ),
    "an unknown --encoding": (
        excel(HEADER, *ROWS_OK),
        ["--encoding", "klingon"],
        "unknown encoding 'klingon'",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_a_file_that_cannot_be_used_is_one_line_and_exit_2(case: str, tmp_path: Path, redis_url: str) -> None:
    """A file mailer cannot read as a whole, or whose columns are missing or ambiguous, imports
    nothing: one line naming the file and what is wrong, exit status 2, nothing logged."""
    data, args, said = HOSTILE_FILES[case]
    result = import_csv(tmp_path, redis_url, data, *args)
    lines = stderr_lines(result)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("mailer import-csv: export.csv: "), lines
    assert said in lines[0], lines
    assert redis.Redis.from_url(redis_url).dbsize() == 0


BAD_ARGUMENTS: dict[str, tuple[list[str], str]] = {
    "a file that does not exist": (["missing.csv", "--event", "event.json"], "'missing.csv' does not exist"),
    "no --event": (["export.csv"], "Missing option '--event'"),
    "an unknown field in --map": (
        ["export.csv", "--event", "event.json", "--map", "mail=E-Mail,vorname=Name"],
        "unknown field 'mail'; unknown field 'vorname'"
        " (fields: id, email, name, locale, reference, manage_url)",
    ),
    "a --map pair without =": (
        ["export.csv", "--event", "event.json", "--map", "email"],
        "'email' is not FIELD=COLUMN",
    ),
    "a field mapped twice": (
        ["export.csv", "--event", "event.json", "--map", "email=E-Mail", "--map", "email=Mail"],
        "'email' is mapped twice",
    ),
    "an event that breaks the contract": (
        ["export.csv", "--event", "broken-event.json"],
        "event.title: is required",
    ),
    "an event file that is not JSON": (["export.csv", "--event", "export.csv"], "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_a_bad_argument_is_one_line_and_exit_2(case: str, tmp_path: Path, redis_url: str) -> None:
    """A missing file, a bad --map or an unusable event: one line, exit status 2, nothing queued."""
    args, said = BAD_ARGUMENTS[case]
    (tmp_path / "export.csv").write_bytes(excel(HEADER, *ROWS_OK))
    write_event(tmp_path)
    broken = make_event()["event"]
    del broken["title"]
    (tmp_path / "broken-event.json").write_bytes(orjson.dumps(broken))
    result = mailer("import-csv", *args, cwd=tmp_path, env=enqueue_env(redis_url))
    lines = stderr_lines(result)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, lines
    assert lines[0].startswith("mailer import-csv: "), lines
    assert said in lines[0], lines
    assert redis.Redis.from_url(redis_url).dbsize() == 0


def test_a_header_only_export_imports_nothing_and_succeeds(tmp_path: Path, redis_url: str) -> None:
    """An export of a survey nobody answered yet is not an error: 0 rows, exit status 0."""
    result = import_csv(tmp_path, redis_url, excel(HEADER))
    assert result.returncode == 0, result.stderr
    assert stderr_lines(result)[-1] == "enqueued 0 event(s) in 0 job(s); 0 invalid"


def test_the_separator_option_names_tab_or_a_character(tmp_path: Path, redis_url: str) -> None:
    """--separator tab (or ; or ,) is used instead of the sniffed one and shown as such."""
    data = b"email\tName;Vorname\na@example.org\tM;A\n"
    result = import_csv(tmp_path, redis_url, data, "--separator", "tab")
    assert result.returncode == 0, result.stderr
    assert stderr_lines(result)[0].startswith("export.csv: utf-8, separator tab, 1 row(s); email ← email")
    semicolon = import_csv(tmp_path, redis_url, data, "--separator", ";")
    assert semicolon.returncode == 2
    assert b"no email column" in semicolon.stderr


def test_the_event_file_may_be_a_whole_registration_event(tmp_path: Path, redis_url: str) -> None:
    """--event also takes a registration.created event (e.g. examples/registration.json): its event."""
    (tmp_path / "event.json").write_bytes(orjson.dumps(make_event()))
    result = import_csv(tmp_path, redis_url, excel(HEADER, *ROWS_OK))
    assert result.returncode == 0, result.stderr


# --- progress -----------------------------------------------------------------------------


def run_with_stderr_on_a_terminal(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, bytes]:
    """Run `mailer ARGS` with stderr on a pseudo-terminal (stdout a pipe); its exit status and
    everything it wrote to the terminal."""
    main, secondary = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "mailer", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=secondary
    )
    os.close(secondary)
    seen = b""
    while True:
        ready, _, _ = select.select([main], [], [], 60)
        assert ready, "no output in 60 s"
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    return process.wait(timeout=60), seen


def test_a_progress_bar_only_on_a_terminal(tmp_path: Path, redis_url: str) -> None:
    """On a terminal stderr shows the rows being checked; in a pipe or a log there is no bar."""
    rows = [f"p{i}@example.org;Person {i};de" for i in range(3000)]
    piped = import_csv(tmp_path, redis_url, excel(HEADER, *rows))
    assert piped.returncode == 0, piped.stderr
    assert b"checking rows" not in piped.stderr
    assert b"\x1b[" not in piped.stderr
    status, seen = run_with_stderr_on_a_terminal(
        ["import-csv", "export.csv", "--event", "event.json"], tmp_path, enqueue_env(redis_url)
    )
    assert status == 0, seen
    assert b"checking rows" in seen
    assert re.search(rb"\d+/3000", seen), seen[-500:]


# --- property -----------------------------------------------------------------------------

CELL = st.one_of(
    st.sampled_from(
        ["a@example.org", "Jürgen Groß", "", "de", "en", '"', '""', "\r\n", "x" * 50, "\x00", "\x1b"]
    ),
    st.text(max_size=12),
)


TOKENS = [";", ",", "\t", '"', "\r\n", "\n", "\r", " ", "\ufeff", "\x00", "\x1b", "ü"]
TOKENS += ["E-Mail", "email", "Name", "Vorname", "Nachname", "Sprache", "a@example.org", "de", "x"]


@st.composite
def csvish(draw: st.DrawFn) -> bytes:
    """Bytes that are CSV most of the time: a header with known names, rows of odd cells, in
    UTF-8 (perhaps with a BOM), Windows-1252 or as raw bytes."""
    shape = draw(st.sampled_from(["bytes", "tokens", "rows"]))
    if shape == "bytes":
        return draw(st.binary(max_size=300))
    if shape == "tokens":  # the characters CSV is made of, in any order
        tokens = draw(st.lists(st.sampled_from(TOKENS), max_size=40))
        return "".join(tokens).encode(draw(st.sampled_from(["utf-8", "cp1252"])), errors="replace")
    separator = draw(st.sampled_from([";", ",", "\t"]))
    header = draw(
        st.lists(
            st.sampled_from(["E-Mail", "email", "Name", "Sprache", "Vorname", "Nachname", "x"]), max_size=4
        )
    )
    rows = draw(st.lists(st.lists(CELL, max_size=5), max_size=6))
    newline = draw(st.sampled_from(["\r\n", "\n", "\r"]))
    text = newline.join(separator.join(cells) for cells in [header, *rows])
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "cp1252"]))
    return text.encode(encoding, errors="replace")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=csvish(), mapping=st.one_of(st.none(), st.text(max_size=20)), dry_run=st.booleans())
def test_no_csvish_bytes_make_import_csv_fail(
    data: bytes,
    mapping: str | None,
    dry_run: bool,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Arbitrary bytes and --map values: exit status 0, 1 or 2, and never a traceback; anything
    but 0 says why on stderr."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "export.csv").write_bytes(data)
    write_event(tmp_path)
    args = ["import-csv", "export.csv", "--event", "event.json"]
    args += ["--map", mapping] if mapping is not None else []
    args += ["--dry-run"] if dry_run else []
    from mailer.cli import main

    result = CliRunner().invoke(main, args, env={**clean_env(), "MAILER_REDIS_URL": redis_server.url})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert result.exit_code in (0, 1, 2), result.output
    if result.exit_code:
        assert result.stderr.strip(), result.output


# --- README -------------------------------------------------------------------------------


def test_the_readmes_import_example_works_as_written(tmp_path: Path, redis_url: str) -> None:
    """README, Importing a CSV export: the command on the examples `make run` writes prints
    what the README shows."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(".venv/bin/mailer import-csv examples/registrations.csv")
    command, *shown = readme[start : readme.index("```", start)].strip().splitlines()
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    subprocess.run([sys.executable, "examples/generate.py"], cwd=tmp_path, check=True, timeout=60)
    argv = command.split("#")[0].split()
    assert argv[0] == ".venv/bin/mailer"
    result = mailer(*argv[1:], cwd=tmp_path, env=enqueue_env(redis_url))
    assert result.returncode == 1, result.stderr
    assert stderr_lines(result) == [line.removeprefix("# ") for line in shown]


# --- the reading rules the README lists ------------------------------------------------------


def read(data: bytes, mapping: tuple[str, ...] = (), **options: Any) -> list[tuple[str, Any]]:
    """The module's own path from bytes to (where, event or refusal), without Redis."""
    from mailer.intake.csv_import import RowEvents, load_event, parse_map, read_table, resolve_columns

    table = read_table(data, **options)
    columns = resolve_columns(table.header, parse_map(mapping))
    event = load_event(orjson.dumps(make_event()["event"]))
    rows = RowEvents(columns, event, "2026-01-01T00:00:00+00:00")
    return [rows.convert(row) for row in table.rows]


def attendees(results: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [r["registration"]["attendee"] for _where, r in results if isinstance(r, dict)]


@pytest.mark.parametrize(
    ("header", "target"),
    [
        ("E-Mail", "email"),
        ("e-mail-adresse", "email"),
        ("Mail", "email"),
        ("Email Address", "email"),
        ("EMAIL", "email"),
        ("Vollständiger Name", "name"),
        ("Full Name", "name"),
        ("Sprache", "locale"),
        ("Language", "locale"),
        ("Lang", "locale"),
        ("Referenz", "reference"),
        ("manage_url", "manage_url"),
        ("Manage URL", "manage_url"),
    ],
)
def test_headers_that_say_what_they_hold_need_no_map(header: str, target: str) -> None:
    """A header naming the field, or one of the README's German and English names, is taken."""
    from mailer.intake.csv_import import resolve_columns

    columns = resolve_columns([header] if target == "email" else ["E-Mail", header], {})
    assert columns.label(target) == header


def test_first_and_last_name_are_joined_and_id_is_never_guessed() -> None:
    """Without a name column, Vorname + Nachname (or First Name + Last Name) make the name; an
    `id` column is left alone unless mapped."""
    from mailer.intake.csv_import import resolve_columns

    german = resolve_columns(["ID", "E-Mail", "Vorname", "Nachname"], {})
    assert german.label("name") == "Vorname+Nachname"
    assert "id" not in german.positions
    english = resolve_columns(["email", "First Name", "Last_Name"], {})
    assert english.label("name") == "First Name+Last_Name"
    assert resolve_columns(["email", "Name", "Vorname", "Nachname"], {}).label("name") == "Name"


@pytest.mark.parametrize(
    ("cell", "locale"),
    [("de", "de"), ("DE", "de"), ("Deutsch", "de"), ("English", "en"), ("en", "en"), ("", "de")],
)
def test_locale_cells_in_words_or_codes(cell: str, locale: str) -> None:
    """`de`, `en`, `Deutsch`, `English` in any case; an empty cell is the default, de."""
    from mailer.events import parse_event

    [(_where, record)] = read(f"email;Sprache\r\na@example.org;{cell}\r\n".encode())
    assert parse_event(record).registration.attendee.locale == locale  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("data", "separator"),
    [
        ("email;Name\r\na@example.org;Müller, Maria\r\n".encode("utf-16"), ";"),
        ("email\tName\na@example.org\tMüller, Maria\n".encode(), "\t"),
        ('email,Name\na@example.org,"Müller, Maria"\n'.encode("utf-8-sig"), ","),
    ],
)
def test_encodings_and_separators_are_found(data: bytes, separator: str) -> None:
    """UTF-16 with a BOM and UTF-8 with one are read; tab, "," and ";" are sniffed, ";" on a tie."""
    from mailer.intake.csv_import import read_table

    table = read_table(data)
    assert table.separator == separator
    assert attendees(read(data)) == [{"email": "a@example.org", "name": "Müller, Maria"}]
    tie = b"email;Name,x\na@example.org;Maria,1\n"  # two columns either way
    assert read_table(tie).separator == ";"


def test_separator_and_encoding_options_override_the_guess() -> None:
    """--separator and --encoding are taken as given (here: an ISO 8859-15 file split on ",")."""
    data = "email;x,Name\na@example.org;1,Šárka\n".encode("iso8859_15")
    from mailer.intake.csv_import import read_table

    assert read_table(data).separator == ";"
    table = read_table(data, separator=",", encoding="iso8859-15")
    assert (table.separator, table.encoding, table.header) == (",", "iso8859-15", ["email;x", "Name"])
    assert table.rows[0].cells == ["a@example.org;1", "Šárka"]


def test_empty_rows_are_skipped_and_cells_trimmed() -> None:
    """Excel's empty rows (`;;`) are no rows; spaces around a cell are not part of it; empty cells
    past the header's are a separator too many, not a bad row."""
    results = read(
        b"E-Mail ; Name ;\r\n;;\r\n  a@example.org ;  Anna  ;\r\n\r\n;;\r\nb@example.org;Bo;;;\r\n"
    )
    assert attendees(results) == [
        {"email": "a@example.org", "name": "Anna"},
        {"email": "b@example.org", "name": "Bo"},
    ]
    assert [where for where, _ in results] == ["line 3", "line 6"]


def test_a_mapped_id_is_the_registration_id_and_given_once() -> None:
    """With --map id=..., rows sharing an address are two registrations; one id twice is refused."""
    from mailer.errors import InvalidEvent

    data = (
        b"Nr;E-Mail\r\nKL-1;a@example.org\r\nKL-2;a@example.org\r\nKL-1;b@example.org\r\n;c@example.org\r\n"
    )
    first, second, again, empty = read(data, ("id=Nr",))
    assert [first[1]["registration"]["id"], second[1]["registration"]["id"]] == ["KL-1", "KL-2"]
    assert isinstance(again[1], InvalidEvent)
    assert str(again[1]) == "Nr: the same registration id as line 2: imported once"
    assert str(empty[1]) == "Nr: is empty"


def test_derived_ids_depend_on_the_event_and_the_address_only() -> None:
    """The same address for the same event gets the same ids in any file; another event, others."""
    from mailer.intake.csv_import import derived_id

    [(_w, one)] = read(b"email;Name\r\nA@Example.org;Anna\r\n")
    [(_w, two)] = read(b"Name,x,email\nAnna B.,1,a@example.org\n")
    assert one["registration"]["id"] == two["registration"]["id"]
    assert one["id"] == two["id"] != one["registration"]["id"]
    assert one["registration"]["id"] == derived_id("csv", "weltoffen", "a@example.org")
    assert derived_id("csv", "other-event", "a@example.org") != one["registration"]["id"]
    assert re.fullmatch(r"csv-[0-9a-f]{24}", one["id"])
