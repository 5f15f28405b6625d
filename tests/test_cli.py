"""The `mailer` command as a user runs it: embedded defaults in a fresh directory, previews, checks."""

from __future__ import annotations

import mailbox
import os
import signal
import subprocess
import sys
import time
from email import policy
from email.parser import BytesParser
from pathlib import Path

import orjson

from mailer.embedded import is_running, socket_path
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


def test_embedded_defaults_in_a_fresh_directory(tmp_path: Path) -> None:
    """`mailer worker` with nothing configured: private Redis and Maildir under ./var; enqueue finds
    them without a URL; Ctrl-C stops the worker and the Redis it started."""
    (tmp_path / "registration.json").write_bytes(orjson.dumps(make_event()))
    worker = subprocess.Popen(
        [sys.executable, "-m", "mailer", "worker"],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        sock = socket_path(tmp_path / "var")
        deadline = time.monotonic() + 20
        while not is_running(sock):
            assert worker.poll() is None, worker.stderr.read() if worker.stderr else b""
            assert time.monotonic() < deadline
            time.sleep(0.05)
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
    assert not is_running(sock)


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
    result = mailer("worker", cwd=tmp_path, env={**clean_env(), "MAILER_SMTP_SECURITY": "maybe"})
    assert result.returncode == 2
    assert result.stderr.decode().strip().splitlines() == [
        "mailer: configuration error: MAILER_SMTP_SECURITY: Input should be 'none', 'starttls' or 'tls'"
    ]


def test_render_writes_eml_and_html_for_every_kind(tmp_path: Path) -> None:
    """`mailer render KIND --event FILE` works for each kind from one registration file."""
    (tmp_path / "reg.json").write_bytes(orjson.dumps(make_event()))
    for kind in ("confirmation", "reminder", "registration_cancelled", "event_changed", "event_cancelled"):
        result = mailer("render", kind, "--event", "reg.json", "--locale", "en", "--out", "out", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        eml = (tmp_path / "out" / f"{kind}.en.eml").read_bytes()
        assert BytesParser(policy=policy.default).parsebytes(eml)["X-Mailer-Kind"] == kind
        assert (tmp_path / "out" / f"{kind}.en.html").read_text().startswith("<!DOCTYPE html")


def test_templates_check_passes_on_defaults_and_fails_on_a_broken_override(tmp_path: Path) -> None:
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
    schema = orjson.loads(mailer("schema", cwd=tmp_path).stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "registration.created" in orjson.dumps(schema).decode()
