"""ISO 8601 durations for reminder offsets, and the rule that turns one into a send time."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

_DURATION = re.compile(
    r"^P(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?$"
)


@dataclass(frozen=True, slots=True, order=True)
class Offset:
    """A reminder offset: whole calendar days plus an exact time span.

    Days are nominal (calendar days in the event's time zone), the time part is exact,
    as in ISO 8601: so "P1D" before 10:00 on the Sunday clocks change is 10:00 on
    Saturday, while "PT24H" is 24 real hours earlier (09:00 or 11:00 local time).
    """

    days: int
    seconds: int

    @classmethod
    def parse(cls, text: str) -> Offset:
        """Parse "P1D", "PT1H", "P1DT12H", "P2W"; months and years are refused (ambiguous)."""
        match = _DURATION.match(text.strip().upper())
        if match is None or text.strip().upper() in ("P", "PT") or text.strip().upper().endswith("T"):
            raise ValueError(
                f"{text!r} is not an ISO 8601 duration of weeks, days, hours, minutes or seconds "
                "(e.g. P1D, PT1H, P1DT12H)"
            )
        parts = {k: int(v) if v else 0 for k, v in match.groupdict().items()}
        offset = cls(
            days=parts["weeks"] * 7 + parts["days"],
            seconds=parts["hours"] * 3600 + parts["minutes"] * 60 + parts["seconds"],
        )
        if offset.days == 0 and offset.seconds == 0:
            raise ValueError(f"{text!r} is a zero duration; leave it out instead")
        return offset

    @property
    def iso(self) -> str:
        """The canonical ISO 8601 form, used in message ids and shown to template authors."""
        out = "P"
        if self.days:
            out += f"{self.days}D"
        if self.seconds:
            hours, rest = divmod(self.seconds, 3600)
            minutes, seconds = divmod(rest, 60)
            out += "T" + (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
            out += f"{seconds}S" if seconds else ""
        return out

    @property
    def total_seconds(self) -> int:
        """Nominal length, for sorting and for the template's "in one hour" wording."""
        return self.days * 86400 + self.seconds

    def before(self, starts_at: datetime, timezone: str) -> datetime:
        """When a reminder this far ahead of `starts_at` falls due (aware, UTC)."""
        zone = ZoneInfo(timezone)
        local = starts_at.astimezone(zone)
        if self.days:
            # Step back in wall-clock time, then let zoneinfo pick that day's UTC offset.
            wall = local.replace(tzinfo=None) - timedelta(days=self.days)
            local = wall.replace(tzinfo=zone)
        # Aware arithmetic within one tzinfo is wall-clock arithmetic in Python, so the
        # exact part is subtracted in UTC.
        return local.astimezone(UTC) - timedelta(seconds=self.seconds)

    def __str__(self) -> str:
        return self.iso


# Reminder offsets are bounded so that every due time can be computed (and stays within the
# contract's date range): more than a year ahead is a typo, not a reminder, and more than a
# handful per event is a mail storm.
MAX_REMINDER_OFFSET_DAYS = 366
MAX_REMINDER_OFFSETS = 10
_MAX_OFFSET_TEXT = 40


def reminder_offset(text: str) -> Offset:
    """One reminder offset: an ISO 8601 duration of at most MAX_REMINDER_OFFSET_DAYS days."""
    if len(text) > _MAX_OFFSET_TEXT:
        raise ValueError(f"{text[:_MAX_OFFSET_TEXT]!r}... is too long for a reminder offset")
    offset = Offset.parse(text)
    if offset.total_seconds > MAX_REMINDER_OFFSET_DAYS * 86400:
        raise ValueError(
            f"{text!r} is more than {MAX_REMINDER_OFFSET_DAYS} days; a reminder is sent at most "
            f"P{MAX_REMINDER_OFFSET_DAYS}D before the event"
        )
    return offset


def parse_offsets(values: list[str] | tuple[str, ...] | str) -> tuple[Offset, ...]:
    """Parse reminder offsets (a list, or a comma-separated string), largest first.

    At most MAX_REMINDER_OFFSETS, each at most MAX_REMINDER_OFFSET_DAYS days, none twice
    (also not in two spellings, "P1D" and "P1DT0H"): a repeat is a mistake worth hearing of.
    """
    given = values.split(",") if isinstance(values, str) else list(values)
    items = [item for item in given if item.strip()]
    if len(items) > MAX_REMINDER_OFFSETS:
        raise ValueError(f"at most {MAX_REMINDER_OFFSETS} reminder offsets, got {len(items)}")
    offsets: dict[Offset, str] = {}
    for item in items:
        offset = reminder_offset(item)
        if offset in offsets:
            raise ValueError(f"{item!r} repeats {offsets[offset]!r}; give each reminder offset once")
        offsets[offset] = item
    return tuple(sorted(offsets, key=lambda o: o.total_seconds, reverse=True))
