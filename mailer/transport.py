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
from collections import deque
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
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _classified(exc.code, exc.message, recipient)
    # aiosmtplib's timeout and disconnect errors subclass TimeoutError and OSError; a timeout
    # is an OSError too, so it is asked first.
    if isinstance(exc, TimeoutError):
        cls = UncertainDeliveryError if data_sent else TransientDeliveryError
        return cls(f"timed out: {exc}", recipient=recipient)
    if isinstance(exc, OSError):
        cls = UncertainDeliveryError if data_sent else TransientDeliveryError
        return cls(f"connection lost: {exc}", recipient=recipient)
    if isinstance(exc, aiosmtplib.SMTPException):
        return TransientDeliveryError(f"SMTP error: {exc}", recipient=recipient)
    return TransientDeliveryError(f"{type(exc).__name__}: {exc}", recipient=recipient)


class SmtpTransport:
    """Up to `max_connections` kept-open SMTP connections, each used by one send at a time.

    aiosmtplib opens each connection (TLS or STARTTLS, EHLO, AUTH); the mail transactions
    then run on `_Session`, which pipelines MAIL, RCPT and DATA where the server offers
    PIPELINING. Parallelism comes from several connections. A connection that failed with
    anything but a clean SMTP reply is closed: after a timeout or a cancellation mid-DATA
    it is out of step with the server.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.smtp_host is None:
            raise ValueError("SmtpTransport needs MAILER_SMTP_HOST")
        self.name = f"smtp:{settings.smtp_host}:{settings.effective_smtp_port}"
        self._settings = settings
        self._idle: asyncio.Queue[_Session | None] = asyncio.Queue()
        for _ in range(settings.smtp_max_connections):
            self._idle.put_nowait(None)  # a slot with no connection yet
        # getfqdn() on every connect costs a thread hop and a DNS lookup; do it once.
        self._local_hostname = settings.smtp_local_hostname or socket.getfqdn()

    async def _open(self) -> _Session:
        s = self._settings
        password = s.smtp_password.get_secret_value() if s.smtp_password else None
        client = aiosmtplib.SMTP(
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
        await client.connect()
        if client.is_ehlo_or_helo_needed:  # connect() greets only on the way to STARTTLS or AUTH
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError:
                await client.helo()  # a server without ESMTP: no PIPELINING, no SIZE
        return _Session.take_over(client, timeout=s.smtp_timeout)

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
        sessions = []
        while not self._idle.empty():
            sessions.append(self._idle.get_nowait())
        for session in sessions:
            if session is not None:
                await session.quit()
            self._idle.put_nowait(None)


class _SmtpLane:
    """One pooled connection, opened on first use and reopened after any failure."""

    def __init__(self, transport: SmtpTransport, client: _Session | None) -> None:
        self.transport = transport
        self.client = client

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted:
        try:
            envelope = (_address(sender), _address(recipient))
        except ValueError as exc:
            raise PermanentDeliveryError(str(exc), recipient=recipient) from None
        payload = wire_payload(data)
        for attempt in (1, 2):
            session = await self._session(recipient)
            try:
                reply = await session.transact(*envelope, payload)
            except _OutOfStep as exc:
                # Replies no longer pair with commands (a stray reply, often an idle-timeout
                # 421): a new connection, and once more if nothing of this message was sent.
                self._drop()
                if attempt == 1 and not session.data_sent:
                    logger.info("SMTP connection out of step (%s); reconnecting", exc)
                    continue
                cls = UncertainDeliveryError if session.data_sent else TransientDeliveryError
                raise cls(f"SMTP replies out of step: {exc}", recipient=recipient) from exc
            except _Refused as exc:
                # A clean reply: the connection stays usable unless the server closed it (421).
                if exc.code == 421 or session.closed:
                    self._drop()
                raise _classified(exc.code, exc.text, recipient) from exc
            except BaseException as exc:
                # Timeouts, drops and cancellation leave the connection out of step: never reuse it.
                self._drop()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise _map_smtp_error(exc, recipient=recipient, data_sent=session.data_sent) from exc
            return Accepted(code=reply.code, detail=reply.text)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _session(self, recipient: str) -> _Session:
        session = self.client
        if session is None or session.closed:
            try:
                session = await self.transport._open()
            except Exception as exc:
                self.client = None
                raise _map_smtp_error(exc, recipient=recipient, data_sent=False) from exc
            self.client = session
        return session

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None


@dataclass(frozen=True, slots=True)
class _Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text[:80]}"


class _OutOfStep(Exception):
    """Commands and replies no longer pair up; the connection must be replaced."""


class _Refused(Exception):
    """The server refused a command of the transaction (4xx/5xx). Never leaves this module:
    the lane turns it into a DeliveryError from mailer.errors."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(f"{reply.code} {reply.text}")
        self.code = reply.code
        self.text = reply.text


class _Session(asyncio.Protocol):
    """Mail transactions on a connection aiosmtplib opened (and handed over with set_protocol).

    Not aiosmtplib's sendmail: that waits for each reply before the next command (four
    round trips a mail), parses both addresses again, and runs regular expressions over
    every message (a third of the worker's time, profiled). With PIPELINING (RFC 2920)
    MAIL, RCPT and DATA go in one write and the payload in a second: two round trips.
    """

    def __init__(self, transport: asyncio.Transport, *, pipelining: bool, size: bool, timeout: float) -> None:
        self._transport = transport
        self._pipelining = pipelining
        self._size = size
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: deque[_Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._lost: Exception | None = None
        # Once the payload is written, a lost reply means the server may have the message.
        self.data_sent = False

    @classmethod
    def take_over(cls, client: aiosmtplib.SMTP, *, timeout: float) -> _Session:
        protocol = client.protocol
        transport = protocol.transport if protocol is not None else None
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost after EHLO")
        session = cls(
            transport,  # type: ignore[arg-type]
            pipelining=client.supports_extension("pipelining"),
            size=client.supports_extension("size"),
            timeout=timeout,
        )
        transport.set_protocol(session)
        return session

    @property
    def closed(self) -> bool:
        return self._lost is not None or self._transport.is_closing()

    async def transact(self, sender: bytes, recipient: bytes, payload: bytes) -> _Reply:
        """Send one message to one recipient; its final reply, or _Refused / _OutOfStep."""
        self.data_sent = False
        if self._replies:
            self._raise_if_refused_and_lost()
            raise _OutOfStep(
                f"unsolicited reply {self._replies[0]}" if self._replies else "connection closed"
            )
        mail = b"MAIL FROM:<" + sender + b">"
        if self._size:
            mail += b" SIZE=%d" % (len(payload) - 3)  # RFC 1870: without the final ".CRLF"
        rcpt = b"RCPT TO:<" + recipient + b">\r\n"
        rcpt_reply: _Reply | None
        data_reply: _Reply | None
        if self._pipelining:
            self._transport.write(mail + b"\r\n" + rcpt + b"DATA\r\n")
            mail_reply, rcpt_reply, data_reply = await self._read(3)
        else:
            mail_reply = (await self._command(mail + b"\r\n"))[0]
            rcpt_reply = (await self._command(rcpt))[0] if mail_reply.code < 400 else None
            ready = rcpt_reply is not None and rcpt_reply.code < 400
            data_reply = (await self._command(b"DATA\r\n"))[0] if ready else None
        refusal = next(
            (r for r in (mail_reply, rcpt_reply, data_reply) if r is not None and r.code >= 400), None
        )
        if refusal is not None:
            if data_reply is not None and data_reply.code == 354:
                # DATA was accepted although the envelope was not: end it with nothing in it.
                await self._command(b".\r\n")
            await self._reset()
            raise _Refused(refusal)
        if data_reply is None or data_reply.code != 354:
            raise _OutOfStep(f"replies {mail_reply}, {rcpt_reply}, {data_reply} to MAIL, RCPT, DATA")
        if self.closed:
            raise aiosmtplib.SMTPServerDisconnected("connection lost before the message was sent")
        self.data_sent = True
        (final,) = await self._command(payload)
        if 200 <= final.code < 300:
            return final
        if final.code >= 400:
            await self._reset()
            raise _Refused(final)
        raise _OutOfStep(f"reply {final} to the end of the message")

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            if not self.closed:
                self._timeout = min(self._timeout, 2.0)
                await self._command(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        self._transport.close()

    # --- reading replies ----------------------------------------------------------------

    async def _command(self, line: bytes) -> list[_Reply]:
        self._transport.write(line)
        return await self._read(1)

    async def _reset(self) -> None:
        """After a refusal, clear the envelope for the next message (as sendmail does)."""
        try:
            await self._command(b"RSET\r\n")
        except Exception:
            self.close()  # out of step: the next send opens a new connection

    async def _read(self, n: int) -> list[_Reply]:
        if len(self._replies) < n:
            self._raise_if_refused_and_lost()
            self._wanted = n
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(self._timeout, _expire, waiter, self._timeout)
            try:
                await waiter
            except aiosmtplib.SMTPServerDisconnected:
                self._raise_if_refused_and_lost()
                raise
            finally:
                timer.cancel()
                self._waiter = None
        return [self._replies.popleft() for _ in range(n)]

    def _raise_if_refused_and_lost(self) -> None:
        """A server that refuses and hangs up (421 to a pipelined MAIL): report its reply,
        which carries the code the relay back-off needs, rather than "connection lost"."""
        if self._lost is None:
            return
        refusal = next((r for r in self._replies if r.code >= 400), None)
        self._replies.clear()
        if refusal is not None:
            raise _Refused(refusal)
        raise self._lost

    def _wake(self, error: Exception | None = None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
        elif len(self._replies) >= self._wanted:
            waiter.set_result(None)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            line = bytes(buffer[start : end + 1])
            start = end + 1
            if len(line) < 4 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                self._fail(aiosmtplib.SMTPServerDisconnected(f"malformed reply line {line[:80]!r}"))
                return
            self._lines.append(line[4:].strip())
            if len(self._lines) > 200:
                self._fail(aiosmtplib.SMTPServerDisconnected("reply of over 200 lines"))
                return
            if line[3:4] != b"-":
                text = b"\n".join(self._lines).decode("utf-8", "replace")
                self._replies.append(_Reply(int(line[:3]), text))
                self._lines = []
        del buffer[:start]
        if len(buffer) > 65536:
            self._fail(aiosmtplib.SMTPServerDisconnected("reply line too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc or 'closed by the server'}")
        self._wake(self._lost)

    def _fail(self, error: Exception) -> None:
        self._lost = error
        self._transport.close()
        self._wake(error)


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no reply within {timeout:g} s"))


def _address(address: str) -> bytes:
    """The address for MAIL/RCPT: already validated, so only a last guard against injection."""
    try:
        encoded = address.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"address {address!r} is not ASCII (SMTPUTF8 is not used)") from None
    if any(c in encoded for c in b"\r\n<> "):
        raise ValueError(f"address {address!r} cannot go into an SMTP command")
    return encoded


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
