"""Which changes of an event its attendees are told about with a change notice, and which not."""

from __future__ import annotations

from mailer.constants import LOCALES
from mailer.events import Event

# What a change notice reports, in the order it lists them: what an attendee may have written
# down or relies on. When and where; the link and the access details (an old passcode or
# dial-in number stops working); the title they know the event by (in their language); what
# access the event offers (someone who depends on sign language must hear that it was dropped).
NOTIFIED = ("time", "location", "join_url", "access", "title", "accessibility")

# Not told on their own, only shown in the next mail and calendar file: the description, the
# event page, the contact, the organiser, the registration link and deadline, the reminder
# offsets and join_url_in_confirmation. They are edited far more often than they matter to
# someone already registered, and a notice for each edit teaches attendees to skip notices.


def notified_changes(old: Event, new: Event, locale: str | None = None) -> list[str]:
    """The NOTIFIED fields that differ as an attendee in `locale` reads them; with no locale,
    those that differ in any locale (the planner's question: is there a notice to send?)."""
    locales = (locale,) if locale else LOCALES
    return [
        name
        for name in NOTIFIED
        if any(_as_read(old, name, where) != _as_read(new, name, where) for where in locales)
    ]


def _as_read(event: Event, name: str, locale: str) -> object:
    if name == "time":
        return (event.starts_at, event.ends_at, event.timezone)
    if name == "title":
        return event.title_in(locale)  # a new English title is no news to German readers
    if name == "access":
        return event.access_info
    return getattr(event, name)


def unnotified_changes(old: Event, new: Event) -> list[str]:
    """The contract fields that differ although no notice reports them (for the operator's log)."""
    reported = {"starts_at", "ends_at", "timezone", "location", "join_url", "access_info", "title"}
    reported |= {"title_i18n", "accessibility"}
    return [
        name
        for name in type(new).model_fields
        if name not in reported and getattr(old, name) != getattr(new, name)
    ]
