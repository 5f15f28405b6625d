"""`mailer serve` as a child of `mailer worker --serve`: the one-command set-up `make run` starts.

A process of its own, not a second app on the worker's event loop: the dashboard's and the
intake's work must not take turns with the sends, and a crash of one must not end the other.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from dataclasses import dataclass

logger = logging.getLogger("mailer.serve")

# How long the service gets for its own shutdown before it is killed: uvicorn finishes the
# requests in flight; a dashboard page or an intake batch takes well under a second.
STOP_SECONDS = 10.0

_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))?:(?P<port>[0-9]{1,5})$")


@dataclass(frozen=True, slots=True)
class ServeAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ServeAddress:
        """`HOST:PORT`, `[V6]:PORT` or `:PORT` (on 127.0.0.1); ValueError says what is wrong."""
        match = _ADDRESS.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not HOST:PORT (say 127.0.0.1:8080, [::1]:8080 or :8080)")
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not between 1 and 65535")
        return cls(match["v6"] or match["host"] or "127.0.0.1", port)

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/"


class ServeProcess:
    """Starts `mailer serve` beside the worker, says when it ends on its own, stops it on exit.

    The child inherits the environment (so the same settings, and without MAILER_REDIS_URL
    the same embedded Redis under MAILER_DATA_DIR) and the terminal, which shows its lines.
    """

    def __init__(self, address: ServeAddress) -> None:
        self.address = address
        self.process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "mailer", "serve", "--host", self.address.host]
        command += ["--port", str(self.address.port)]
        self.process = subprocess.Popen(  # noqa: S603 - our own command
            command,
            stdin=subprocess.DEVNULL,
            # Own session: Ctrl-C reaches the worker alone, which stops the service after it,
            # so an end the worker did not ask for is one the watcher can report.
            start_new_session=True,
        )
        self._watcher = threading.Thread(target=self._watch, name="serve-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        process = self.process
        assert process is not None
        status = process.wait()
        if not self._stopping.is_set():
            # The worker goes on sending: mail matters more than the dashboard. The child's
            # own lines above this one say why (most often: the port is taken).
            logger.error(
                "mailer serve exited with status %s; the worker goes on without the dashboard "
                "(restart both, or run `mailer serve` on its own)",
                status,
            )

    def stop(self) -> None:
        """Ask the service to stop (SIGTERM), kill it after STOP_SECONDS; idempotent."""
        self._stopping.set()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
