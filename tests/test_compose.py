"""compose(): the hand-written MIME bytes read back exactly as given, and agree with the stdlib's."""

from __future__ import annotations

import email.policy
import os
import re
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailer.content.compose import Address, Attachment, MailParts, WireMessage, compose, compose_reference
from mailer.delivery.smtp import wire_payload
from mailer.errors import ComposeError

BERLIN = ZoneInfo("Europe/Berlin")
GOLDEN = Path(__file__).parent / "golden" / "confirmation_de.eml"
PARSER = BytesParser(policy=email.policy.default)
ADJACENT_ENCODED_WORDS = re.compile(r"\?=[ \t]+=\?")

# --- what the parsed mail is compared with ----------------------------------------------


def parse(raw: bytes) -> EmailMessage:
    message = PARSER.parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def assert_wire_form(raw: bytes) -> None:
    """SMTP wire form: CRLF only, no line over 998 octets; from compose(), no line starting with "."."""
    assert raw.endswith(b"\r\n")
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", raw) is None
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    if isinstance(raw, WireMessage):  # the transport sends these without dot-stuffing
        assert not raw.startswith(b".")
        assert b"\n." not in raw
        assert wire_payload(raw) == wire_payload(bytes(raw))  # the shortcut changes nothing


def expected_name(name: str) -> str:
    """Display names are phrases: any run of white space reads as one space."""
    return " ".join(name.split())


def raw_header(raw: bytes, name: str) -> str:
    found = re.search(rb"^" + name.encode() + rb":(.*?)\r\n(?![ \t])", raw, re.MULTILINE | re.DOTALL)
    assert found is not None, name
    return re.sub(r"\r\n(?=[ \t])", "", found.group(1).decode("ascii")).strip()


def display_name(raw: bytes, message: EmailMessage, header: str) -> tuple[str, str]:
    """(display name, addr-spec) as a mail client shows them.

    Python's phrase parser keeps the space between two adjacent encoded-words, which RFC 2047
    §6.2 says to drop (and Thunderbird, Gmail, Outlook drop). Only a run of more than 45 bytes
    needs two, and then the RFC reading, via `email.header.decode_header`, is the one that counts.
    """
    (address,) = message[header].addresses
    value = raw_header(raw, header)
    if not ADJACENT_ENCODED_WORDS.search(value):
        return address.display_name, address.addr_spec
    phrase = value.rsplit(" <", 1)[0].strip()
    decoded = "".join(
        chunk.decode(charset or "ascii") if isinstance(chunk, bytes) else chunk
        for chunk, charset in decode_header(phrase)
    )
    return decoded, address.addr_spec


def body(message: EmailMessage, subtype: str) -> str:
    part = message.get_body(preferencelist=(subtype,))
    assert part is not None
    assert part.get_content_type() == f"text/{subtype}"
    return normalise_lines(part.get_content())


def normalise_lines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").removesuffix("\n")


def attachments(message: EmailMessage) -> list[tuple[bytes, str | None, str, list[tuple[str, str]]]]:
    found = []
    for part in message.iter_attachments():
        assert isinstance(part, EmailMessage)
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        found.append((payload, part.get_filename(), part.get_content_type(), (part.get_params() or [])[1:]))
    return found


def squash(text: str) -> str:
    return "".join(text.split())


# --- strategies ---------------------------------------------------------------------------

# Header text: any Unicode except surrogates and control characters (those are refused, see
# the injection tests), tab included.
HEADER_CHARS = st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp"), include_characters="\t")
NAME_WORDS = [
    "Maria",
    "Müller,",
    '"quoted"',
    "\\",
    "😀",
    "  ",
    "Dr.",
    "Александр",
    "(Orga)",
    "a@b",
    "<x>",
    "ü" * 40,
]
REAL_NAMES = [
    "Maria Müller",
    "Müller, Maria",
    "Stadt Kaiserslautern",
    'Alexander "Alex" Pongrácz',
    "",
    "李小龙",
]
short_names = st.one_of(st.sampled_from(REAL_NAMES), st.text(HEADER_CHARS, max_size=60))
any_names = st.one_of(
    short_names,
    st.text(HEADER_CHARS, min_size=61, max_size=400),
    st.lists(st.sampled_from(NAME_WORDS), max_size=12).map(" ".join),
)
subjects = st.one_of(
    st.just("Anmeldebestätigung: Digitaler Dialog zu Weltoffenheit am 10. Dezember 2026"),
    st.text(HEADER_CHARS, max_size=300),
    st.text(HEADER_CHARS, min_size=300, max_size=1500),
)
body_lines = st.one_of(
    st.text(max_size=200),  # every code point but surrogates: controls, NUL, U+2028 ...
    st.sampled_from(
        [".", ".dot", "From here", "x" * 300, "trailing   ", "tab\t", "", "ä" * 100, "--=_a", "=", "a=b"]
    ),
)
bodies = st.builds(
    lambda lines, end: end.join(lines), st.lists(body_lines, max_size=30), st.sampled_from(["\n", "\r\n"])
)
attachments_or_none = st.none() | st.builds(
    Attachment,
    filename=st.one_of(
        st.sampled_from(
            ["veranstaltung.ics", "event.ics", "Veranstaltung März.ics", 'a "b" \\.ics', "x" * 120 + "ü.ics"]
        ),
        st.text(HEADER_CHARS.filter(lambda c: c != "\t"), min_size=1, max_size=80)
        .map(str.strip)
        .filter(bool),
    ),
    content_type=st.sampled_from(
        ['text/calendar; method=PUBLISH; charset="utf-8"', "text/calendar; method=CANCEL", "application/pdf"]
    ),
    data=st.binary(max_size=4000),
)
extra_headers = st.sampled_from(
    [
        (),
        (("X-Mailer-Kind", "confirmation"),),
        (("X-Mailer-Kind", "reminder"), ("X-Event-Title", "Digitaler Dialog – Weltoffenheit")),
    ]
)
dates = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from(
        [UTC, BERLIN, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=3))]
    ),
    allow_imaginary=False,  # "now" is never a wall time skipped by a DST switch
)


def mail_parts(
    names: st.SearchStrategy[str], subject: st.SearchStrategy[str]
) -> st.SearchStrategy[MailParts]:
    def address(name: st.SearchStrategy[str]) -> st.SearchStrategy[Address]:
        return st.builds(Address, name=name, email=st.emails())

    return st.builds(
        MailParts,
        message_id=st.from_regex(
            r"\Areg-[0-9]{1,6}\.(confirmation|reminder)\.[0-9a-f]{4}@mailer\.example\.org\Z"
        ),
        sender=address(names),
        recipient=address(names),
        reply_to=st.none() | address(names),
        subject=subject,
        text=bodies,
        html=bodies,
        attachment=attachments_or_none,
        date=dates,
        language=st.sampled_from(["de", "en", "de-DE", "en-GB"]),
        extra_headers=extra_headers,
    )


def parts_with(**changes: Any) -> MailParts:
    """A small valid mail with some fields replaced."""
    fields: dict[str, Any] = {
        "message_id": "reg-1.confirmation.0000@mailer.example.org",
        "sender": Address("Stadt Kaiserslautern", "noreply@kaiserslautern.example"),
        "recipient": Address("Maria Müller", "maria.mueller@example.org"),
        "reply_to": None,
        "subject": "Anmeldebestätigung",
        "text": "Hallo",
        "html": "<p>Hallo</p>",
        "attachment": None,
        "date": datetime(2026, 12, 1, 9, 0, tzinfo=BERLIN),
        "language": "de",
    }
    fields.update(changes)
    return MailParts(**fields)


# --- properties ---------------------------------------------------------------------------

HYPOTHESIS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPOTHESIS
@given(mail_parts(any_names, subjects))
@example(parts_with(recipient=Address("x" * 1200, "a@example.org")))
@example(parts_with(recipient=Address('"x" ' + "a" * 80, "a@example.org")))
@example(parts_with(recipient=Address("=?utf-8?q?abc?=", "a@example.org"), subject="=?utf-8?q?abc?="))
@example(parts_with(recipient=Address("Александр Сергеевич Пушкин " * 4, "a@example.org")))
@example(parts_with(subject="  leading and trailing  ", text="x" * 75 + ".\n.\nFrom me\n"))
def test_compose_reads_back_exactly_what_it_was_given(parts: MailParts) -> None:
    """Every field of any mail parses back unchanged (display names whitespace-normalised).

    The examples are inputs the stdlib reference gets wrong: a 1 201-octet line, a quoted-string
    left unquoted, literal "=?...?=" text decoded, spaces inserted into long names, leading
    subject whitespace dropped.
    """
    raw = compose(parts)
    assert isinstance(raw, WireMessage)
    assert_wire_form(raw)
    message = parse(raw)
    assert all(not part.defects for part in message.walk())
    for header, address in (("From", parts.sender), ("To", parts.recipient), ("Reply-To", parts.reply_to)):
        if address is None:
            assert header not in message
        else:
            assert display_name(raw, message, header) == (expected_name(address.name), address.email)
    assert str(message["Subject"]) == parts.subject
    assert str(message["Message-ID"]) == f"<{parts.message_id}>"
    # Timestamps, not datetimes: an aware datetime in a DST fold never equals one in another zone.
    assert message["Date"].datetime.timestamp() == parts.date.replace(microsecond=0).timestamp()
    assert str(message["Date"]) == format_datetime(parts.date)
    assert str(message["Content-Language"]) == parts.language
    assert str(message["Auto-Submitted"]) == "auto-generated"
    assert str(message["X-Auto-Response-Suppress"]) == "All"
    for name, value in parts.extra_headers:
        assert str(message[name]) == value
    assert body(message, "plain") == normalise_lines(parts.text)
    assert body(message, "html") == normalise_lines(parts.html)
    if parts.attachment is None:
        assert message.get_content_type() == "multipart/alternative"
        assert attachments(message) == []
    else:
        assert message.get_content_type() == "multipart/mixed"
        ((data, filename, content_type, _),) = attachments(message)
        assert (data, filename) == (parts.attachment.data, parts.attachment.filename)
        assert content_type == parts.attachment.content_type.split(";")[0]


@HYPOTHESIS
@given(
    mail_parts(
        short_names.filter(lambda name: "=?" not in name),
        subjects.filter(lambda subject: "=?" not in subject and not subject[:1].isspace()),
    )
)
def test_compose_agrees_with_the_stdlib_reference(parts: MailParts) -> None:
    """compose() and compose_reference() parse back to the same mail.

    Held to what the stdlib gets right (the test above holds compose() to the exact input):
    display names of up to 60 characters, no literal "=?", no leading subject whitespace; names
    and subjects compared without whitespace, which the stdlib's folder drops or keeps
    unnormalised and its phrase parser inserts. Everything else compares exactly.
    """
    fast_raw, reference_raw = compose(parts), compose_reference(parts)
    assert_wire_form(fast_raw)
    assert_wire_form(reference_raw)
    fast, reference = parse(fast_raw), parse(reference_raw)
    for header in ("From", "To", "Reply-To"):
        if parts.reply_to is None and header == "Reply-To":
            assert header not in fast
            assert header not in reference
            continue
        fast_name, fast_addr = display_name(fast_raw, fast, header)
        reference_name, reference_addr = display_name(reference_raw, reference, header)
        assert (squash(fast_name), fast_addr) == (squash(reference_name), reference_addr)
    assert squash(str(fast["Subject"])) == squash(str(reference["Subject"]))
    for header in ("Message-ID", "Date", "Content-Language", "Auto-Submitted", "MIME-Version"):
        assert str(fast[header]) == str(reference[header]), header
    for name, _ in parts.extra_headers:
        assert str(fast[name]) == str(reference[name])
    assert body(fast, "plain") == body(reference, "plain")
    assert body(fast, "html") == body(reference, "html")
    assert attachments(fast) == attachments(reference)


# --- header injection and other refusals --------------------------------------------------


@pytest.mark.parametrize("bad", ["\r\n", "\n", "\r", "\x00", "\x85", "\u2028"])
@pytest.mark.parametrize(
    ("header", "changes"),
    [
        (
            "From",
            lambda bad: {"sender": Address("Stadt" + bad + "Bcc: x@evil.example", "noreply@example.org")},
        ),
        ("To", lambda bad: {"recipient": Address("Maria" + bad, "maria@example.org")}),
        ("Reply-To", lambda bad: {"reply_to": Address("Orga" + bad, "orga@example.org")}),
        ("Subject", lambda bad: {"subject": "Hallo" + bad + "Bcc: x@evil.example"}),
        ("Message-ID", lambda bad: {"message_id": "reg-1" + bad + "@example.org"}),
        ("X-Mailer-Kind", lambda bad: {"extra_headers": (("X-Mailer-Kind", "confirmation" + bad),)}),
        ("extra header name", lambda bad: {"extra_headers": (("X-Kind" + bad + "Bcc", "x"),)}),
        (
            "Content-Disposition",
            lambda bad: {"attachment": Attachment("a" + bad + ".ics", "text/calendar", b"")},
        ),
    ],
)
def test_control_characters_in_any_header_are_refused_naming_it(header: str, changes: Any, bad: str) -> None:
    """CR, LF or any other control character in a header value raises ComposeError naming the header."""
    parts = parts_with(**changes(bad))
    for build in (compose, compose_reference):
        with pytest.raises(ComposeError, match=re.escape(header)):
            build(parts)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"date": datetime(2026, 12, 1, 9, 0)}, "timezone-aware"),
        ({"recipient": Address("Maria", "maria@müller.example")}, "To: not a plain ASCII addr-spec"),
        ({"recipient": Address("Maria", "maria@example.org> <x@evil.example")}, "To"),
        ({"message_id": "<reg-1@example.org>"}, "Message-ID"),
        ({"language": "de; x"}, "Content-Language"),
        ({"extra_headers": (("Bcc", "x@evil.example"),)}, "Bcc"),
        ({"extra_headers": (("X Kind", "x"),)}, "not a valid field name"),
        ({"attachment": Attachment("a.ics", "text/calendar\r\nBcc: x", b"")}, "Content-Type"),
        ({"text": "lone surrogate \ud800"}, "not valid Unicode"),
    ],
)
def test_values_that_cannot_go_into_a_mail_are_refused(changes: dict[str, Any], message: str) -> None:
    """Naive dates, non-ASCII or malformed addresses, reserved extra headers: ComposeError."""
    for build in (compose, compose_reference):
        with pytest.raises(ComposeError, match=re.escape(message)):
            build(parts_with(**changes))


# --- the bytes themselves -----------------------------------------------------------------


def test_risky_line_starts_are_quoted_printable_encoded() -> None:
    """No body line starts with "." or "From ", even after a soft break; QP lines stay <= 76."""
    text = "Hallo\n.\n.hidden\nFrom the organiser\n" + "y" * 75 + ".\n" + "z" * 75 + "From x\n"
    raw = compose(parts_with(text=text, html=text))
    bodies = raw.split(b"quoted-printable\r\n\r\n")[1:]
    for encoded in bodies:
        lines = encoded.split(b"\r\n--")[0].split(b"\r\n")
        assert not [line for line in lines if line.startswith((b".", b"From "))]
        assert max(map(len, lines)) <= 76
    assert body(parse(raw), "plain") == normalise_lines(text)


def test_boundaries_are_deterministic_per_message_and_cannot_occur_in_parts() -> None:
    """Same message id, same bytes; another id, other boundaries; "=_" never appears in QP or base64."""
    parts = parts_with(
        attachment=Attachment("a.ics", "text/calendar", bytes(range(256)) * 8), text="--=_a =_"
    )
    raw = compose(parts)
    assert raw == compose(parts)
    other = compose(
        parts_with(message_id="reg-2.confirmation.0000@mailer.example.org", attachment=parts.attachment)
    )
    boundaries = set(re.findall(rb'boundary="([^"]+)"', raw))
    assert len(boundaries) == 2
    assert not boundaries & set(re.findall(rb'boundary="([^"]+)"', other))
    for boundary in boundaries:
        assert boundary.startswith(b"=_")
        # The header parameter, then opening, middle and closing delimiter lines: nothing else.
        assert raw.count(boundary) == 4
        assert raw.count(b"\r\n--" + boundary) == 3


def test_date_header_keeps_the_offset_it_was_given() -> None:
    """One instant, two zones, two Date headers: a cached "now" must not leak another zone's offset."""
    berlin = datetime(2026, 12, 1, 10, 0, tzinfo=BERLIN)
    for date in (berlin, berlin.astimezone(UTC), berlin):
        assert str(parse(compose(parts_with(date=date)))["Date"]) == format_datetime(date)


def test_headers_of_a_german_confirmation_are_in_order_and_folded() -> None:
    """From, To, Reply-To, Subject, Date, Message-ID, MIME-Version, ... with lines <= 78 octets."""
    raw = compose(confirmation_parts())
    head = raw.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":")[0].decode() for line in head.split(b"\r\n") if not line.startswith(b" ")]
    assert names == [
        "From", "To", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Language",
        "Auto-Submitted", "X-Auto-Response-Suppress", "X-Mailer-Kind", "Content-Type",
    ]  # fmt: skip
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


# --- golden file --------------------------------------------------------------------------

ICS = (
    b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//mailer//mailer//EN\r\nMETHOD:PUBLISH\r\n"
    b"BEGIN:VEVENT\r\nSUMMARY:Digitaler Dialog zu Weltoffenheit\r\n"
    b"DTSTART;TZID=Europe/Berlin:20261210T180000\r\nDTEND;TZID=Europe/Berlin:20261210T203000\r\n"
    b"DTSTAMP:20261201T080000Z\r\nUID:5e7fb34244712fe56c236aa5@mailer.example.org\r\nSEQUENCE:0\r\n"
    b"END:VEVENT\r\nEND:VCALENDAR\r\n"
)
PARAGRAPHS = [
    "Die Stadt Kaiserslautern versteht sich als eine weltoffene Kommune, in der Menschen aus vielen "
    "Nationen eine lebendige, tolerante und einander zugewandte Stadtgesellschaft bilden. Aber stimmt "
    "das wirklich? Wie weltoffen ist Kaiserslautern tatsächlich? Wo könnten Dinge besser laufen?",
    "Um diesen Fragen nachzugehen, nimmt die Stadt seit Sommer 2020 als eine von bundesweit 22 "
    "Modellkommunen an dem Projekt „Weltoffene Kommune – vom Dialog zum Zusammenhalt“ teil.",
    "Die Dialogveranstaltung findet am 10. Dezember von 18 bis 20.30 Uhr statt, ausschließlich in "
    "digitaler Form. Alle Interessierten sind herzlich eingeladen, sich über das Thema Weltoffenheit "
    "Gedanken zu machen und online mitzudiskutieren.",
    "„Weltoffenheit braucht Begegnung und Austausch und Weltoffenheit lebt davon, dass möglichst viele "
    "Menschen sich dafür interessieren und mitgestalten wollen“, so der Integrationsbeauftragte der "
    "Stadt, Alexander Pongrácz.",
]


def confirmation_parts(*, repeat: int = 1) -> MailParts:
    """A German registration confirmation for the dialog evening; `repeat` grows the body."""
    paragraphs = PARAGRAPHS * repeat
    text = (
        "Hallo Maria Müller,\n\nvielen Dank für Ihre Anmeldung zu „Digitaler Dialog zu Weltoffenheit“.\n\n"
        "Wann: Donnerstag, 10. Dezember 2026, 18:00–20:30 Uhr\nWo: Online\n"
        "Link: https://meet.example.org/weltoffen\n\n" + "\n\n".join(paragraphs) + "\n\n"
        ".\nFrom the organiser: Ihr Team der Stadt Kaiserslautern\n"
    )
    html = (
        '<!DOCTYPE html><html lang="de"><head><meta charset="utf-8"></head>'
        '<body style="font-family:sans-serif">'
        "<p>Hallo Maria Müller,</p><p>vielen Dank für Ihre Anmeldung zu "
        "<strong>„Digitaler Dialog zu Weltoffenheit“</strong>.</p>"
        '<table role="presentation">'
        "<tr><td>Wann</td><td>Donnerstag, 10. Dezember 2026, 18:00–20:30 Uhr</td></tr>"
        '<tr><td>Wo</td><td><a href="https://meet.example.org/weltoffen">Online</a></td></tr></table>'
        + "".join(f'<p style="margin:0 0 1em 0;line-height:1.4">{p}</p>' for p in paragraphs)
        + "<p>Ihr Team der Stadt Kaiserslautern</p></body></html>\n"
    )
    return MailParts(
        message_id="reg-1001.confirmation.3f9a@mailer.example.org",
        sender=Address("Stadt Kaiserslautern", "noreply@kaiserslautern.example"),
        recipient=Address("Müller, Maria", "maria.mueller@example.org"),
        reply_to=Address(
            "Alexander Pongrácz (Integrationsbeauftragter)", "integration@kaiserslautern.example"
        ),
        subject="Anmeldebestätigung: Digitaler Dialog zu Weltoffenheit am Donnerstag, 10. Dezember 2026",
        text=text,
        html=html,
        attachment=Attachment("veranstaltung.ics", 'text/calendar; method=PUBLISH; charset="utf-8"', ICS),
        date=datetime(2026, 12, 1, 9, 0, tzinfo=BERLIN),
        language="de",
        extra_headers=(("X-Mailer-Kind", "confirmation"),),
    )


def test_german_confirmation_matches_the_golden_file() -> None:
    """The fixed confirmation composes byte for byte to tests/golden (UPDATE_GOLDEN=1 rewrites it)."""
    raw = compose(confirmation_parts())
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(raw)
    assert GOLDEN.exists(), "no golden file yet: run once with UPDATE_GOLDEN=1 and review it"
    assert raw == GOLDEN.read_bytes()
