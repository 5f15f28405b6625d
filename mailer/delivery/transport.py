"""Handing finished messages over: SMTP (a small pool of kept-open connections) or a Maildir outbox.

This is the only module that imports aiosmtplib; its errors are mapped to mailer's in
`_map_smtp_error` and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from mailer.content.compose import WireMessage
from mailer.delivery.retry import enhanced_code, is_transient
from mailer.errors import (
    DeliveryError,
    PermanentDeliveryError,
    RelayFault,
    TimeoutDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)
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

    async def probe(self) -> None:
        """Check the relay takes connections (raises RelayFault if not); for the circuit."""
        ...

    async def close(self) -> None: ...


# Replies in which the relay speaks of itself: 421 "service not available" (often
# throttling) at any stage, 432 (Exchange Online's concurrent-connection limit).
RELAY_CODES = frozenset({421, 432})
_CREDENTIALS = "MAILER_SMTP_USERNAME / MAILER_SMTP_PASSWORD"


def _classified(code: int | None, text: str, recipient: str | None) -> DeliveryError:
    """A refusal inside a mail transaction: about the relay, or about this message."""
    enhanced = enhanced_code(text)
    if code in RELAY_CODES or code == -1:
        return RelayFault(text or "no reply text", code=code, enhanced_code=enhanced, recipient=recipient)
    if code == 530:
        # "530 5.7.0 Must issue a STARTTLS command first" (Postfix to MAILER_SMTP_SECURITY=none),
        # or "530 5.7.1 Authentication required": true of every message, fixed only by a setting.
        setting = "MAILER_SMTP_SECURITY" if "tls" in text.lower() else _CREDENTIALS
        return RelayFault(
            text, code=code, enhanced_code=enhanced, recipient=recipient, healable=False, setting=setting
        )
    cls = TransientDeliveryError if is_transient(code, text) else PermanentDeliveryError
    return cls(text or "no reply text", code=code, enhanced_code=enhanced, recipient=recipient)


def _map_smtp_error(exc: BaseException, *, recipient: str, data_sent: bool) -> DeliveryError:
    """Translate aiosmtplib's exceptions met in a mail transaction (the one place that knows them).

    Anything else is a bug in mailer, not a delivery problem: logged with its traceback and
    reported as an internal error, so the message fails visibly instead of retrying silently.
    """
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _classified(exc.code, exc.message, recipient)
    # aiosmtplib's timeout and disconnect errors subclass TimeoutError and OSError; a timeout
    # is an OSError too, so it is asked first.
    if isinstance(exc, TimeoutError):
        if data_sent:
            return UncertainDeliveryError(f"timed out: {exc}", recipient=recipient)
        return TimeoutDeliveryError(f"timed out: {exc}", recipient=recipient)
    if isinstance(exc, OSError):
        cls = UncertainDeliveryError if data_sent else TransientDeliveryError
        return cls(f"connection lost: {exc}", recipient=recipient)
    if isinstance(exc, aiosmtplib.SMTPException):
        return TransientDeliveryError(f"SMTP error: {exc}", recipient=recipient)
    logger.error("internal error while sending to %s", recipient, exc_info=exc)
    return PermanentDeliveryError(f"internal error: {type(exc).__name__}: {exc}", recipient=recipient)


def _map_connect_error(exc: BaseException) -> DeliveryError:
    """Translate what went wrong opening a connection (before any MAIL): always the relay's fault.

    `healable=False` where waiting will not help, naming the setting to fix.
    """
    if isinstance(exc, RelayFault):
        return exc
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        # 454 is "temporary authentication failure"; 535/534/5xx: the credentials are wrong.
        healable = exc.code == 454
        return RelayFault(
            f"login refused: {exc.code} {exc.message}",
            code=exc.code,
            enhanced_code=enhanced_code(exc.message),
            healable=healable,
            setting=None if healable else _CREDENTIALS,
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return RelayFault(
            f"TLS certificate refused: {exc.verify_message or exc}",
            healable=False,
            setting="MAILER_SMTP_HOST (the name in the relay's certificate) or SSL_CERT_FILE",
        )
    if isinstance(exc, ssl.SSLError):
        return RelayFault(
            f"TLS failed: {exc}",
            healable=False,
            setting="MAILER_SMTP_SECURITY / MAILER_SMTP_PORT (tls is port 465, starttls 587)",
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        if exc.code == -1:
            return RelayFault(f"malformed reply: {exc.message}", code=None)
        if exc.code >= 500 and isinstance(exc, aiosmtplib.SMTPHeloError):
            return RelayFault(
                f"EHLO refused: {exc.code} {exc.message}",
                code=exc.code,
                healable=False,
                setting="MAILER_SMTP_LOCAL_HOSTNAME",
            )
        mapped = _classified(exc.code, exc.message, None)
        if isinstance(mapped, RelayFault):
            return mapped
        return RelayFault(
            f"connection refused by the relay: {exc.code} {exc.message}",
            code=exc.code,
            enhanced_code=enhanced_code(exc.message),
        )
    if isinstance(exc, TimeoutError):
        return RelayFault(f"timed out connecting: {exc}")
    if isinstance(exc, OSError):
        return RelayFault(f"cannot connect: {exc}")
    if isinstance(exc, aiosmtplib.SMTPException):
        text = str(exc)
        if "STARTTLS" in text:
            return RelayFault(text, healable=False, setting="MAILER_SMTP_SECURITY")
        if "AUTH" in text:
            return RelayFault(text, healable=False, setting=f"{_CREDENTIALS} or MAILER_SMTP_SECURITY")
        return RelayFault(f"SMTP error: {text}")
    # Something nobody foresaw (an IDNA error for a host name, a bug): still about the relay,
    # not the message, so the mail is held and the error shouted, never dead-lettered.
    logger.error("unexpected error while connecting to the relay", exc_info=exc)
    return RelayFault(
        f"cannot connect ({type(exc).__name__}: {exc})",
        healable=False,
        setting="MAILER_SMTP_HOST / MAILER_SMTP_PORT",
    )


def is_fully_qualified(name: str) -> bool:
    """True for a name relays accept in EHLO: a dotted domain or an address literal."""
    if name.startswith("[") and name.endswith("]"):
        return True
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return False  # a bare IP must be bracketed
    return "." in name.strip(".") and not name.endswith(".localdomain") and name != "localhost"


# Mechanisms in the order we prefer them; exactly one is tried (see SmtpTransport._login).
_AUTH_PREFERENCE = ("plain", "login", "cram-md5")


class SmtpTransport:
    """Up to `max_connections` kept-open SMTP connections, each used by one send at a time.

    aiosmtplib opens each connection (TLS or STARTTLS, EHLO); mailer logs in itself with
    one mechanism, and the mail transactions then run on `_Session`, which pipelines MAIL,
    RCPT and DATA where the server offers PIPELINING. Parallelism comes from several
    connections. A connection that failed with anything but a clean SMTP reply is closed:
    after a timeout or a cancellation mid-DATA it is out of step with the server. One
    idle for MAILER_SMTP_IDLE_SECONDS is closed with QUIT.
    """

    def __init__(self, settings: Settings) -> None:
        if settings.smtp_host is None:
            raise ValueError("SmtpTransport needs MAILER_SMTP_HOST")
        self.name = f"smtp:{settings.smtp_host}:{settings.effective_smtp_port}"
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.smtp_max_connections)
        self._idle: list[tuple[_Session, float]] = []  # most recently used last
        self._reaper: asyncio.TimerHandle | None = None
        self._quitting: set[asyncio.Task[None]] = set()
        # Until a connection has worked, open one at a time: a wrong password must cost one
        # failed login, not one per lane (providers lock accounts after a few).
        self._proven = False
        self._opening = asyncio.Lock()
        self._refusals = 0
        self._last_refusal: BaseException | None = None
        # getfqdn() on every connect costs a thread hop and a DNS lookup; do it once.
        self._local_hostname = settings.smtp_local_hostname or socket.getfqdn()
        if not is_fully_qualified(self._local_hostname):
            logger.warning(
                "the EHLO name %r is not a fully qualified domain name; relays with "
                "reject_non_fqdn_helo_hostname refuse it: set MAILER_SMTP_LOCAL_HOSTNAME",
                self._local_hostname,
            )

    async def _open(self) -> _Session:
        if self._proven:
            return await self._connect()
        refusals = self._refusals
        async with self._opening:
            if self._refusals != refusals and self._last_refusal is not None:
                # The lane that went first was refused while this one waited: don't ask again.
                raise self._last_refusal
            try:
                session = await self._connect()
            except Exception as exc:
                self._refusals += 1
                self._last_refusal = exc
                raise
            self._proven = True
            return session

    async def _connect(self) -> _Session:
        s = self._settings
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.effective_smtp_port,
            use_tls=s.smtp_security == "tls",
            # Explicit: None would silently fall back to plaintext if STARTTLS isn't offered.
            start_tls=s.smtp_security == "starttls",
            timeout=s.smtp_timeout,
            local_hostname=self._local_hostname,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:  # connect() greets only on the way to STARTTLS
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()  # a server without ESMTP: no PIPELINING, no SIZE
            if s.smtp_username:
                await self._login(client)
            return _Session.take_over(client, timeout=s.smtp_timeout)
        except BaseException:
            client.close()
            raise

    async def _login(self, client: aiosmtplib.SMTP) -> None:
        """AUTH with the first mechanism both sides know, and only that one.

        aiosmtplib's login() tries the next mechanism after a refusal: with a wrong
        password that is two failed logins per connection (Postfix logs auth=0/2).
        """
        s = self._settings
        assert s.smtp_username is not None
        offered = client.server_auth_methods
        mechanism = next((m for m in _AUTH_PREFERENCE if m in offered), None)
        if mechanism is None:
            tls = "" if s.smtp_security != "none" else " without TLS (set MAILER_SMTP_SECURITY)"
            raise RelayFault(
                f"the relay offers no login we support{tls}: AUTH {' '.join(offered) or '(none)'}",
                healable=False,
                setting="MAILER_SMTP_SECURITY or MAILER_SMTP_USERNAME",
            )
        password = s.smtp_password.get_secret_value() if s.smtp_password else ""
        method = {"plain": client.auth_plain, "login": client.auth_login, "cram-md5": client.auth_crammd5}
        await method[mechanism](s.smtp_username, password)

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[Lane]:
        """Hold one connection for a run of sends; other senders wait for a free one."""
        async with self._slots:
            session = self._idle.pop()[0] if self._idle else None
            lane = _SmtpLane(self, session)
            try:
                yield lane
            finally:
                if lane.client is not None and not lane.client.closed:
                    self._idle.append((lane.client, time.monotonic()))
                    self._arm_reaper()

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted:
        async with self.lane() as lane:
            return await lane.send(sender=sender, recipient=recipient, data=data)

    async def probe(self) -> None:
        """Open (and keep) one fresh connection; raises RelayFault if the relay will not have it.

        Fresh, never a pooled one: a connection kept from before the fault (or half-open after
        the relay's host went down) would "succeed" without asking the relay anything.
        """
        stale, self._idle = self._idle, []
        for session, _ in stale:
            session.close()
        async with self.lane() as lane:
            assert isinstance(lane, _SmtpLane)
            await lane.session()

    def _arm_reaper(self) -> None:
        if self._reaper is None:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self._settings.smtp_idle_seconds / 2, self._reap)

    def _reap(self) -> None:
        """QUIT the connections that have been idle for MAILER_SMTP_IDLE_SECONDS."""
        self._reaper = None
        cutoff = time.monotonic() - self._settings.smtp_idle_seconds
        stale = [session for session, used in self._idle if used <= cutoff]
        self._idle = [(session, used) for session, used in self._idle if used > cutoff]
        for session in stale:
            task = asyncio.ensure_future(session.quit())
            self._quitting.add(task)
            task.add_done_callback(self._quitting.discard)
        if self._idle:
            self._arm_reaper()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        sessions, self._idle = [session for session, _ in self._idle], []
        for session in sessions:
            await session.quit()
        if self._quitting:
            await asyncio.gather(*self._quitting, return_exceptions=True)


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
            session = await self.session(recipient)
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
                if exc.code in RELAY_CODES or session.closed:
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

    async def session(self, recipient: str | None = None) -> _Session:
        """The lane's connection, opened if it has none; a failure here is the relay's."""
        session = self.client
        if session is None or session.closed:
            self.client = None
            try:
                session = await self.transport._open()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                self.transport._proven = False  # until a connection works again, one at a time
                mapped = _map_connect_error(exc)
                mapped.recipient = recipient
                raise mapped from exc
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


def build_transport(settings: Settings) -> Transport:
    """SMTP when MAILER_SMTP_HOST is set, else the Maildir outbox."""
    if settings.smtp_host:
        return SmtpTransport(settings)
    return MaildirTransport(settings.effective_outbox_dir)
