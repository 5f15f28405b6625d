"""Who a mail says it is from, and how one registration's mails hang together in a mail client."""

from __future__ import annotations

from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

import pytest

from mailer.constants import MESSAGE_KINDS
from mailer.ops.preview import preview, sample_event, sample_previous


def _message(settings: Any, kind: str) -> EmailMessage:
    registration = sample_event()
    previous = sample_previous(registration) if kind == "event_changed" else None
    built, _ = preview(settings, kind, registration, "de", previous=previous)
    parsed = BytesParser(policy=policy.default).parsebytes(built.data)
    assert isinstance(parsed, EmailMessage)
    return parsed


@pytest.mark.parametrize("sender", ["noreply@example.org", None])
def test_without_a_display_name_the_organiser_is_the_sender_shown(
    make_settings: Any, sender: str | None
) -> None:
    """MAILER_FROM unset or a bare address: attendees see "Stadt Kaiserslautern", not "mailer"
    or a naked address; the address stays MAILER_FROM's."""
    settings = make_settings(MAILER_FROM=sender) if sender else make_settings()
    if sender is None:  # the default, as on a fresh install
        settings = settings.model_copy(update={"sender": type(settings).model_fields["sender"].default})
    (shown,) = _message(settings, "confirmation")["From"].addresses
    assert shown.display_name == "Stadt Kaiserslautern"
    assert shown.addr_spec == "noreply@example.org"


def test_a_display_name_in_mailer_from_wins(make_settings: Any) -> None:
    """An operator who names the sender (MAILER_FROM="Bürgerbüro <…>") gets that name."""
    settings = make_settings(MAILER_FROM="Bürgerbüro Kaiserslautern <buergerbuero@example.org>")
    (shown,) = _message(settings, "reminder")["From"].addresses
    assert (shown.display_name, shown.addr_spec) == ("Bürgerbüro Kaiserslautern", "buergerbuero@example.org")


@pytest.mark.parametrize("kind", [k for k in MESSAGE_KINDS if k != "confirmation"])
def test_later_mails_of_a_registration_thread_under_its_confirmation(make_settings: Any, kind: str) -> None:
    """Reminders, change and cancellation notices carry In-Reply-To and References to the
    confirmation's Message-ID, so the attendee's client shows one conversation."""
    settings = make_settings()
    confirmation = _message(settings, "confirmation")
    later = _message(settings, kind)
    assert confirmation["In-Reply-To"] is None
    assert later["In-Reply-To"] == confirmation["Message-ID"]
    assert later["References"] == confirmation["Message-ID"]
    assert later["Message-ID"] != confirmation["Message-ID"]
