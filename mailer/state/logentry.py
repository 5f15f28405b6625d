"""One delivery-log entry: its fields, its JSON line, and how a stored entry is read back."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, get_args

import orjson

from mailer.clock import from_ms, iso
from mailer.state.messages import MessageRef

# Every state change of a message is one entry with one of these; "rejected" is bad input,
# "ignored" a replay, "foreign" a stream entry mailer did not write (shown, not trusted).
# Stored entries keep the position in this tuple: append new statuses, never reorder.
LogStatus = Literal[
    "planned",
    "sent",
    "retrying",
    "held",
    "failed",
    "skipped",
    "rejected",
    "uncertain",
    "redriven",
    "ignored",
    "foreign",
    "sending",
]
LOG_STATUSES: tuple[LogStatus, ...] = get_args(LogStatus)
STATUS_CODES: dict[str, int] = {status: code for code, status in enumerate(LOG_STATUSES)}


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One line of the delivery log: enough to answer "did Ms X get her mail, and if not, why?".

    Never a mail body, never a credential. `recipient` is "" once the address was forgotten;
    `smtp_text` and `detail` never hold the recipient's address (it reads "<recipient>").
    """

    ts: str
    status: LogStatus
    message_id: str = ""
    kind: str = ""
    registration_id: str = ""
    event_id: str = ""
    recipient: str = ""
    attempt: int = 0
    detail: str = ""
    worker: str = ""
    smtp_code: int | None = None
    enhanced_code: str | None = None
    source_event: str = ""  # the producer event id that caused it, where there is one
    message_id_header: str = ""  # the Message-ID header (without brackets) the mail carries
    locale: str = ""
    reference: str = ""  # the registration's reference in the producer's system, if any
    smtp_text: str = ""
    sequence: int | None = None  # the calendar file's SEQUENCE, where the mail had one
    latency_ms: int | None = None  # sent entries: from planned to the relay's 250

    def to_json(self) -> bytes:
        # Read the slots directly: dataclasses.asdict deep-copies and was a visible cost per mail.
        return orjson.dumps({k: v for k in self.__slots__ if (v := getattr(self, k)) not in (None, "")})

    @classmethod
    def from_json(cls, raw: bytes) -> LogEntry:
        data: dict[str, Any] = orjson.loads(raw)
        return cls(**{k: v for k, v in data.items() if k in cls.__slots__})

    @property
    def kind_name(self) -> str:
        """The kind, read from the message id where the entry has no kind of its own."""
        return self.kind or (self.message_id.split("/")[1] if self.message_id.count("/") else "")


def decode_stored(entry_id: bytes, values: list[bytes]) -> LogEntry:
    """An entry as the readers' Lua returns it: the FIELDS values, names and address resolved."""
    text = [value.decode() for value in values]
    s, m, g, k, e, r, a, c, x, t, d, w, loc, f, v, q, y, h, z = text
    millis = int(entry_id.split(b"-", 1)[0]) + int(z or 0)
    registration = g or (m.split("/", 1)[0] if "/" in m else "")
    kind = k or (m.split("/")[1] if "/" in m else "")
    header = ""
    if m and h:
        try:
            header = MessageRef.parse(m).header_id(h)
        except ValueError:
            header = ""
    return LogEntry(
        ts=iso(from_ms(millis)),
        status=LOG_STATUSES[int(s)],
        message_id=m,
        kind=kind,
        registration_id=registration,
        event_id=e,
        recipient=r,
        attempt=int(a or 0),
        detail=d,
        worker=w,
        smtp_code=int(c) if c else None,
        enhanced_code=x or None,
        source_event=v,
        message_id_header=header,
        locale=loc,
        reference=f,
        smtp_text=t,
        sequence=int(q) if q else None,
        latency_ms=int(y) if y else None,
    )


def decode_raw(entry_id: bytes, flat: list[bytes]) -> LogEntry:
    """An entry not in the current layout: one written as JSON by an older mailer, or a
    `foreign` one that says what was found instead.

    Anyone with access to Redis can XADD to the stream; one odd entry must not stop every
    reader of the log (`mailer log`, `mailer retry --status`) at that point.
    """
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    raw = fields.get(b"j")
    if raw is not None:
        try:
            entry = LogEntry.from_json(raw)
        except (ValueError, TypeError, AttributeError):  # not JSON, not an object, no ts/status
            pass
        else:
            if _well_formed(entry):
                return entry
    shown = ", ".join(
        f"{key.decode(errors='replace')}={value.decode(errors='replace')!r}" for key, value in fields.items()
    )
    millis = int(entry_id.split(b"-", 1)[0])
    return LogEntry(
        ts=iso(from_ms(millis)),
        status="foreign",
        detail=f"stream entry {entry_id.decode()} was not written by mailer: {shown[:200]}",
    )


_INT_FIELDS = frozenset({"attempt"})
_OPTIONAL_FIELDS = {"smtp_code": int, "enhanced_code": str, "sequence": int, "latency_ms": int}


def _well_formed(entry: LogEntry) -> bool:
    """Every field of the type mailer writes, and an aware timestamp readers can compare."""
    for name in LogEntry.__slots__:
        value = getattr(entry, name)
        if name in _OPTIONAL_FIELDS:
            ok = value is None or (isinstance(value, _OPTIONAL_FIELDS[name]) and not isinstance(value, bool))
        elif name in _INT_FIELDS:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            return False
    if entry.status not in LOG_STATUSES:
        return False
    try:
        return datetime.fromisoformat(entry.ts).tzinfo is not None
    except ValueError:
        return False
