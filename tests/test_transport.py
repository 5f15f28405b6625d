"""The SMTP transaction mailer runs itself (not aiosmtplib's sendmail), against a real aiosmtpd."""

from __future__ import annotations

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


async def test_dots_and_bare_line_feeds_arrive_intact(smtp_server: Any, make_settings: Any) -> None:
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


@pytest.mark.parametrize(
    ("reply", "error"),
    [("550 5.1.1 no such user", PermanentDeliveryError), ("451 4.7.1 try later", TransientDeliveryError)],
)
async def test_a_refusal_leaves_the_connection_ready_for_the_next_message(
    smtp_server: Any, make_settings: Any, reply: str, error: type[Exception]
) -> None:
    """After a refused DATA the envelope is reset and the same kept-open connection sends on."""
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
