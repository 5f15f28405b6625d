"""Every `mailer` command fails with one line and a status, never a traceback.

Exit status 2: a usage error (bad argument, bad setting); 3: Redis unreachable; 1: anything else
an operator can fix (a Redis that refuses a command, a file that cannot be written).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis

from tests.conftest import free_port, make_event
from tests.test_cli import clean_env, mailer


def one_line(result: subprocess.CompletedProcess[bytes]) -> str:
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def dead_redis() -> dict[str, str]:
    """An environment whose MAILER_REDIS_URL points at a port nothing listens on (with a password,
    which no output may show)."""
    return {**clean_env(), "MAILER_REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0"}


@pytest.fixture
def event_file(tmp_path: Path) -> Path:
    path = tmp_path / "registration.json"
    path.write_bytes(orjson.dumps(make_event()))
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", "registration.json"],
        ["enqueue", "--dry-run", "registration.json"],
        ["log"],
        ["log", "--json", "--status", "failed"],
        ["retry", "--status", "failed"],
        ["retry", "reg-1/confirmation"],
    ],
    ids=lambda args: " ".join(args),
)
def test_every_command_says_one_line_and_exits_3_when_redis_is_down(
    tmp_path: Path, event_file: Path, dead_redis: dict[str, str], args: list[str]
) -> None:
    """Redis unreachable: `mailer: cannot reach Redis ...`, exit 3, for each command that needs it."""
    result = mailer(*args, cwd=tmp_path, env=dead_redis)
    line = one_line(result)
    assert result.returncode == 3, line
    assert "Redis" in line


@pytest.mark.parametrize("args", [["log"], ["retry", "--status", "failed"], ["enqueue", "registration.json"]])
def test_embedded_defaults_without_a_running_worker_exit_3(
    tmp_path: Path, event_file: Path, args: list[str]
) -> None:
    """No MAILER_REDIS_URL and no embedded server started: one line telling what to start, exit 3."""
    result = mailer(*args, cwd=tmp_path)
    assert result.returncode == 3
    assert "mailer worker" in one_line(result)


def test_a_redis_password_is_not_printed(tmp_path: Path, event_file: Path) -> None:
    """The URL in an error message has its password masked."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = mailer("log", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": url})
    assert result.returncode == 3
    assert "hunter2" not in one_line(result)


def test_the_worker_outlives_a_redis_that_is_down(tmp_path: Path, dead_redis: dict[str, str]) -> None:
    """`mailer worker` keeps retrying an unreachable Redis (logging it, no traceback) and still
    stops cleanly on SIGTERM."""
    log = tmp_path / "worker.log"
    with log.open("wb") as err:
        worker = subprocess.Popen(
            [sys.executable, "-m", "mailer", "worker"], cwd=tmp_path, env=dead_redis, stderr=err
        )
    try:
        deadline = time.monotonic() + 20
        while log.read_text().count("unreachable") < 2:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        status = worker.wait(timeout=30)
    assert status == 0
    assert "Traceback" not in log.read_text()
    assert "hunter2" not in log.read_text()


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", "/nonexistent/events.json"],
        ["enqueue", "."],
        ["enqueue"],
        ["retry", "not-an-id"],
        ["retry", "reg-1/no-such-kind"],
        ["retry", "--status", "failed", "--since", "garbage"],
        ["retry", "--status", "failed", "--since", "P1M"],
        ["retry", "--status", "sent"],
        ["retry"],
        ["log", "--limit", "abc"],
        ["log", "--limit", "0"],
        ["render", "confirmation", "--event", "missing.json"],
        ["render", "no-such-kind", "--event", "registration.json"],
        ["no-such-command"],
        ["--no-such-option", "log"],
        *(
            ["worker", "--serve", bad]
            for bad in (
                "8080",
                "localhost",
                "127.0.0.1:",
                "127.0.0.1:0",
                ":65536",
                "[::1:80",
                "a b:80",
                "h:8o",
            )
        ),
    ],
    ids=lambda args: " ".join(args) or "(none)",
)
def test_bad_arguments_are_one_line_usage_errors_with_exit_2(
    tmp_path: Path, event_file: Path, dead_redis: dict[str, str], args: list[str]
) -> None:
    """A bad argument is a click usage error: exit 2, one line naming it, before Redis is tried."""
    result = mailer(*args, cwd=tmp_path, env=dead_redis)
    line = one_line(result)
    assert result.returncode == 2, line
    assert "Redis" not in line
    assert "--help" in line


def test_render_refuses_an_event_file_that_is_not_an_event(tmp_path: Path) -> None:
    """`mailer render` with a file that is not JSON: one line with the reason, exit 1."""
    (tmp_path / "bad.json").write_text("{not json")
    result = mailer("render", "confirmation", "--event", "bad.json", cwd=tmp_path)
    assert result.returncode == 1
    assert "not valid JSON" in one_line(result)


def test_render_into_an_unwritable_place_is_one_line(tmp_path: Path, event_file: Path) -> None:
    """`mailer render --out` where nothing can be written: one line with the OS's reason, exit 1."""
    (tmp_path / "blocker").write_text("a file where a directory is needed")
    result = mailer(
        "render", "confirmation", "--event", "registration.json", "--out", "blocker/sub", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "blocker" in one_line(result)


def test_foreign_entries_in_the_log_stream_do_not_crash_readers(tmp_path: Path, redis_url: str) -> None:
    """Entries mailer did not write (other fields, non-JSON, wrong types) are shown as foreign; the
    real entries around them are still shown and `mailer retry --status` still works."""
    env = {**clean_env(), "MAILER_REDIS_URL": redis_url}
    client = redis.Redis.from_url(redis_url)
    real = {"ts": "2026-11-20T10:00:00.000+00:00", "status": "failed", "message_id": "reg-1/confirmation"}
    client.xadd("mailer:log", {"j": orjson.dumps(real)})  # as an older mailer wrote it
    client.hset("mailer:reg:reg-1", "m:confirmation", "failed|1|0|0|0")
    client.xadd("mailer:log", {"x": "y"})
    client.xadd("mailer:log", {"j": "not json"})
    client.xadd("mailer:log", {"j": "[1, 2]"})
    client.xadd("mailer:log", {"j": b"\xff\xfe"})
    client.xadd("mailer:log", {"j": orjson.dumps({"ts": 5, "status": ["sent"], "attempt": "x"})})
    client.xadd("mailer:log", {"j": orjson.dumps({"ts": "yesterday", "status": "sent"})})
    client.close()

    shown = mailer("log", cwd=tmp_path, env=env)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.decode().splitlines()[2:]  # a table: its header and rule first
    assert len(lines) == 7
    assert sum("foreign" in line for line in lines) == 6
    assert "reg-1/confirmation" in lines[-1]

    as_json = mailer("log", "--json", cwd=tmp_path, env=env)
    assert as_json.returncode == 0, as_json.stderr
    entries = [orjson.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["status"] for e in entries] == ["foreign"] * 6 + ["failed"]

    redriven = mailer("retry", "--status", "failed", cwd=tmp_path, env=env)
    assert redriven.returncode == 0, redriven.stderr
    assert b"re-driven 1 message(s)" in redriven.stdout


def test_a_log_key_of_the_wrong_type_is_one_line(tmp_path: Path, redis_url: str) -> None:
    """Redis refusing a command (WRONGTYPE here) is one line and exit 1, not a traceback."""
    client = redis.Redis.from_url(redis_url)
    client.set("mailer:log", "not a stream")
    client.close()
    result = mailer("log", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": redis_url})
    assert result.returncode == 1
    assert "WRONGTYPE" in one_line(result)


def test_enqueue_from_stdin_still_works(tmp_path: Path, redis_url: str) -> None:
    """`-` reads standard input (the PATH check must not refuse it)."""
    result = mailer(
        "enqueue",
        "-",
        cwd=tmp_path,
        env={**clean_env(), "MAILER_REDIS_URL": redis_url},
        input=orjson.dumps(make_event()),
    )
    assert result.returncode == 0, result.stderr
    assert b"enqueued 1 event(s)" in result.stderr


def test_a_usage_error_names_the_command(tmp_path: Path) -> None:
    """The one line says which command and how to get its help."""
    result = mailer("retry", "not-an-id", cwd=tmp_path)
    line = one_line(result)
    assert line.startswith("mailer retry: ")
    assert "not-an-id" in line


@pytest.mark.parametrize(
    "args",
    [["schema"], ["templates", "check"], ["render", "confirmation", "--event", "registration.json"]],
    ids=lambda args: " ".join(args),
)
def test_commands_that_need_no_redis_work_without_it(
    tmp_path: Path, event_file: Path, dead_redis: dict[str, str], args: list[str]
) -> None:
    """schema, templates check and render never touch Redis: a dead one does not stop them."""
    result = mailer(*args, cwd=tmp_path, env=dead_redis)
    assert result.returncode == 0, result.stderr


def test_a_misspelt_status_is_a_usage_error_not_an_empty_answer(tmp_path: Path, redis_url: str) -> None:
    """`mailer log --status faild` would show nothing and let an operator believe nothing failed."""
    result = mailer(
        "log", "--status", "faild", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": redis_url}
    )
    assert result.returncode == 2
    assert "faild" in one_line(result)


def test_a_log_entry_with_a_status_mailer_never_writes_is_shown_as_foreign(
    tmp_path: Path, redis_url: str
) -> None:
    """An entry someone wrote with a made-up status is not passed off as mailer's own."""
    client = redis.Redis.from_url(redis_url)
    client.xadd(
        "mailer:log", {"j": orjson.dumps({"ts": "2026-12-01T10:00:00.000+00:00", "status": "delivered!!"})}
    )
    client.close()
    result = mailer("log", "--json", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": redis_url})
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.decode().splitlines()
    assert orjson.loads(line)["status"] == "foreign"
