"""The `mailer` command as a user runs it: embedded defaults in a fresh directory, previews, checks."""

from __future__ import annotations

import contextlib
import mailbox
import os
import signal
import subprocess
import sys
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import orjson
import pytest

from mailer.ops.embedded import is_running, socket_path
from tests.conftest import make_event


def mailer(
    *args: str, cwd: Path, env: dict[str, str] | None = None, **kw: object
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "mailer", *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        timeout=60,
        **kw,
    )  # type: ignore[call-overload]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}


def start_embedded_worker(directory: Path, **popen: Any) -> subprocess.Popen[bytes]:
    """`mailer worker` with nothing configured, in `directory`, with a sample event beside it;
    returns once its private Redis answers."""
    (directory / "registration.json").write_bytes(orjson.dumps(make_event()))
    popen.setdefault("stdout", subprocess.PIPE)
    command = [sys.executable, "-m", "mailer", "worker"]
    worker = subprocess.Popen(command, cwd=directory, env=clean_env(), stderr=subprocess.PIPE, **popen)
    deadline = time.monotonic() + 20
    while not is_running(socket_path(directory / "var")):
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else b""
        assert time.monotonic() < deadline, "the embedded Redis did not start"
        time.sleep(0.05)
    return worker


def test_embedded_defaults_in_a_fresh_directory(tmp_path: Path) -> None:
    """`mailer worker` with nothing configured: private Redis and Maildir under ./var; enqueue finds
    them without a URL; Ctrl-C stops the worker and the Redis it started."""
    worker = start_embedded_worker(tmp_path)
    try:
        deadline = time.monotonic() + 20
        result = mailer("enqueue", "registration.json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert b"enqueued 1 event(s)" in result.stderr
        outbox = mailbox.Maildir(tmp_path / "var" / "outbox", create=False)
        while len(outbox) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        (key,) = outbox.keys()
        message = BytesParser(policy=policy.default).parsebytes(outbox.get_bytes(key))
        assert message["To"].addresses[0].addr_spec == "maria.mueller@example.org"
        assert "Digitaler Dialog zu Weltoffenheit" in message["Subject"]
        log = mailer("log", "--json", cwd=tmp_path)
        entries = [orjson.loads(line) for line in log.stdout.splitlines()]
        assert [e["status"] for e in entries] == ["sent"]
        assert {
            "ts",
            "message_id",
            "kind",
            "registration_id",
            "event_id",
            "recipient",
            "attempt",
            "worker",
        } <= set(entries[0])
    finally:
        worker.send_signal(signal.SIGINT)
        _out, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert b"Maildir outbox" in err
    assert not is_running(socket_path(tmp_path / "var"))


def test_enqueue_reports_each_bad_line_and_enqueues_the_rest(tmp_path: Path, redis_url: str) -> None:
    """NDJSON with one broken record: line, field and reason on stderr; the rest enqueued; exit 1."""
    lines = [
        orjson.dumps(make_event(event_id="a", registration_id="ra")),
        orjson.dumps(make_event(event_id="b", registration_id="rb", email="kaputt")),
        b"{not json",
        orjson.dumps(make_event(event_id="c", registration_id="rc")),
    ]
    (tmp_path / "in.ndjson").write_bytes(b"\n".join(lines))
    result = mailer("enqueue", "in.ndjson", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": redis_url})
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "line 2: registration.attendee.email:" in err
    assert "line 3: (line): not valid JSON" in err
    assert "enqueued 2 event(s)" in err


def test_bad_setting_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """An invalid setting stops the worker with exit status 2 and one line naming the variable and why."""
    result = mailer("worker", cwd=tmp_path, env={**clean_env(), "MAILER_SMTP_SECURITY": "maybe"})
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        "mailer: configuration error: MAILER_SMTP_SECURITY: Input should be 'none', 'starttls' or 'tls'"
    ]


def test_render_writes_eml_and_html_for_every_kind(tmp_path: Path) -> None:
    """`mailer render KIND --event FILE` works for each kind from one registration file (a change
    notice also takes the event as it was, `--previous FILE`, and is refused without it)."""
    from mailer.ops.preview import sample_previous

    registration = make_event()
    (tmp_path / "reg.json").write_bytes(orjson.dumps(registration))
    (tmp_path / "before.json").write_bytes(orjson.dumps(sample_previous(registration)))
    refused = mailer("render", "event_changed", "--event", "reg.json", cwd=tmp_path)
    assert refused.returncode == 2
    assert b"--previous" in refused.stderr
    for kind in ("confirmation", "reminder", "registration_cancelled", "event_changed", "event_cancelled"):
        before = ["--previous", "before.json"] if kind == "event_changed" else []
        args = ("render", kind, "--event", "reg.json", "--locale", "en", "--out", "out", *before)
        result = mailer(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        eml = (tmp_path / "out" / f"{kind}.en.eml").read_bytes()
        assert BytesParser(policy=policy.default).parsebytes(eml)["X-Mailer-Kind"] == kind
        assert (tmp_path / "out" / f"{kind}.en.html").read_text().startswith("<!DOCTYPE html")


def test_templates_check_passes_on_defaults_and_fails_on_a_broken_override(tmp_path: Path) -> None:
    """`templates check` passes every default kind and locale; an override that uses an unknown field
    fails with exit status 1, naming the template and the field."""
    ok = mailer("templates", "check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(b"ok ") == 10
    broken = tmp_path / "tpl" / "reminder"
    broken.mkdir(parents=True)
    (broken / "subject.de.txt").write_text("Erinnerung an {{ event.no_such_field }}")
    bad = mailer(
        "templates", "check", cwd=tmp_path, env={**clean_env(), "MAILER_TEMPLATE_DIR": str(tmp_path / "tpl")}
    )
    assert bad.returncode == 1
    assert b"FAIL reminder/de" in bad.stderr
    assert b"no_such_field" in bad.stderr


def test_schema_is_json_schema_of_the_contract(tmp_path: Path) -> None:
    """`mailer schema` prints the event contract as a JSON Schema document."""
    schema = orjson.loads(mailer("schema", cwd=tmp_path).stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "registration.created" in orjson.dumps(schema).decode()


def enqueue_env(redis_url: str) -> dict[str, str]:
    return {**clean_env(), "MAILER_REDIS_URL": redis_url}


def rejected_entries(tmp_path: Path, redis_url: str) -> list[dict[str, object]]:
    shown = mailer(
        "log", "--json", "--status", "rejected", "--limit", "1000", cwd=tmp_path, env=enqueue_env(redis_url)
    )
    assert shown.returncode == 0, shown.stderr
    return [orjson.loads(line) for line in shown.stdout.splitlines()]


def test_every_refusal_of_enqueue_is_in_the_delivery_log(tmp_path: Path, redis_url: str) -> None:
    """README: refused records are `rejected` log entries with the record's event id, the field, the
    reason and the line; a dry run changes nothing, not even the log."""
    lines: list[bytes] = [orjson.dumps(make_event(event_id="good-1", registration_id="r-good-1"))]
    expected: dict[int, tuple[str, str]] = {}  # line -> (event id, field)
    for n in range(35):
        if n % 3 == 0:
            lines.append(
                orjson.dumps(make_event(event_id=f"bad-{n}", registration_id=f"r{n}", email="kaputt"))
            )
            expected[len(lines)] = (f"bad-{n}", "registration.attendee.email")
        elif n % 3 == 1:
            lines.append(b"{not json " + str(n).encode())
            expected[len(lines)] = ("", "(line)")
        else:
            lines.append(b'"just text"' if n % 2 else b"42")
            expected[len(lines)] = ("", "(record)")
    lines.append(orjson.dumps(make_event(event_id="good-2", registration_id="r-good-2")))
    (tmp_path / "import.ndjson").write_bytes(b"\n".join(lines) + b"\n")

    dry = mailer("enqueue", "--dry-run", "import.ndjson", cwd=tmp_path, env=enqueue_env(redis_url))
    assert dry.returncode == 1, dry.stderr
    assert rejected_entries(tmp_path, redis_url) == []

    result = mailer("enqueue", "import.ndjson", cwd=tmp_path, env=enqueue_env(redis_url))
    assert result.returncode == 1
    assert b"enqueued 2 event(s)" in result.stderr
    assert b"35 invalid" in result.stderr
    entries = rejected_entries(tmp_path, redis_url)
    assert len(entries) == 35
    seen: dict[int, tuple[str, str]] = {}
    for entry in entries:
        detail = str(entry["detail"])
        assert detail.startswith("line "), detail
        number = int(detail.removeprefix("line ").split(":", 1)[0])
        _event_id, field = expected[number]
        assert f": {field}: " in detail, detail
        seen[number] = (str(entry.get("source_event", "")), field)
    assert seen == expected


def test_the_python_client_logs_refusals_like_the_cli(redis_url: str, tmp_path: Path) -> None:
    """publish() and publish_many() write the same kind of `rejected` entry: where, field, reason, id."""
    from mailer.errors import InvalidEvent
    from mailer.intake.client import SyncMailerClient

    bad = make_event(event_id="bad-1", email="kaputt")
    with SyncMailerClient(redis_url) as client:
        with pytest.raises(InvalidEvent):
            client.publish(bad)
        with pytest.raises(InvalidEvent):
            client.publish("{not json")
        report = client.publish_many([make_event(event_id="ok"), b"[1]", 7, bad])  # type: ignore[list-item]
    assert report.accepted == 1
    assert [index for index, _ in report.invalid] == [1, 2, 3]
    details = sorted(str(e["detail"]) for e in rejected_entries(tmp_path, redis_url))
    assert details[0].startswith("publish: (record): not valid JSON")
    assert details[1].startswith("publish: registration.attendee.email: ")
    assert details[2].startswith("record 2: (record): must be a JSON object")
    assert details[3].startswith("record 3: (record): must be a JSON object")
    assert details[4].startswith("record 4: registration.attendee.email: ")
    by_id = [e for e in rejected_entries(tmp_path, redis_url) if e.get("source_event") == "bad-1"]
    assert len(by_id) == 2


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("layout", ["object", "array", "ndjson", "ndjson-crlf"])
def test_a_file_saved_with_a_utf8_bom_is_read(tmp_path: Path, redis_url: str, layout: str) -> None:
    """Windows editors and Excel exports start files with a BOM; it is not part of the data."""
    events = [make_event(event_id=f"e{i}", registration_id=f"r{i}") for i in range(3)]
    if layout == "object":
        events = events[:1]
        data = orjson.dumps(events[0], option=orjson.OPT_INDENT_2)
    elif layout == "array":
        data = orjson.dumps(events, option=orjson.OPT_INDENT_2)
    else:
        newline = b"\r\n" if layout == "ndjson-crlf" else b"\n"
        data = newline.join(orjson.dumps(e) for e in events) + newline
    (tmp_path / "export.json").write_bytes(BOM + data)
    result = mailer("enqueue", "export.json", cwd=tmp_path, env=enqueue_env(redis_url))
    assert result.returncode == 0, result.stderr
    assert f"enqueued {len(events)} event(s)".encode() in result.stderr
    assert b"0 invalid" in result.stderr


def test_ndjson_whose_first_line_is_an_array_is_read_line_by_line(tmp_path: Path, redis_url: str) -> None:
    """A first line `[...]` does not make the whole file one JSON array: each line is read on its
    own (an array on a line gives its records), and one broken line refuses only that line."""
    events = [make_event(event_id=f"e{i}", registration_id=f"r{i}") for i in range(5)]
    lines = [
        orjson.dumps(events[:2]),
        orjson.dumps(events[2]),
        b"[" + orjson.dumps(events[3]),  # a broken array
        orjson.dumps(events[4]),
    ]
    (tmp_path / "mixed.ndjson").write_bytes(b"\n".join(lines))
    result = mailer("enqueue", "mixed.ndjson", cwd=tmp_path, env=enqueue_env(redis_url))
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert "enqueued 4 event(s)" in err
    assert "line 3: (line): not valid JSON" in err
    assert "1 invalid" in err


def test_a_broken_json_file_is_one_refusal(tmp_path: Path, redis_url: str) -> None:
    """A pretty-printed file with one syntax error is refused once, with the parser's position,
    not once per line."""
    data = orjson.dumps([make_event()], option=orjson.OPT_INDENT_2).replace(b'"type"', b"type", 1)
    (tmp_path / "broken.json").write_bytes(data)
    result = mailer("enqueue", "broken.json", cwd=tmp_path, env=enqueue_env(redis_url))
    err = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1
    assert err[0].startswith("file: (file): not valid JSON"), err
    assert err[-1].endswith("1 invalid")


def redis_pid(sock: Path) -> int:
    import redis

    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def test_the_worker_restarts_its_embedded_redis_when_it_dies(tmp_path: Path) -> None:
    """The redis-server that `mailer worker` started is SIGKILLed: the worker starts it again (with
    backoff), reconnects, and an event enqueued afterwards is sent; Ctrl-C still stops both."""
    (tmp_path / "registration.json").write_bytes(orjson.dumps(make_event()))
    log = tmp_path / "worker.log"
    with log.open("wb") as err:
        worker = subprocess.Popen(
            [sys.executable, "-m", "mailer", "worker"], cwd=tmp_path, env=clean_env(), stderr=err
        )
    sock = socket_path(tmp_path / "var")
    deadline = time.monotonic() + 40
    try:
        # The banner is printed once the embedded Redis answered and is supervised; killing it
        # before then (the socket answers a moment earlier) would fail the start, not test a restart.
        while "mailer worker: Redis" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = redis_pid(sock)
        os.kill(first, signal.SIGKILL)
        while not is_running(sock) or redis_pid(sock) == first:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        second = redis_pid(sock)
        result = mailer("enqueue", "registration.json", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        outbox = mailbox.Maildir(tmp_path / "var" / "outbox", create=False)
        while len(outbox) == 0:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=30)
    text = log.read_text()
    assert worker.returncode == 0, text
    assert "starting it again" in text
    assert "Traceback" not in text
    assert not is_running(sock)
    with contextlib.suppress(ProcessLookupError):
        os.kill(second, 0)
        raise AssertionError(f"redis-server {second} outlived the worker")


def test_a_job_that_lost_redis_as_it_started_is_one_line_not_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """arq starts each job as a task whose first pipeline nobody awaits; when Redis goes away
    in that moment asyncio would print "Task exception was never retrieved" and a traceback
    (seen once in the restart test above). The worker's loop says it in one line."""
    import asyncio
    import gc

    from redis.exceptions import ConnectionError as RedisConnectionError

    from mailer.worker import _redis_down_in_one_line

    async def lost() -> None:
        raise RedisConnectionError("Connection closed by server.")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(_redis_down_in_one_line)
        task = asyncio.ensure_future(lost())
        await asyncio.sleep(0.01)
        del task
        gc.collect()

    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == [
        "a job could not start, Redis went away (ConnectionError('Connection closed by server.')); "
        "re-driven from mailer's state"
    ]
    assert not any(r.exc_info for r in caplog.records)
