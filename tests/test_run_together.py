"""`make run`: `mailer worker --serve HOST:PORT` runs the dashboard beside the worker on the
embedded defaults, prints its address, and Ctrl-C (or SIGTERM) stops everything it started."""

from __future__ import annotations

import mailbox
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from mailer.ops.embedded import is_running, socket_path
from mailer.ops.serve_process import ServeAddress
from tests.conftest import free_port, make_event
from tests.test_cli import clean_env, mailer


def start(directory: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    (directory / "registration.json").write_bytes(orjson.dumps(make_event()))
    log = directory / "worker.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "mailer", "worker", *args], cwd=directory, env=clean_env(), stderr=err
        )
    return process, log


def wait_until(condition: object, process: subprocess.Popen[bytes], log: Path, within: float = 30) -> None:
    """Poll `condition` (a callable) until true; fail with the worker's lines if it died or time ran out."""
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("stop_with", [signal.SIGINT, signal.SIGTERM])
def test_the_worker_runs_the_dashboard_beside_it_and_stops_it(tmp_path: Path, stop_with: int) -> None:
    port = free_port()
    worker, log = start(tmp_path, "--serve", f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: f"dashboard at {base}/" in log.read_text(), worker, log)
        wait_until(lambda: answers(f"{base}/readyz"), worker, log)  # Redis, and the worker's heartbeat
        # Loopback without a token: the dashboard opens without a login.
        page = httpx.get(f"{base}/", timeout=5)
        assert page.status_code == 200
        assert "Workers alive" in page.text
        assert mailer("enqueue", "registration.json", cwd=tmp_path).returncode == 0
        outbox = mailbox.Maildir(tmp_path / "var" / "outbox", create=False)
        wait_until(lambda: len(outbox) == 1, worker, log)
        (key,) = outbox.keys()
        # The outbox viewer reads the same data dir as the worker writes.
        assert httpx.get(f"{base}/outbox", timeout=5).status_code == 200
    finally:
        worker.send_signal(stop_with)
        worker.wait(timeout=40)
    text = log.read_text()
    assert worker.returncode == 0, text
    assert not listening(port), "mailer serve outlived the worker"
    assert not is_running(socket_path(tmp_path / "var"))
    assert "Traceback" not in text
    assert "mailer serve exited" not in text  # it was stopped, not lost
    assert key


def test_a_service_that_cannot_start_leaves_the_worker_sending(tmp_path: Path) -> None:
    """The port is taken: the service's own error and one line from the worker, which goes on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker, log = start(tmp_path, "--serve", f"127.0.0.1:{port}")
        try:
            wait_until(lambda: "mailer serve exited with status" in log.read_text(), worker, log)
            wait_until(lambda: "mailer worker: Redis" in log.read_text(), worker, log)
            assert mailer("enqueue", "registration.json", cwd=tmp_path).returncode == 0
            outbox = mailbox.Maildir(tmp_path / "var" / "outbox", create=False)
            wait_until(lambda: len(outbox) == 1, worker, log)
        finally:
            worker.send_signal(signal.SIGINT)
            worker.wait(timeout=40)
    assert worker.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("127.0.0.1:8080", "127.0.0.1", 8080), ("[::1]:9000", "::1", 9000), (":8081", "127.0.0.1", 8081)],
)
def test_serve_addresses(text: str, host: str, port: int) -> None:
    assert ServeAddress.parse(text) == ServeAddress(host, port)


def test_make_run_starts_the_dashboard_at_8080() -> None:
    """The README's `make run` is the worker with the service beside it (what Make would run)."""
    root = Path(__file__).parent.parent
    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "run"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip().splitlines()[-1] == "exec .venv/bin/mailer worker --serve 127.0.0.1:8080"
