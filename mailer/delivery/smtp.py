"""SMTP delivery: a small pool of kept-open connections to the relay, and what its replies mean.

This is the only module that imports aiosmtplib (which opens, secures and greets each
connection); its errors, and the session's, are mapped to mailer's here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator

import aiosmtplib
from aiosmtplib.protocol import normalize_message_line_endings

from mailer.content.compose import WireMessage
from mailer.delivery.retry import enhanced_code, is_transient
from mailer.delivery.smtp_session import OutOfStep, Refused, Session
from mailer.delivery.transport import Accepted, Lane
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
    mapped = _login_or_tls_fault(exc) or _greeting_fault(exc)
    if mapped is not None:
        return mapped
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


def _login_or_tls_fault(exc: BaseException) -> RelayFault | None:
    """A refused login or a failed TLS handshake: the credentials or the security setting."""
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
    return None


def _greeting_fault(exc: BaseException) -> RelayFault | None:
    """A reply refusing the connection or the EHLO (or one that is not SMTP at all)."""
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
    return None


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
    one mechanism, and the mail transactions then run on `Session`, which pipelines MAIL,
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
        self._idle: list[tuple[Session, float]] = []  # most recently used last
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

    async def _open(self) -> Session:
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

    async def _connect(self) -> Session:
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
            return _take_over(client, timeout=s.smtp_timeout)
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

    def __init__(self, transport: SmtpTransport, client: Session | None) -> None:
        self.transport = transport
        self.client = client

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted:
        try:
            envelope = (_address(sender), _address(recipient))
        except ValueError as exc:
            raise PermanentDeliveryError(str(exc), recipient=recipient) from None
        payload = wire_payload(data)
        for attempt in (1, 2):
            kept = self.client is not None and not self.client.closed
            session = await self.session(recipient)
            try:
                reply = await session.transact(*envelope, payload)
            except OutOfStep as exc:
                # Replies no longer pair with commands (a stray reply, often an idle-timeout
                # 421): a new connection, and once more if nothing of this message was sent.
                self._drop()
                if attempt == 1 and not session.data_sent:
                    logger.info("SMTP connection out of step (%s); reconnecting", exc)
                    continue
                cls = UncertainDeliveryError if session.data_sent else TransientDeliveryError
                raise cls(f"SMTP replies out of step: {exc}", recipient=recipient) from exc
            except Refused as exc:
                # A clean reply: the connection stays usable unless the server closed it (421).
                if exc.code in RELAY_CODES or session.closed:
                    self._drop()
                if exc.code in RELAY_CODES and kept and attempt == 1 and not session.data_sent:
                    # A kept connection the relay timed out as idle gets 421 and a hang-up for
                    # the next MAIL: about that connection, not the relay. Once more on a new one.
                    logger.info("SMTP %s on a kept connection; trying a new one", exc)
                    continue
                raise _classified(exc.code, exc.text, recipient) from exc
            except BaseException as exc:
                # Timeouts, drops and cancellation leave the connection out of step: never reuse it.
                self._drop()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise _map_smtp_error(exc, recipient=recipient, data_sent=session.data_sent) from exc
            return Accepted(code=reply.code, detail=reply.text)
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def session(self, recipient: str | None = None) -> Session:
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


def _take_over(client: aiosmtplib.SMTP, *, timeout: float) -> Session:
    """Move a connection aiosmtplib opened and greeted onto mailer's pipelining protocol."""
    protocol = client.protocol
    transport = protocol.transport if protocol is not None else None
    # aiosmtplib types it as a BaseTransport; TCP and TLS transports are full Transports.
    if not isinstance(transport, asyncio.Transport) or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("connection lost after EHLO")
    session = Session(
        transport,
        pipelining=client.supports_extension("pipelining"),
        size=client.supports_extension("size"),
        timeout=timeout,
    )
    transport.set_protocol(session)
    return session


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
