"""The contract refuses what cannot be planned: dates in range, bounded offsets, strict dates and booleans."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailer.durations import MAX_REMINDER_OFFSET_DAYS, MAX_REMINDER_OFFSETS, parse_offsets
from mailer.errors import ConfigError, InvalidEvent
from mailer.events import parse_event
from tests.conftest import make_event


def problems(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw)
    return {p.field: p.reason for p in info.value.problems}


def with_event(**fields: Any) -> dict[str, Any]:
    return make_event(event=fields)


@pytest.mark.parametrize("field", ["starts_at", "registration_deadline"])
@pytest.mark.parametrize("year", [1999, 2100, 9999])
def test_event_dates_outside_2000_to_2099_are_refused(field: str, year: int) -> None:
    """A start in year 9999 cannot be planned (its reminders overflow): refused, naming the field."""
    moment = datetime(year, 6, 1, 18, 0, tzinfo=UTC)
    raw = with_event(**{field: moment.isoformat()})
    if field == "starts_at":
        raw["event"]["ends_at"] = (moment + timedelta(hours=2)).isoformat()
    found = problems(raw)
    assert f"event.{field}" in found
    assert "2000" in found[f"event.{field}"]
    assert "2100" in found[f"event.{field}"]


def test_occurred_at_outside_the_range_is_refused() -> None:
    """The envelope's time is bounded too: it orders updates, and it becomes a millisecond score."""
    raw = make_event(occurred_at=datetime(9999, 1, 1, tzinfo=UTC))
    assert "occurred_at" in problems(raw)


def test_dates_inside_the_range_still_parse() -> None:
    """2000-01-01 and the last moment of 2099 are inside; an ISO string with Z parses as before."""
    raw = make_event(starts_at=datetime(2099, 12, 31, 20, 0, tzinfo=UTC), duration=timedelta(hours=3))
    raw["occurred_at"] = "2000-01-01T00:00:00Z"
    event = parse_event(raw)
    assert event.occurred_at == datetime(2000, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("value", [1764079200, 1764079200.5, "1764079200", True, None, [2026, 1, 1]])
def test_a_number_is_not_a_timestamp(value: Any) -> None:
    """An integer (or a string of digits, which pydantic would read as Unix time) is not a date."""
    raw = make_event()
    raw["occurred_at"] = value
    assert "occurred_at" in problems(raw)
    raw = with_event(starts_at=value)
    assert "event.starts_at" in problems(raw)


@pytest.mark.parametrize("value", ["no", "false", "yes", 0, 1, "0", None])
def test_no_is_not_a_boolean(value: Any) -> None:
    """`"no"` is not `false`: a boolean field takes JSON true or false only."""
    assert "event.join_url_in_confirmation" in problems(with_event(join_url_in_confirmation=value))


def test_json_booleans_and_dates_still_parse_from_json_text() -> None:
    """The same event as JSON text: true/false and ISO 8601 strings are what the contract takes."""
    import orjson

    raw = with_event(join_url_in_confirmation=False)
    event = parse_event(orjson.dumps(raw))
    assert event.event.join_url_in_confirmation is False  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("offsets", "reason"),
    [
        (["P99999999999D"], "366"),
        (["P367D"], "366"),
        (["P53W"], "366"),
        (["P1D", "P1D"], "repeats"),
        (["P1D", "P1DT0H"], "repeats"),
        ([f"PT{i + 1}H" for i in range(MAX_REMINDER_OFFSETS + 1)], "at most"),
        (["P" + "9" * 5000 + "D"], "too long"),
    ],
)
def test_reminder_offsets_are_bounded(offsets: list[str], reason: str) -> None:
    """Each offset at most P366D, at most ten of them, none twice: refused naming the field."""
    found = problems(with_event(reminder_offsets=offsets))
    assert reason in found["event.reminder_offsets"]


def test_the_largest_allowed_offsets_are_accepted() -> None:
    """P366D and ten distinct offsets are inside the bounds."""
    offsets = [f"P{MAX_REMINDER_OFFSET_DAYS}D"] + [f"PT{i + 1}H" for i in range(MAX_REMINDER_OFFSETS - 1)]
    parse_event(with_event(reminder_offsets=offsets))


@pytest.mark.parametrize("value", ["P99999999999D", "P1D,P1D", ",".join(f"PT{i}H" for i in range(1, 12))])
def test_mailer_reminder_offsets_has_the_same_bounds(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MAILER_REMINDER_OFFSETS is refused at start-up with the event's bounds, not at the first event."""
    from mailer.settings import load_settings

    monkeypatch.setenv("MAILER_REMINDER_OFFSETS", value)
    with pytest.raises(ConfigError):
        load_settings(MAILER_FROM="noreply@example.org")


@given(st.integers(min_value=1, max_value=MAX_REMINDER_OFFSET_DAYS * 86400))
def test_every_allowed_offset_before_every_allowed_start_can_be_computed(seconds: int) -> None:
    """The bounds together mean planning cannot overflow: any offset before any allowed start."""
    days, rest = divmod(seconds, 86400)
    text = f"P{days}DT{rest}S" if days else f"PT{rest}S"
    (offset,) = parse_offsets([text])
    for start in (datetime(2000, 1, 1, tzinfo=UTC), datetime(2099, 12, 31, 23, 59, tzinfo=UTC)):
        assert offset.before(start, "Pacific/Kiritimati").year >= 1998
