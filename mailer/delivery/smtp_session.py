"""One SMTP connection's mail transactions, pipelined: MAIL, RCPT and DATA in one write.

aiosmtplib opens the connection (TLS, EHLO, AUTH) in mailer.delivery.smtp and hands its
socket over; from then on this protocol speaks SMTP itself, because aiosmtplib's sendmail
costs four round trips and a third of the worker's time a mail (profiled). Nothing here
imports aiosmtplib: what goes wrong is OutOfStep, Refused or SessionLost, which smtp.py maps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass


class SessionLost(ConnectionError):
    """The connection is gone or unusable (closed, a malformed or oversized reply).

    A ConnectionError, as aiosmtplib's SMTPServerDisconnected is: mapped the same way.
    """


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text[:80]}"


class OutOfStep(Exception):
    """Commands and replies no longer pair up; the connection must be replaced."""


class Refused(Exception):
    """The server refused a command of the transaction (4xx/5xx). Never leaves the SMTP
    modules: the lane in mailer.delivery.smtp turns it into a DeliveryError."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.text}")
        self.code = reply.code
        self.text = reply.text


class Session(asyncio.Protocol):
    """Mail transactions on a connection aiosmtplib opened and handed over (mailer.delivery.smtp).

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
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._wanted = 0
        self._lost: Exception | None = None
        # Once the payload is written, a lost reply means the server may have the message.
        self.data_sent = False

    @property
    def closed(self) -> bool:
        return self._lost is not None or self._transport.is_closing()

    async def transact(self, sender: bytes, recipient: bytes, payload: bytes) -> Reply:
        """Send one message to one recipient; its final reply, or Refused / OutOfStep."""
        self.data_sent = False
        if self._replies:
            self._raise_if_refused_and_lost()
            raise OutOfStep(f"unsolicited reply {self._replies[0]}" if self._replies else "connection closed")
        mail = b"MAIL FROM:<" + sender + b">"
        if self._size:
            mail += b" SIZE=%d" % (len(payload) - 3)  # RFC 1870: without the final ".CRLF"
        rcpt = b"RCPT TO:<" + recipient + b">\r\n"
        rcpt_reply: Reply | None
        data_reply: Reply | None
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
            raise Refused(refusal)
        if data_reply is None or data_reply.code != 354:
            raise OutOfStep(f"replies {mail_reply}, {rcpt_reply}, {data_reply} to MAIL, RCPT, DATA")
        if self.closed:
            raise SessionLost("connection lost before the message was sent")
        self.data_sent = True
        (final,) = await self._command(payload)
        if 200 <= final.code < 300:
            return final
        if final.code >= 400:
            await self._reset()
            raise Refused(final)
        raise OutOfStep(f"reply {final} to the end of the message")

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            if not self.closed:
                self._timeout = min(self._timeout, 2.0)
                await self._command(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        self._transport.close()

    # --- reading replies ----------------------------------------------------------------

    async def _command(self, line: bytes) -> list[Reply]:
        self._transport.write(line)
        return await self._read(1)

    async def _reset(self) -> None:
        """After a refusal, clear the envelope for the next message (as sendmail does)."""
        try:
            await self._command(b"RSET\r\n")
        except Exception:
            self.close()  # out of step: the next send opens a new connection

    async def _read(self, n: int) -> list[Reply]:
        if len(self._replies) < n:
            self._raise_if_refused_and_lost()
            self._wanted = n
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(self._timeout, _expire, waiter, self._timeout)
            try:
                await waiter
            except SessionLost:
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
            raise Refused(refusal)
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
                self._fail(SessionLost(f"malformed reply line {line[:80]!r}"))
                return
            self._lines.append(line[4:].strip())
            if len(self._lines) > 200:
                self._fail(SessionLost("reply of over 200 lines"))
                return
            if line[3:4] != b"-":
                text = b"\n".join(self._lines).decode("utf-8", "replace")
                self._replies.append(Reply(int(line[:3]), text))
                self._lines = []
        del buffer[:start]
        if len(buffer) > 65536:
            self._fail(SessionLost("reply line too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = SessionLost(f"connection lost: {exc or 'closed by the server'}")
        self._wake(self._lost)

    def _fail(self, error: Exception) -> None:
        self._lost = error
        self._transport.close()
        self._wake(error)


def _expire(waiter: asyncio.Future[None], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no reply within {timeout:g} s"))
