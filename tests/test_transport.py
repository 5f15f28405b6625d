"""The SMTP transaction mailer runs itself (not aiosmtplib's sendmail), against a real aiosmtpd."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtplib.protocol import normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from mailer.delivery.smtp import SmtpTransport, wire_payload
from mailer.errors import (
    DeliveryError,
    PermanentDeliveryError,
    RelayFault,
    TimeoutDeliveryError,
    TransientDeliveryError,
    UncertainDeliveryError,
)


def unstuff(payload: bytes) -> bytes:
    """What an RFC 5321 server makes of a DATA payload (section 4.5.2)."""
    assert payload.endswith(b"\r\n.\r\n")
    lines = payload[: -len(b".\r\n")].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


# Bytes rich in what matters here: dots, CR, LF, and both at line starts.
pieces = st.sampled_from([b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.\r\n"])
wire_bytes = st.lists(pieces, max_size=40).map(b"".join)


@given(wire_bytes)
def test_wire_payload_is_read_back_as_aiosmtplib_would_have_sent_it(message: bytes) -> None:
    """Our dot-stuffed DATA payload cannot end early and unstuffs to what aiosmtplib would have sent."""
    payload = wire_payload(message)
    body = payload[: -len(b".\r\n")]
    assert b"\r\n.\r\n" not in b"\r\n" + body  # the terminator cannot occur early
    assert unstuff(payload) == normalize_message_line_endings(message)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_dots_and_bare_line_feeds_arrive_intact(
    smtp_server: Any, make_settings: Any, pipelining: bool
) -> None:
    """Leading dots arrive as written and bare LFs as CRLF, with and without PIPELINING."""
    smtp_server.handler.pipelining = pipelining
    transport = SmtpTransport(make_settings(smtp_host=smtp_server.host, smtp_port=smtp_server.port))
    message = b"Subject: dots\r\n\r\n.first\r\n..second\r\n.\r\nbare\nend"
    try:
        accepted = await transport.send(sender="a@example.org", recipient="b@example.org", data=message)
    finally:
        await transport.close()
    assert accepted.code == 250
    assert "queued" in accepted.detail
    (received,) = smtp_server.handler.received
    assert received.data == b"Subject: dots\r\n\r\n.first\r\n..second\r\n.\r\nbare\r\nend\r\n"
    assert received.mail_from == "a@example.org"
    assert received.rcpt_tos == ["b@example.org"]


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(
    ("reply", "error"),
    [("550 5.1.1 no such user", PermanentDeliveryError), ("451 4.7.1 try later", TransientDeliveryError)],
)
async def test_a_refusal_leaves_the_connection_ready_for_the_next_message(
    smtp_server: Any, make_settings: Any, reply: str, error: type[Exception], pipelining: bool
) -> None:
    """After a refused DATA the envelope is reset and the same kept-open connection sends on."""
    smtp_server.handler.pipelining = pipelining
    smtp_server.handler.fault = lambda rcpt, n: reply if rcpt == "refused@example.org" else None
    transport = SmtpTransport(
        make_settings(smtp_host=smtp_server.host, smtp_port=smtp_server.port, smtp_max_connections=1)
    )
    try:
        async with transport.lane() as lane:
            with pytest.raises(error) as refused:
                await lane.send(sender="a@example.org", recipient="refused@example.org", data=b"x\r\n")
            first_client = lane.client  # type: ignore[attr-defined]
            await lane.send(sender="a@example.org", recipient="fine@example.org", data=b"y\r\n")
            assert lane.client is first_client  # type: ignore[attr-defined]
    finally:
        await transport.close()
    assert refused.value.code == int(reply[:3])  # type: ignore[attr-defined]
    assert [r.rcpt_tos for r in smtp_server.handler.received] == [["fine@example.org"]]


class ScriptedServer:
    """A raw SMTP server that offers PIPELINING and answers in awkward but valid ways (or, on
    request, misbehaves): all pipelined replies in one write, or split into 3-byte pieces;
    multi-line replies. Records the commands and messages it got."""

    def __init__(
        self,
        *,
        refuse_rcpt: str = "",
        split: bool = False,
        mail_reply: bytes = b"",  # e.g. 421 then hang up
        extra_after_final: bytes = b"",
        stall: str = "",  # "data": never answer the pipelined commands; "final": not the message
        hang_up_after: int = 0,  # per connection: 421 to the MAIL after this many messages, then close
    ) -> None:
        self.hang_up_after = hang_up_after
        self.refuse_rcpt = refuse_rcpt
        self.split = split
        self.mail_reply = mail_reply
        self.extra_after_final = extra_after_final
        self.stall = stall
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        self.connections = 0

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        pieces = [data[i : i + 3] for i in range(0, len(data), 3)] if self.split else [data]
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            if self.split:
                await asyncio.sleep(0.001)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self._send(writer, b"220-scripted\r\n220 ready\r\n")
        pending: list[bytes] = []
        taken = 0
        while line := await reader.readline():
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                await self._send(writer, b"250-scripted\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 OK\r\n")
            elif verb == b"MAIL":
                if self.hang_up_after and taken >= self.hang_up_after:
                    await self._send(writer, b"421 4.4.2 scripted idle timeout, closing\r\n")
                    break
                if self.mail_reply:
                    await self._send(writer, self.mail_reply)
                    break
                pending.append(b"250 2.1.0 sender ok\r\n")
            elif verb == b"RCPT":
                refused = self.refuse_rcpt and self.refuse_rcpt.encode() in line
                pending.append(b"550 5.1.1 no such user\r\n" if refused else b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                if self.stall == "data":
                    await asyncio.sleep(5)
                    break
                if any(p.startswith(b"550") for p in pending):
                    await self._send(writer, b"".join([*pending, b"503 5.5.1 no valid recipients\r\n"]))
                    pending = []
                    continue
                await self._send(writer, b"".join([*pending, b"354 go ahead\r\n"]))
                pending = []
                self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                taken += 1
                if self.stall == "final":
                    await asyncio.sleep(5)
                    break
                await self._send(writer, b"250-2.0.0 queued\r\n250 as 4711\r\n" + self.extra_after_final)
            elif verb == b"RSET":
                await self._send(writer, b"250 flushed\r\n")
            elif verb == b"QUIT":
                await self._send(writer, b"221 bye\r\n")
                break
        writer.close()


@contextlib.asynccontextmanager
async def scripted_lane(make_settings: Any, server: ScriptedServer, **settings: Any) -> AsyncIterator[Any]:
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    transport = SmtpTransport(
        make_settings(smtp_host="127.0.0.1", smtp_port=port, smtp_max_connections=1, **settings)
    )
    try:
        async with transport.lane() as lane:
            yield lane
    finally:
        await transport.close()
        listening.close()


async def send(lane: Any, recipient: str, data: bytes = b"body\r\n") -> Any:
    return await lane.send(sender="a@example.org", recipient=recipient, data=data)


@pytest.mark.parametrize("split", [False, True])
async def test_pipelined_multi_line_and_split_replies_are_read_in_order(
    make_settings: Any, split: bool
) -> None:
    """Replies pair with their commands, however they are split or continued; a refused RCPT fails
    that message with the RCPT's code, and the connection is reset and kept for the next."""
    scripted = ScriptedServer(refuse_rcpt="nobody@", split=split)
    async with scripted_lane(make_settings, scripted) as lane:
        accepted = await send(lane, "b@example.org", b"one\r\n")
        with pytest.raises(PermanentDeliveryError) as refused:
            await send(lane, "nobody@example.org", b"two\r\n")
        again = await send(lane, "c@example.org", b"three\r\n")
    assert (accepted.code, accepted.detail) == (250, "2.0.0 queued\nas 4711")
    assert again.code == 250
    assert refused.value.code == 550  # the RCPT's refusal, not DATA's 503 after it
    assert scripted.messages == [b"one\r\n.\r\n", b"three\r\n.\r\n"]
    mail_commands = [c for c in scripted.commands if c.startswith(b"MAIL")]
    assert mail_commands[0] == b"MAIL FROM:<a@example.org> SIZE=5\r\n"
    assert b"RSET\r\n" in scripted.commands
    assert scripted.connections == 1


async def test_a_421_to_a_pipelined_mail_keeps_its_code_for_the_relay_back_off(make_settings: Any) -> None:
    """The server refuses MAIL with 421 and hangs up before answering RCPT and DATA."""
    scripted = ScriptedServer(mail_reply=b"421 4.7.0 too many connections, slow down\r\n")
    async with scripted_lane(make_settings, scripted) as lane:
        with pytest.raises(TransientDeliveryError) as refused:
            await send(lane, "b@example.org")
    assert refused.value.code == 421  # type: ignore[attr-defined]
    assert refused.value.enhanced_code == "4.7.0"  # type: ignore[attr-defined]


async def test_a_421_on_a_kept_connection_is_tried_once_more_on_a_fresh_one(make_settings: Any) -> None:
    """A relay that timed out a kept-open connection answers the next MAIL with 421 and hangs up
    (Postfix's idle timeout racing our write): that says nothing about the relay, so the message
    goes out on a new connection instead of tripping the relay circuit for every worker."""
    scripted = ScriptedServer(hang_up_after=1)
    async with scripted_lane(make_settings, scripted) as lane:
        first = await send(lane, "a@example.org", b"one\r\n")
        second = await send(lane, "b@example.org", b"two\r\n")
    assert (first.code, second.code) == (250, 250)
    assert scripted.messages == [b"one\r\n.\r\n", b"two\r\n.\r\n"]
    assert scripted.connections == 2


async def test_a_421_on_the_fresh_connection_too_is_the_relays(make_settings: Any) -> None:
    """If the new connection is refused the same way, the 421 stands: a RelayFault (circuit)."""
    scripted = ScriptedServer(hang_up_after=1, mail_reply=b"")
    async with scripted_lane(make_settings, scripted) as lane:
        await send(lane, "a@example.org")
        scripted.mail_reply = b"421 4.3.2 going down\r\n"
        with pytest.raises(RelayFault) as refused:
            await send(lane, "b@example.org")
    assert refused.value.code == 421
    assert scripted.connections == 2  # one retry, not a loop


async def test_a_stray_reply_costs_a_reconnect_not_the_next_message(make_settings: Any) -> None:
    """A reply nobody asked for, found while the connection is idle: a new connection, and the
    next message still goes out."""
    scripted = ScriptedServer(extra_after_final=b"250 said twice\r\n")
    async with scripted_lane(make_settings, scripted) as lane:
        # The stray reply comes in the same write as the final one, so it is in the client's
        # buffer when send() returns: it waits there while the connection is idle.
        await send(lane, "b@example.org", b"one\r\n")
        second = await send(lane, "c@example.org", b"two\r\n")
    assert second.code == 250
    assert scripted.messages == [b"one\r\n.\r\n", b"two\r\n.\r\n"]
    assert scripted.connections == 2


@pytest.mark.parametrize(
    ("stall", "error"), [("data", TimeoutDeliveryError), ("final", UncertainDeliveryError)]
)
async def test_a_silent_server_times_out_as_uncertain_only_once_the_message_was_sent(
    make_settings: Any, stall: str, error: type[Exception]
) -> None:
    """A server that goes silent times out; the outcome is uncertain only if the message body was
    already sent; silence at DATA, before the body, is a plain timeout."""
    scripted = ScriptedServer(stall=stall)
    async with scripted_lane(make_settings, scripted, smtp_timeout=0.3) as lane:
        with pytest.raises(DeliveryError) as failed:
            await send(lane, "b@example.org")
    assert type(failed.value) is error
    assert "timed out" in str(failed.value)
