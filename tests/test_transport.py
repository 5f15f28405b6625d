"""The SMTP transaction mailer runs itself (not aiosmtplib's sendmail), against a real aiosmtpd."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiosmtplib.protocol import normalize_message_line_endings
from hypothesis import given
from hypothesis import strategies as st

from mailer.errors import PermanentDeliveryError, TransientDeliveryError
from mailer.transport import SmtpTransport, wire_payload


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
    payload = wire_payload(message)
    body = payload[: -len(b".\r\n")]
    assert b"\r\n.\r\n" not in b"\r\n" + body  # the terminator cannot occur early
    assert unstuff(payload) == normalize_message_line_endings(message)


@pytest.mark.parametrize("pipelining", [True, False])
async def test_dots_and_bare_line_feeds_arrive_intact(
    smtp_server: Any, make_settings: Any, pipelining: bool
) -> None:
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
    """A raw SMTP server that answers in awkward but valid ways: replies split across
    packets, multi-line replies, all pipelined replies in one packet. Records what it got."""

    def __init__(self, refuse_rcpt: str = "") -> None:
        self.refuse_rcpt = refuse_rcpt
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220-scripted\r\n")
        await writer.drain()
        writer.write(b"220 ready\r\n")
        pending: list[bytes] = []
        while line := await reader.readline():
            self.commands.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                for piece in (b"250-scripted\r\n250-PIPE", b"LINING\r\n250-SIZE 100000\r\n", b"250 OK\r\n"):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                continue
            if verb == b"MAIL":
                pending.append(b"250 2.1.0 sender ok\r\n")
            elif verb == b"RCPT":
                refused = self.refuse_rcpt and self.refuse_rcpt.encode() in line
                pending.append(b"550 5.1.1 no such user\r\n" if refused else b"250 2.1.5 ok\r\n")
            elif verb == b"DATA":
                if any(p.startswith(b"550") for p in pending):
                    pending.append(b"503 5.5.1 no valid recipients\r\n")
                else:
                    pending.append(b"354 go ahead\r\n")
                    writer.write(b"".join(pending))  # three replies, one packet
                    pending = []
                    body = await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append(body)
                    writer.write(b"250-2.0.0 queued\r\n250 as 4711\r\n")
                    continue
            elif verb == b"RSET":
                pending.append(b"250 flushed\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            if verb in (b"DATA", b"RSET") or not line.startswith((b"MAIL", b"RCPT")):
                writer.write(b"".join(pending))
                pending = []
        writer.close()


async def test_pipelined_multi_line_and_split_replies_are_read_in_order(make_settings: Any) -> None:
    scripted = ScriptedServer(refuse_rcpt="nobody@")
    server = await asyncio.start_server(scripted.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = SmtpTransport(make_settings(smtp_host="127.0.0.1", smtp_port=port, smtp_max_connections=1))
    try:
        async with transport.lane() as lane:
            accepted = await lane.send(sender="a@example.org", recipient="b@example.org", data=b"one\r\n")
            with pytest.raises(PermanentDeliveryError) as refused:
                await lane.send(sender="a@example.org", recipient="nobody@example.org", data=b"two\r\n")
            again = await lane.send(sender="a@example.org", recipient="c@example.org", data=b"three\r\n")
    finally:
        await transport.close()
        server.close()
    assert (accepted.code, accepted.detail) == (250, "2.0.0 queued\nas 4711")
    assert again.code == 250
    assert refused.value.code == 550  # the RCPT's refusal, not DATA's 503 after it
    assert scripted.messages == [b"one\r\n.\r\n", b"three\r\n.\r\n"]
    mail_commands = [c for c in scripted.commands if c.startswith(b"MAIL")]
    assert mail_commands[0] == b"MAIL FROM:<a@example.org> SIZE=5\r\n"
    assert b"RSET\r\n" in scripted.commands
