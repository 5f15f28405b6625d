"""`mailer log`, `show`, `stats` and `export`: the questions ops staff ask, one command each."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import select
import subprocess
import sys
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner

from mailer.cli import main
from mailer.clock import ms
from mailer.durations import parse_offsets
from mailer.lifecycle.planner import Planner
from mailer.state.deliverylog import DeliveryLog, LogEntry
from mailer.state.queue import connect_client
from tests.clocks import SettableClock
from tests.conftest import event_day
from tests.test_retention import created

START = datetime(2026, 11, 30, 8, tzinfo=UTC)
KINDS = ["confirmation", "reminder", "event_changed"]
STATUSES = ["planned", "sent", "retrying", "failed", "skipped"]


def random_entries(count: int, seed: int = 7) -> list[LogEntry]:
    """A log of `count` entries a minute apart, over 3 events, 5 registrations, 3 kinds."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        rid = f"reg-{rng.randrange(5)}"
        kind = rng.choice(KINDS)
        status = rng.choice(STATUSES)
        out.append(
            LogEntry(
                ts=(START + timedelta(minutes=i)).isoformat(timespec="milliseconds"),
                status=status,  # type: ignore[arg-type]
                message_id=f"{rid}/{kind}",
                kind=kind,
                registration_id=rid,
                event_id=f"evt-{rng.randrange(3)}",
                recipient=f"{rid}@Example.org",
                attempt=rng.randrange(1, 4),
                smtp_code=451 if status == "retrying" else None,
                detail="greylisted" if status == "retrying" else "",
                reference=f"Buchung {rid[-1]}/2026" if rid != "reg-4" else "",
            )
        )
    return out


def write_log(redis_url: str, log: list[LogEntry]) -> None:
    async def go() -> None:
        redis = await connect_client(redis_url)
        try:
            writer = DeliveryLog(redis, max_entries=1_000_000, echo=None)
            for start in range(0, len(log), 1000):
                await writer.write(log[start : start + 1000])
        finally:
            await redis.aclose()

    asyncio.run(go())


def run(redis_url: str, *args: str) -> Any:
    """`mailer ARGS` in this process, against this Redis; a wide terminal for the tables."""
    env = {"MAILER_REDIS_URL": redis_url, "COLUMNS": "250"}
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def log_of_300(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[LogEntry]:
    monkeypatch.chdir(tmp_path)
    log = random_entries(300)
    write_log(redis_url, log)
    return log


FILTERS: list[tuple[list[str], Any]] = [
    (["--event", "evt-1"], lambda e: e.event_id == "evt-1"),
    (["--status", "failed"], lambda e: e.status == "failed"),
    (["--kind", "reminder", "--status", "sent"], lambda e: e.kind == "reminder" and e.status == "sent"),
    (["--recipient", "REG-2@example.ORG"], lambda e: e.recipient.lower() == "reg-2@example.org"),
    (["--registration", "reg-3", "--kind", "confirmation"], lambda e: e.message_id == "reg-3/confirmation"),
    (["--message", "reg-4/event_changed"], lambda e: e.message_id == "reg-4/event_changed"),
    (["--reference", "Buchung 1/2026"], lambda e: e.reference == "Buchung 1/2026"),
    (
        ["--reference", "Buchung 2/2026", "--status", "sent"],
        lambda e: e.reference == "Buchung 2/2026" and e.status == "sent",
    ),
    (
        [
            "--event",
            "evt-0",
            "--status",
            "retrying",
            "--since",
            "2026-11-30T10:00Z",
            "--until",
            "2026-11-30T11:00Z",
        ],
        lambda e: (
            e.event_id == "evt-0"
            and e.status == "retrying"
            and "2026-11-30T10:00" <= e.ts < "2026-11-30T11:00"
        ),
    ),
]


@pytest.mark.parametrize(("args", "keep"), FILTERS, ids=[" ".join(a) for a, _ in FILTERS])
def test_every_filter_finds_what_a_brute_force_pass_finds(
    redis_url: str, log_of_300: list[LogEntry], args: list[str], keep: Any
) -> None:
    """For each filter and combination, `mailer log --json --all` gives exactly the entries a
    pass over the written log keeps, newest first."""
    result = run(redis_url, "log", "--json", "--all", *args)
    assert result.exit_code == 0, result.output
    expected = [orjson.loads(e.to_json()) for e in reversed(log_of_300) if keep(e)]
    assert expected
    assert json_lines(result.stdout) == expected


def test_the_default_limit_is_stated_when_it_cut_something(
    redis_url: str, log_of_300: list[LogEntry]
) -> None:
    """Without --limit, 50 entries (the newest) and a line on stderr saying more match; with a
    limit above the matches, no such line."""
    cut = run(redis_url, "log", "--json")
    assert len(json_lines(cut.stdout)) == 50
    assert json_lines(cut.stdout)[0]["ts"] == log_of_300[-1].ts
    assert "showing the newest 50 entries; more match" in cut.stderr
    whole = run(redis_url, "log", "--json", "--limit", "1000")
    assert len(json_lines(whole.stdout)) == 300
    assert "more match" not in whole.stderr


def test_the_table_shows_one_row_per_entry_with_its_reason(
    redis_url: str, log_of_300: list[LogEntry]
) -> None:
    """The default output is a table with a header once, one line per entry: time, status,
    kind, recipient, message, attempt and the SMTP reply."""
    result = run(redis_url, "log", "--status", "retrying", "--limit", "5")
    lines = result.stdout.splitlines()
    assert "time (UTC)" in lines[0]
    assert "detail" in lines[0]
    rows = [line for line in lines[2:] if line.strip()]
    assert len(rows) == 5
    newest = next(e for e in reversed(log_of_300) if e.status == "retrying")
    assert newest.ts.replace("T", " ").removesuffix("+00:00") in rows[0]
    assert "451 greylisted" in rows[0]
    assert newest.recipient in rows[0]


def test_all_pages_through_everything_in_tables_of_a_page(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--all prints every entry, a table per page of 500 rows, the header only once."""
    monkeypatch.chdir(tmp_path)
    write_log(redis_url, random_entries(1200))
    result = run(redis_url, "log", "--all")
    assert result.stdout.count("time (UTC)") == 1
    assert sum(1 for line in result.stdout.splitlines() if "2026-" in line) == 1200
    assert "more match" not in result.stderr


def test_show_tells_a_registrations_story_message_by_message(
    redis_url: str, log_of_300: list[LogEntry]
) -> None:
    """`mailer show REG` groups its entries by message, oldest first, with each message's last
    status, its attempts and its calendar file's UID; `show MESSAGE` one message only."""
    result = run(redis_url, "show", "reg-2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "registration reg-2" in out
    mine = [e for e in log_of_300 if e.registration_id == "reg-2"]
    for kind in KINDS:
        last = [e for e in mine if e.kind == kind][-1]
        assert f"{kind:<22} {last.status}" in out
    assert out.count("calendar UID") == 2  # confirmation and change notice carry one, reminders not
    one = run(redis_url, "show", "reg-2/reminder", "--json")
    assert [e["message_id"] for e in json_lines(one.stdout)] == ["reg-2/reminder"] * len(
        [e for e in mine if e.kind == "reminder"]
    )
    assert json_lines(one.stdout)[0]["ts"] < json_lines(one.stdout)[-1]["ts"]
    missing = run(redis_url, "show", "reg-404")
    assert missing.exit_code == 1
    assert "no log entries for reg-404" in missing.stderr


def test_show_reads_confirm_change_cancel_as_one_story_with_each_files_sequence(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each message's line carries the calendar UID (one per registration) and the SEQUENCE its
    file was sent with, as the send path logged it."""
    monkeypatch.chdir(tmp_path)
    story = [
        ("reg-9/confirmation", "sent", 0),
        ("reg-9/event_changed/v1", "retrying", None),
        ("reg-9/event_changed/v1", "sent", 1),
        ("reg-9/registration_cancelled", "sent", 2),
    ]
    write_log(
        redis_url,
        [
            LogEntry(
                ts=(START + timedelta(hours=i)).isoformat(),
                status=status,  # type: ignore[arg-type]
                message_id=message,
                registration_id="reg-9",
                event_id="evt-9",
                recipient="maria@example.org",
                attempt=1,
                sequence=sequence,
            )
            for i, (message, status, sequence) in enumerate(story)
        ],
    )
    out = run(redis_url, "show", "reg-9").stdout
    lines = [line for line in out.splitlines() if "calendar UID" in line]
    assert [line.split()[1] for line in lines] == ["confirmation", "event_changed", "registration_cancelled"]
    assert [line.rsplit("SEQUENCE ", 1)[1].strip() for line in lines] == ["0", "1", "2"]
    assert len({line.split("calendar UID ")[1].split()[0] for line in lines}) == 1


def test_show_tells_what_is_planned_and_not_yet_logged(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reminder planned for next week has no log entry yet: `mailer show` lists it from the
    registration's record with its state and when the scheduler looks at it next; a sent
    message shows no `now`."""
    monkeypatch.chdir(tmp_path)
    write_log(
        redis_url,
        [
            LogEntry(
                ts=START.isoformat(),
                status="sent",
                message_id="reg-7/confirmation",
                event_id="evt-7",
                recipient="maria@example.org",
                attempt=1,
            )
        ],
    )
    due = START + timedelta(days=7)
    client = redis.Redis.from_url(redis_url)
    client.hset(
        "mailer:reg:reg-7",
        mapping={
            "e": "evt-7",
            "m:confirmation": f"sent|1|{ms(START)}|{ms(START)}|0",
            "m:reminder/P1D": f"planned|0|{ms(START)}|{ms(START)}|0",
        },
    )
    client.zadd("mailer:due", {"reg-7/reminder/P1D": ms(due)})
    client.close()
    out = run(redis_url, "show", "reg-7").stdout
    (reminder,) = [line for line in out.splitlines() if "reg-7/reminder/P1D" in line]
    assert f"now: planned, next look {due:%Y-%m-%d %H:%M} UTC" in reminder
    (confirmation,) = [
        line for line in out.splitlines() if "reg-7/confirmation" in line and "attempts" in line
    ]
    assert "now:" not in confirmation


def test_stats_count_per_status_and_kind_for_one_event(redis_url: str, log_of_300: list[LogEntry]) -> None:
    """`mailer stats --event E --json` counts its entries per status and kind as a pass over the
    log does, and counts the messages whose last state is failed as dead letters."""
    result = run(redis_url, "stats", "--event", "evt-2", "--json")
    body = orjson.loads(result.stdout)
    mine = [e for e in log_of_300 if e.event_id == "evt-2"]
    for status in STATUSES:
        for kind in KINDS:
            n = sum(1 for e in mine if e.status == status and e.kind == kind)
            assert body["counts"].get(status, {}).get(kind, 0) == n
    last: dict[str, str] = {}
    for entry in mine:
        last[entry.message_id] = entry.status
    assert body["dead_letters"] == sum(1 for s in last.values() if s == "failed")
    table = run(redis_url, "stats", "--event", "evt-2")
    assert "dead letters" in table.stdout
    assert "reminder" in table.stdout


def test_stats_latency_runs_from_planned_to_sent(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latency percentiles come from the sent entries' latency (first planned → the relay's
    reply, measured by the sender), kept in quarter-octave buckets by the append, so a
    percentile is the top of its bucket; a sent entry without one counts in no percentile.
    Over a time range the entries are read and the oldest message waiting is named."""
    monkeypatch.chdir(tmp_path)
    at = START.isoformat(timespec="milliseconds")

    def entry(status: str, message: str, seconds: int) -> LogEntry:
        ts = (START + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")
        latency = (
            {"reg-1/reminder": 10_000, "reg-2/reminder": 40_000}.get(message) if status == "sent" else None
        )
        return LogEntry(ts=ts, status=status, message_id=message, event_id="evt-1", latency_ms=latency)  # type: ignore[arg-type]

    write_log(
        redis_url,
        [
            entry("planned", "reg-1/reminder", 0),
            entry("planned", "reg-2/reminder", 0),
            entry("planned", "reg-3/reminder", 5),
            entry("sent", "reg-1/reminder", 10),
            entry("retrying", "reg-2/reminder", 20),
            entry("sent", "reg-2/reminder", 40),
            entry("sent", "reg-4/confirmation", 50),
        ],
    )
    body = orjson.loads(run(redis_url, "stats", "--event", "evt-1", "--json").stdout)
    assert body["sent"] == 2
    # 10 000 ms lies in the bucket up to 2^(54/4) - 1 = 11 584 ms, 40 000 in the one up to 46 340.
    assert body["latency_ms"] == {"p50": 11_584, "p90": 46_340, "p99": 46_340, "max": 46_340}
    since = (START - timedelta(hours=1)).isoformat()
    body = orjson.loads(run(redis_url, "stats", "--event", "evt-1", "--since", since, "--json").stdout)
    assert body["sent"] == 2
    assert body["latency_ms"] == {"p50": 10_000, "p90": 40_000, "p99": 40_000, "max": 40_000}
    assert body["oldest_waiting"]["message_id"] == "reg-3/reminder"
    assert body["oldest_waiting"]["since"].startswith(at[:16])


def test_export_writes_csv_and_jsonl_with_the_filters(redis_url: str, log_of_300: list[LogEntry]) -> None:
    """`mailer export --format csv|jsonl` writes the matching entries, one per row, and only the
    summary goes to stderr: stdout carries nothing but the data."""
    as_csv = run(redis_url, "export", "--format", "csv", "--status", "failed")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    failed = [e for e in reversed(log_of_300) if e.status == "failed"]
    assert [r["message_id"] for r in rows] == [e.message_id for e in failed]
    assert {r["record"] for r in rows} == {"log"}
    assert f"{len(failed)} log entries" in as_csv.stderr
    as_jsonl = run(redis_url, "export", "--format", "jsonl", "--event", "evt-0")
    lines = json_lines(as_jsonl.stdout)
    assert [line["ts"] for line in lines] == [e.ts for e in reversed(log_of_300) if e.event_id == "evt-0"]


async def test_export_for_an_access_request_has_the_registrations_first(
    redis_url: str, tmp_path: Path
) -> None:
    """`mailer export --recipient A` (any letter case) lists the registrations holding the
    address (name, locale, event) before its log entries; no one else's."""
    redis = await connect_client(redis_url)
    try:
        planner = Planner(redis, default_offsets=parse_offsets("P1D"), clock=SettableClock())
        await planner.apply(
            [
                created("evt-a", "reg-1", "Maria.Mueller@Example.org", "Maria Müller", event_day(10)),
                created("evt-a", "reg-2", "jo@example.org", "Jo Beispiel", event_day(10)),
            ]
        )
        log = DeliveryLog(redis, max_entries=10_000, echo=None)
        await log.write(
            [
                LogEntry(ts=log.now(), status="sent", registration_id=r, recipient=a)
                for r, a in [("reg-1", "maria.mueller@example.org"), ("reg-2", "jo@example.org")]
            ]
        )
    finally:
        await redis.aclose()
    out = tmp_path / "access.jsonl"
    done = await asyncio.to_thread(
        run,
        redis_url,
        "export",
        "--format",
        "jsonl",
        "--recipient",
        "maria.mueller@EXAMPLE.org",
        "-o",
        str(out),
    )
    assert done.exit_code == 0, done.output
    lines = json_lines(out.read_text())
    assert [(line["record"], line["registration_id"]) for line in lines] == [
        ("registration", "reg-1"),
        ("log", "reg-1"),
    ]
    assert lines[0]["name"] == "Maria Müller"
    assert lines[0]["event_id"] == "evt-a"


def test_export_memory_does_not_grow_with_the_log(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exporting 20 000 entries to a file takes about the memory of exporting 2 000: streamed."""
    monkeypatch.chdir(tmp_path)
    peaks = []
    for count in (2_000, 20_000):
        asyncio.run(_flush(redis_url))
        write_log(redis_url, random_entries(count))
        tracemalloc.start()
        done = run(redis_url, "export", "--format", "csv", "-o", str(tmp_path / f"{count}.csv"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert done.exit_code == 0, done.output
        assert len((tmp_path / f"{count}.csv").read_text().splitlines()) == count + 1
    assert peaks[1] < 1.5 * peaks[0], peaks


async def _flush(redis_url: str) -> None:
    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


def line_within(stream: Any, seconds: float) -> bytes:
    """The next line the process prints, failing the test if none comes in time."""
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"no line within {seconds} s"
    return bytes(stream.readline())


def test_follow_prints_new_entries_as_they_are_written(redis_url: str, tmp_path: Path) -> None:
    """`mailer log --follow --json --status failed` prints the matching entries oldest first, then
    each new matching one as it is written, and nothing else."""
    write_log(redis_url, random_entries(20))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")} | {
        "MAILER_REDIS_URL": redis_url
    }
    follower = subprocess.Popen(
        [sys.executable, "-m", "mailer", "log", "--follow", "--json", "--status", "failed"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,  # unbuffered: select() then sees every line still to read
    )
    try:
        assert follower.stdout is not None
        first = [e for e in random_entries(20) if e.status == "failed"]
        for entry in first:
            assert orjson.loads(line_within(follower.stdout, 10))["ts"] == entry.ts
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        write_log(redis_url, [LogEntry(ts=now, status="sent", message_id="reg-9/confirmation")])
        write_log(
            redis_url,
            [LogEntry(ts=now, status="failed", message_id="reg-9/reminder", detail="550 no such user")],
        )
        assert orjson.loads(line_within(follower.stdout, 10))["message_id"] == "reg-9/reminder"
    finally:
        follower.terminate()
        follower.communicate(timeout=10)


def test_since_a_duration_counts_back_from_now(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--since PT1H` is the last hour; `--until P1D` everything older than a day."""
    monkeypatch.chdir(tmp_path)
    now = datetime.now(UTC)
    ages = [timedelta(days=2), timedelta(hours=2), timedelta(minutes=30), timedelta(0)]
    write_log(
        redis_url,
        [
            LogEntry(ts=(now - age).isoformat(timespec="milliseconds"), status="failed", detail=str(age))
            for age in ages
        ],
    )
    hour = json_lines(run(redis_url, "log", "--json", "--since", "PT1H").stdout)
    assert [e["detail"] for e in hour] == ["0:00:00", "0:30:00"]
    old = json_lines(run(redis_url, "log", "--json", "--until", "P1D").stdout)
    assert [e["detail"] for e in old] == ["2 days, 0:00:00"]


@pytest.mark.parametrize("value", ["yesterday", "2026-12-02T10:00", "P1M"])
def test_a_time_it_cannot_read_is_one_line_and_exit_2(
    redis_url: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--since takes a duration back from now or a date or time with its UTC offset; anything
    else is a usage error of one line."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["log", "--since", value], env={"MAILER_REDIS_URL": redis_url})
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "--since" in result.stderr
