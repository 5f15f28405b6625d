"""The one clock: every part that reads the time takes a `Clock`, so tests can drive time.

Wall-clock time in UTC as timezone-aware datetimes; Redis scores and message states keep
milliseconds since the epoch (`ms`, `from_ms`); the delivery log writes ISO 8601 (`iso`).
Jobs due "now" in the queue are scored with Redis's own clock instead (mailer.state.queue), so a
producer host whose clock runs fast cannot park them in the future.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The system clock, the default wherever a Clock is taken."""
    return datetime.now(UTC)


def ms(moment: datetime) -> int:
    """Milliseconds since the epoch, as Redis scores and message states keep time."""
    return int(moment.timestamp() * 1000)


def from_ms(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, tz=UTC)


def iso(moment: datetime) -> str:
    """A delivery-log timestamp: ISO 8601 in UTC, to the millisecond."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
