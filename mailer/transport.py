"""Handing finished messages over: SMTP (a small pool of kept-open connections) or a Maildir outbox.

This is the only module that imports aiosmtplib; its errors are mapped to mailer's in
`_map_smtp_error` and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib

from mailer.errors import (
    DeliveryError,
    PermanentDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)
from mailer.retry import enhanced_code, is_transient
from mailer.settings import Settings

logger = logging.getLogger("mailer.transport")


@dataclass(frozen=True, slots=True)
class Accepted:
    """The server took the message: its reply, for the delivery log."""

    code: int | None
    detail: str


class Lane(Protocol):
    """One connection (or its equivalent) held for a run of sends."""

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted: ...


class Transport(Protocol):
    """Delivers one message to one recipient; raises a DeliveryError subclass otherwise.

    `lane()` holds one of the transport's connections, so the caller can mark a message as
    handed over only once a connection is really free for it.
    """

    name: str

    def lane(self) -> contextlib.AbstractAsyncContextManager[Lane]: ...

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted: ...

    async def close(self) -> None: ...


def _classified(code: int | None, text: str, recipient: str | None) -> DeliveryError:
    cls = TransientDeliveryError if is_transient(code, text) else PermanentDeliveryError
    return cls(text or "no reply text", code=code, enhanced_code=enhanced_code(text), recipient=recipient)


def _map_smtp_error(exc: BaseException, *, recipient: str, data_sent: bool) -> DeliveryError:
    """Translate aiosmtplib's exceptions into mailer's tree (the one place that knows them)."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refused = exc.recipients[0]
        return _classified(refused.code, refused.message, recipient)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _classified(exc.code, exc.message, recipient)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError | TimeoutError):
        cls = UncertainDeliveryError if data_sent else TransientDeliveryError
        return cls(f"timed out: {exc}", recipient=recipient)
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError | OSError):
        cls = UncertainDeliveryError if data_sent else TransientDeliveryError
        return cls(f"connection lost: {exc}", recipient=recipient)
    if isinstance(exc, aiosmtplib.SMTPException):
        return TransientDeliveryError(f"SMTP error: {exc}", recipient=recipient)
    return TransientDeliveryError(f"{type(exc).__name__}: {exc}", recipient=recipient)


class SmtpTransport:
    """Up to `max_connections` kept-open SMTP clients, each used by one send at a time.

    aiosmtplib serialises sends on one client (no PIPELINING), so parallelism comes from
    several clients. A client that raised anything but an SMTP reply is closed: after a
    timeout or a cancellation mid-DATA it is out of step with the server.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.smtp_host is None:
            raise ValueError("SmtpTransport needs MAILER_SMTP_HOST")
        self.name = f"smtp:{settings.smtp_host}:{settings.effective_smtp_port}"
        self.relay = f"{settings.smtp_host}:{settings.effective_smtp_port}"
        self._settings = settings
        self._idle: asyncio.Queue[aiosmtplib.SMTP | None] = asyncio.Queue()
        for _ in range(settings.smtp_max_connections):
            self._idle.put_nowait(None)  # a slot with no connection yet
        # getfqdn() on every connect costs a thread hop and a DNS lookup; do it once.
        self._local_hostname = settings.smtp_local_hostname or socket.getfqdn()

    def _new_client(self) -> aiosmtplib.SMTP:
        s = self._settings
        password = s.smtp_password.get_secret_value() if s.smtp_password else None
        return aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.effective_smtp_port,
            username=s.smtp_username,
            password=password,
            use_tls=s.smtp_security == "tls",
            # Explicit: None would silently fall back to plaintext if STARTTLS isn't offered.
            start_tls=s.smtp_security == "starttls",
            timeout=s.smtp_timeout,
            local_hostname=self._local_hostname,
        )

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[Lane]:
        """Hold one connection for a run of sends; other senders wait for a free one."""
        lane = _SmtpLane(self, await self._idle.get())
        try:
            yield lane
        finally:
            self._idle.put_nowait(lane.client)

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted:
        async with self.lane() as lane:
            return await lane.send(sender=sender, recipient=recipient, data=data)

    async def close(self) -> None:
        clients = []
        while not self._idle.empty():
            clients.append(self._idle.get_nowait())
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.quit(), timeout=2)
                await _close_quietly(client)
            self._idle.put_nowait(None)


class _SmtpLane:
    """One pooled connection, opened on first use and reopened after any failure."""

    def __init__(self, transport: SmtpTransport, client: aiosmtplib.SMTP | None) -> None:
        self.transport = transport
        self.client = client

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted:
        client = self.client
        if client is None or not client.is_connected:
            client = self.transport._new_client()
            try:
                await client.connect()
            except Exception as exc:
                self.client = None
                raise _map_smtp_error(exc, recipient=recipient, data_sent=False) from exc
            self.client = client
        try:
            errors, reply = await client.sendmail(sender, [recipient], data)
        except aiosmtplib.SMTPResponseException as exc:
            # A clean reply: the connection stays usable unless the server closed it (421).
            if exc.code == 421 or not client.is_connected:
                await self._drop()
            raise _map_smtp_error(exc, recipient=recipient, data_sent=False) from exc
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise _map_smtp_error(exc, recipient=recipient, data_sent=False) from exc
        except BaseException as exc:
            # Timeouts, drops and cancellation leave the client out of step: never reuse it.
            await self._drop()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _map_smtp_error(exc, recipient=recipient, data_sent=True) from exc
        if errors:
            # Partly refused recipients come back as a dict, not an exception.
            code, text = next(iter(errors.values()))
            raise _classified(code, text, recipient)
        return Accepted(code=250, detail=reply)

    async def _drop(self) -> None:
        await _close_quietly(self.client)
        self.client = None


async def _close_quietly(client: aiosmtplib.SMTP | None) -> None:
    if client is not None:
        with contextlib.suppress(Exception):
            client.close()


class MaildirTransport:
    """Writes each message into a Maildir (new/), for development and previews.

    Any mail client or `mutt -f var/outbox` reads it; tmp/ then rename() keeps readers
    from ever seeing half a message.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"maildir:{path}"
        for sub in ("tmp", "new", "cur"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._counter = 0

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted:
        self._counter += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._counter}.{self._host}"
        tmp = self.path / "tmp" / name
        # Maildir wants LF line endings on disk; the wire form is CRLF.
        try:
            tmp.write_bytes(
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

    async def close(self) -> None:
        return None


def build_transport(settings: Settings) -> Transport:
    """SMTP when MAILER_SMTP_HOST is set, else the Maildir outbox."""
    if settings.smtp_host:
        return SmtpTransport(settings)
    return MaildirTransport(settings.effective_outbox_dir)
