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
from aiosmtplib.protocol import normalize_message_line_endings

from mailer.compose import WireMessage
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
        transaction = _Transaction(client, sender, recipient, data)
        try:
            reply = await transaction.run()
        except aiosmtplib.SMTPResponseException as exc:
            # A clean reply: the connection stays usable unless the server closed it (421).
            if exc.code == 421 or not client.is_connected:
                await self._drop()
            else:
                await transaction.reset()
            raise _map_smtp_error(exc, recipient=recipient, data_sent=False) from exc
        except BaseException as exc:
            # Timeouts, drops and cancellation leave the client out of step: never reuse it.
            await self._drop()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise _map_smtp_error(exc, recipient=recipient, data_sent=transaction.data_sent) from exc
        return Accepted(code=reply.code, detail=reply.message)

    async def _drop(self) -> None:
        await _close_quietly(self.client)
        self.client = None


def wire_payload(message: bytes) -> bytes:
    """The DATA payload for a message: dot-stuffed, CRLF line endings, ended by CRLF.CRLF.

    What compose() built is already in that form and only gets the terminator. Other bytes
    are checked with byte counts and one search at C speed. aiosmtplib's own DATA path runs
    two regular expressions over every message, which cost a third of the worker's time.
    """
    if isinstance(message, WireMessage):
        return message + b".\r\n"
    if message.count(b"\n") != message.count(b"\r\n") or message.count(b"\r") != message.count(b"\r\n"):
        message = normalize_message_line_endings(message)
    elif not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    if b"\n." in message:
        message = message.replace(b"\n.", b"\n..")
    return message + b".\r\n"


class _Transaction:
    """MAIL, RCPT, DATA and the payload for one message on one connected client.

    Not `SMTP.sendmail`: that normalises line endings and dot-stuffs with regular
    expressions, twice over with SIZE. Only public aiosmtplib calls are used; the lane
    guarantees that nothing else uses the client meanwhile.
    """

    def __init__(self, client: aiosmtplib.SMTP, sender: str, recipient: str, message: bytes) -> None:
        self.client = client
        self.sender = sender
        self.recipient = recipient
        self.payload = wire_payload(message)
        # Once the payload is written, a lost reply means the server may have the message.
        self.data_sent = False

    async def run(self) -> aiosmtplib.SMTPResponse:
        client = self.client
        options = []
        if client.supports_extension("size"):
            options.append(f"SIZE={len(self.payload) - 3}")  # RFC 1870: without the final ".CRLF"
        await client.mail(self.sender, options=options)
        await client.rcpt(self.recipient)
        reply = await client.execute_command(b"DATA")
        if reply.code != 354:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the message was sent")
        self.data_sent = True
        protocol.write(self.payload)
        reply = await protocol.read_response(timeout=client.timeout)
        if reply.code != 250:
            raise aiosmtplib.SMTPDataError(reply.code, reply.message)
        return reply

    async def reset(self) -> None:
        """After a refusal, clear the envelope for the next message (as sendmail does)."""
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPException):
            await self.client.rset()


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
