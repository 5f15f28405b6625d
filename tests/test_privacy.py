"""Attendee data on disk is readable by its owner only: var/ and everything in it."""

from __future__ import annotations

import mailbox
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mailer.delivery.maildir import MaildirTransport
from tests.test_cli import mailer, start_embedded_worker


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (kind, permission bits) for root and everything under it."""
    found: dict[str, tuple[str, int]] = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        kind = (
            "dir"
            if stat.S_ISDIR(info.st_mode)
            else "socket"
            if stat.S_ISSOCK(info.st_mode)
            else "file"
            if stat.S_ISREG(info.st_mode)
            else "other"
        )
        found[str(path.relative_to(root.parent))] = (kind, stat.S_IMODE(info.st_mode))
    return found


def assert_private(found: dict[str, tuple[str, int]]) -> None:
    wrong = {
        path: f"{kind} {mode:o}"
        for path, (kind, mode) in found.items()
        if (kind == "dir" and mode != 0o700)
        or (kind == "file" and mode != 0o600)
        or (kind in ("socket", "other") and mode & 0o077)
    }
    assert not wrong, wrong


def test_embedded_defaults_keep_var_private_under_a_permissive_umask(tmp_path: Path) -> None:
    """`mailer worker` on embedded defaults, started with umask 000: var/ and every folder in it
    are 0700, the Redis AOF and log and every outbox mail 0600, the socket closed to others."""
    worker = start_embedded_worker(tmp_path, stdout=subprocess.DEVNULL, umask=0o000)
    try:
        deadline = time.monotonic() + 20
        assert mailer("enqueue", "registration.json", cwd=tmp_path).returncode == 0
        outbox = mailbox.Maildir(tmp_path / "var" / "outbox", create=False)
        while len(outbox) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        aof = tmp_path / "var" / "redis" / "appendonly.aof"
        while b"maria.mueller@example.org" not in aof.read_bytes():  # written within a second
            assert time.monotonic() < deadline
            time.sleep(0.05)
        found = modes(tmp_path / "var")
    finally:
        worker.send_signal(signal.SIGINT)
        worker.communicate(timeout=30)
    assert worker.returncode == 0
    kinds = {kind for kind, _ in found.values()}
    assert {"dir", "file", "socket"} <= kinds
    assert {"var/redis/appendonly.aof", "var/redis/redis.log", "var/outbox/new"} <= set(found)
    assert any(path.startswith("var/outbox/new/") for path in found)
    assert_private(found)


async def test_maildir_folders_and_mails_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """An outbox under folders that do not exist yet: each folder made 0700, each mail 0600."""
    with umask(0o000):
        transport = MaildirTransport(tmp_path / "a" / "b" / "outbox")
        await transport.send(sender="noreply@example.org", recipient="maria@example.org", data=b"x\r\n")
    found = modes(tmp_path / "a")
    assert len([kind for kind, _ in found.values() if kind == "file"]) == 1
    assert_private(found)
