"""The send attempts' counters: by the class of the relay's reply and by how long the send took.

One hash (constants.SEND_STATS_KEY), overall and anonymous: no message, event or address is
in it, so retention and erasure leave it alone. The send path's step script keeps it in the
round trip that records the outcome (mailer.state.message_states). Fields, with the relay
(the transport's name) last because a Maildir path may hold anything but a line break:

- `c|<class>|<relay>`: attempts whose reply was of that class (REPLY_CLASSES);
- `d|<bucket>|<relay>`: attempts whose send took that long, in quarter-octave buckets of
  microseconds (mailer.state.deliverylog's latency buckets, in µs instead of ms).

A send is one message's transaction on its connection (MAIL, RCPT, DATA pipelined, then the
payload and its reply), measured in the lane from handing the message over to the reply; it
includes opening the connection when the lane had none. Lanes run side by side, so these
durations add up to more than the wall time of a batch.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final, Literal

from mailer.state.deliverylog import bucket_upper_ms, latency_bucket

ReplyClass = Literal["2xx", "4xx", "5xx", "no_reply"]
# no_reply: the relay answered nothing this attempt could be judged by (connection refused or
# lost, a timeout, a malformed reply, an address refused before anything was sent).
REPLY_CLASSES: Final[tuple[ReplyClass, ...]] = ("2xx", "4xx", "5xx", "no_reply")
MICROS: Final = 1_000_000


def reply_class(code: int | None, *, accepted: bool) -> ReplyClass:
    """The class of an attempt's reply; an accepted message is 2xx (the Maildir outbox's too)."""
    if accepted:
        return "2xx"
    if code is not None and 400 <= code < 500:
        return "4xx"
    if code is not None and 500 <= code < 600:
        return "5xx"
    return "no_reply"


def attempt_fields(relay: str, klass: ReplyClass, took_us: int) -> tuple[str, str]:
    """The two fields one attempt adds 1 to: its reply class and its duration bucket."""
    return f"c|{klass}|{relay}", f"d|{latency_bucket(took_us)}|{relay}"


def bucket_upper_seconds(bucket: int) -> float:
    """The longest send a duration bucket holds, in seconds."""
    return bucket_upper_ms(bucket) / MICROS


@dataclass(slots=True)
class SendStats:
    """The counters as read: attempts per (relay, class), duration buckets per relay."""

    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    durations: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))


def parse(raw: dict[bytes, bytes]) -> SendStats:
    """The hash's fields as counters (a field mailer did not write is left out)."""
    stats = SendStats()
    for name, value in raw.items():
        what, _, rest = name.decode(errors="replace").partition("|")
        part, _, relay = rest.partition("|")
        if what == "c" and part in REPLY_CLASSES:
            stats.attempts[(relay, part)] = int(value)
        elif what == "d" and part.isdigit():
            stats.durations[relay][int(part)] = int(value)
    return stats
