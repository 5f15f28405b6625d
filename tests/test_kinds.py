"""The table of message kinds: each kind's send-time rules, written out as a matrix, and a
template folder for every row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.delivery.sender import why_not_send
from mailer.events import Attendee, Event
from mailer.lifecycle.kinds import FANNED_OUT, KINDS
from mailer.state.messages import MessageRef
from mailer.state.store import StoredEvent, StoredRegistration

START = datetime(2030, 6, 1, 16, 0, tzinfo=UTC)
EVENT = Event.model_validate(
    {
        "id": "ev",
        "title": "Dialog",
        "starts_at": START.isoformat(),
        "ends_at": (START + timedelta(hours=2)).isoformat(),
        "timezone": "Europe/Berlin",
        "location": "Online",
        "join_url": "https://meet.example.org/x",
        "organizer": {"name": "Stadt", "email": "stadt@example.org"},
    }
)
ATTENDEE = Attendee(email="a@example.org", name="A", locale="de")

# Sent (True) or not, by (registration state, event state, has the event started).
RULES: dict[str, dict[tuple[str, str, bool], bool]] = {
    "confirmation": {("active", "active", False): True},
    "reminder": {("active", "active", False): True},
    "event_changed": {("active", "active", False): True},
    "registration_cancelled": {
        ("cancelled", "active", False): True,
        ("cancelled", "cancelled", False): True,
        ("cancelled", "active", True): True,
        ("cancelled", "cancelled", True): True,
    },
    "event_cancelled": {("active", "cancelled", False): True, ("active", "cancelled", True): True},
}


def _disc(kind: str) -> str:
    return {"reminder": "PT1H/20300601T150000Z", "event_changed": "v1"}.get(kind, "")


@pytest.mark.parametrize("kind", MESSAGE_KINDS)
@pytest.mark.parametrize("reg_state", ["active", "cancelled"])
@pytest.mark.parametrize("event_state", ["active", "cancelled"])
@pytest.mark.parametrize("started", [False, True])
def test_each_kind_is_sent_only_in_the_states_it_is_for(
    kind: str, reg_state: str, event_state: str, started: bool
) -> None:
    """A cancellation notice goes to a cancelled registration whatever the event does; an event
    cancellation to active registrations even once it started; everything else only to active
    registrations of an active event that has not started."""
    reg = StoredRegistration("r", ATTENDEE, "ev", reg_state, 0, 0)
    stored = StoredEvent(EVENT, 1, 0, event_state)
    now = START + (timedelta(minutes=5) if started else -timedelta(days=2))
    reason = why_not_send(MessageRef("r", kind, _disc(kind)), reg, stored, now)  # type: ignore[arg-type]
    expected = RULES[kind].get((reg_state, event_state, started), False)
    assert (reason is None) is expected, reason


def test_every_kind_has_a_row_and_a_template_folder() -> None:
    """Adding a kind means a row, a folder of templates and tests; nothing else lists kinds."""
    assert tuple(KINDS) == MESSAGE_KINDS
    templates = Path(__file__).parent.parent / "templates"
    for kind in KINDS.values():
        folder = templates / kind.template_folder
        for locale in LOCALES:
            for name in (f"subject.{locale}.txt", f"body.{locale}.txt", f"body.{locale}.html"):
                assert (folder / name).is_file(), folder / name
    assert {"reminder", "event_changed", "event_cancelled"} == FANNED_OUT


def test_calendar_methods_and_the_join_link_rule() -> None:
    """Confirmations and change notices add or move the calendar entry, cancellations remove it,
    reminders carry none; cancellations never show the join link, the confirmation and the change
    notice only unless the event withholds it (then the reminder brings it)."""
    assert {k: v.calendar for k, v in KINDS.items()} == {
        "confirmation": "PUBLISH",
        "reminder": None,
        "registration_cancelled": "CANCEL",
        "event_changed": "PUBLISH",
        "event_cancelled": "CANCEL",
    }
    withheld = EVENT.model_copy(update={"join_url_in_confirmation": False})
    assert KINDS["confirmation"].shows_join_link(EVENT)
    assert not KINDS["confirmation"].shows_join_link(withheld)
    assert not KINDS["registration_cancelled"].shows_join_link(EVENT)
    assert not KINDS["event_cancelled"].shows_join_link(EVENT)
    assert KINDS["reminder"].shows_join_link(withheld)
    assert KINDS["event_changed"].shows_join_link(EVENT)
    assert not KINDS["event_changed"].shows_join_link(withheld)
    # Once the first reminder has gone out with the link, later confirmations and notices show
    # it too; cancellations never do.
    for name in ("confirmation", "event_changed"):
        assert KINDS[name].shows_join_link(withheld, released=True)
    for name in ("registration_cancelled", "event_cancelled"):
        assert not KINDS[name].shows_join_link(EVENT, released=True)
