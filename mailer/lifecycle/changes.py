"""Which changes of an event its attendees are told about with a change notice, and which not."""

from __future__ import annotations

from mailer.constants import LOCALES
from mailer.events import Event

# What a change notice reports, in the order it lists them, and the contract fields each is read
# from: what an attendee may have written down or relies on. When and where; the link and the
# access details (an old passcode or dial-in number stops working); the title they know the
# event by (in their language); what access the event offers (someone who depends on sign
# language must hear that it was dropped).
NOTIFIED: dict[str, tuple[str, ...]] = {
    "time": ("starts_at", "ends_at", "timezone"),
    "location": ("location",),
    "join_url": ("join_url",),
    "access": ("access_info",),
    "title": ("title", "title_i18n"),
    "accessibility": ("accessibility",),
}

# Not told on their own, only shown in the next mail and calendar file: the description, the
# event page, the contact, the organiser, the registration link and deadline, the reminder
# offsets and join_url_in_confirmation. They are edited far more often than they matter to
# someone already registered, and a notice for each edit teaches attendees to skip notices.


def notified_changes(old: Event, new: Event, locale: str | None = None) -> list[str]:
    """The NOTIFIED changes between `old` and `new` as an attendee in `locale` reads them; with
    no locale, those in any locale (the planner's question: is there a notice to send?)."""
    locales = (locale,) if locale else LOCALES
    return [
        name
        for name in NOTIFIED
        if any(_as_read(old, name, where) != _as_read(new, name, where) for where in locales)
    ]


def _as_read(event: Event, name: str, locale: str) -> object:
    if name == "title":
        return event.title_in(locale)  # a new English title is no news to German readers
    return tuple(getattr(event, field) for field in NOTIFIED[name])


def unnotified_changes(old: Event, new: Event) -> list[str]:
    """The contract fields that differ although no notice reports them (for the operator's log)."""
    reported = {field for fields in NOTIFIED.values() for field in fields}
    return [
        name
        for name in type(new).model_fields
        if name not in reported and getattr(old, name) != getattr(new, name)
    ]
