"""The Maildir outbox: where mail goes on the embedded defaults, for development and previews."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

from mailer.delivery.transport import Accepted, Lane
from mailer.errors import TransientDeliveryError


class MaildirTransport:
    """Writes each message into a Maildir (new/), for development and previews.

    Any mail client or `mutt -f var/outbox` reads it; tmp/ then rename() keeps readers
    from ever seeing half a message. Folders it creates are 0700 and mails 0600, whatever
    the umask: they hold attendees' names and addresses.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"maildir:{path}"
        missing = [p for p in (path, *path.parents) if not p.exists()]
        for directory in [*reversed(missing), *(path / sub for sub in ("tmp", "new", "cur"))]:
            with contextlib.suppress(FileExistsError):
                directory.mkdir(mode=0o700)
                directory.chmod(0o700)  # mkdir's mode is filtered by the umask
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._counter = 0

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted:
        self._counter += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._counter}.{self._host}"
        tmp = self.path / "tmp" / name
        # Maildir wants LF line endings on disk; the wire form is CRLF.
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(
                    f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode()
                    + data.replace(b"\r\n", b"\n")
                )
            tmp.rename(self.path / "new" / name)
        except OSError as exc:
            raise TransientDeliveryError(
                f"cannot write to outbox {self.path}: {exc}", recipient=recipient
            ) from exc
        return Accepted(code=None, detail=f"written to {self.path / 'new' / name}")

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[Lane]:
        yield self

    async def probe(self) -> None:
        return None  # a folder has no health of its own to wait for

    async def close(self) -> None:
        return None
