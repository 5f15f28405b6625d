"""Templates to text: the Jinja2 environment, the render context, and rendering once per event."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import markupsafe

from mailer.constants import LOCALES, MESSAGE_KINDS
from mailer.content.dates import (
    format_moment,
    format_when,
    nobreak_spaces,
    reminder_lead,
    reminder_when,
)
from mailer.content.ics import access_rows, calendar_event, web_links
from mailer.durations import Offset
from mailer.errors import TemplateError
from mailer.events import Accessibility, AccessInfo, Attendee, Contact, Event
from mailer.lifecycle.changes import notified_changes
from mailer.lifecycle.kinds import ReminderTimes, kind_named

PARTS = ("subject", "text", "html")
_FILES = {"subject": "subject.{locale}.txt", "text": "body.{locale}.txt", "html": "body.{locale}.html"}
CHANGE_LABELS = {
    "de": {
        "time": "Zeit",
        "location": "Ort",
        "join_url": "Zugangslink",
        "access": "Zugangsdaten",
        "title": "Titel",
        "accessibility": "Barrierefreiheit",
    },
    "en": {
        "time": "Time",
        "location": "Place",
        "join_url": "Join link",
        "access": "Access details",
        "title": "Title",
        "accessibility": "Accessibility",
    },
}
CALENDAR_FILENAMES = {"de": "veranstaltung.ics", "en": "event.ics"}


def default_template_dir() -> Path:
    """The packaged templates: inside the wheel, or the repository's templates/ folder."""
    package = Path(__file__).parents[1]  # mailer/
    packaged = package / "default_templates"
    return packaged if packaged.is_dir() else package.parent / "templates"


def event_view(event: Event, locale: str) -> SimpleNamespace:
    """The `event` object templates see."""
    deadline = event.registration_deadline
    when = format_when(event.starts_at, event.ends_at, event.timezone, locale)
    deadline_text = format_moment(deadline, event.timezone, locale) if deadline else None
    online = event.join_url is not None or event.access_info is not None
    return SimpleNamespace(
        title=event.title_in(locale),
        location=event.location,
        join_url=event.join_url,
        description=event.description_in(locale),
        is_online=online or (event.location or "").strip().lower() == "online",
        organizer_name=event.organizer.name,
        organizer_email=event.organizer.email,
        timezone=event.timezone,
        registration_deadline=deadline_text,
        registration_url=event.registration_url,
        url=event.url,
        contact=contact_view(event.contact),
        access=access_view(event, locale),
        accessibility=accessibility_line(event.accessibility, locale),
        # The same strings for the HTML part, where a narrow screen must not wrap inside them.
        nobreak=SimpleNamespace(
            **{k: nobreak_spaces(when[k]) for k in ("when", "when_zoned", "date", "start_time", "end_time")},
            registration_deadline=nobreak_spaces(deadline_text) if deadline_text else None,
        ),
        **when,
    )


def contact_view(contact: Contact | None) -> SimpleNamespace | None:
    """`event.contact`: name, email and phone (each or None), and `phone_uri` for a tel: link."""
    if contact is None:
        return None
    phone_uri = None
    if contact.phone:
        digits = "".join(ch for ch in contact.phone if ch.isdigit())
        phone_uri = "tel:" + ("+" if contact.phone.startswith("+") else "") + digits
    return SimpleNamespace(name=contact.name, email=contact.email, phone=contact.phone, phone_uri=phone_uri)


def access_view(event: Event, locale: str) -> SimpleNamespace | None:
    """`event.access`: the access details as given, and `rows` (label, value) to print."""
    access = event.access_info
    if access is None:
        return None
    rows = [SimpleNamespace(label=label, value=value) for label, value in access_rows(access, locale)]
    return SimpleNamespace(**access.model_dump(), rows=rows)


_ACCESSIBILITY = {
    "de": {"sign_language": "Gebärdensprachdolmetschung", "captions": "Live-Untertitelung"},
    "en": {"sign_language": "sign language interpretation", "captions": "live captions"},
}


def accessibility_line(offered: Accessibility | None, locale: str) -> str | None:
    """ "Gebärdensprachdolmetschung, Live-Untertitelung; <note>" / "Sign language
    interpretation, live captions; <note>": what the details box says, or None."""
    if offered is None:
        return None
    words = _ACCESSIBILITY.get(locale, _ACCESSIBILITY["en"])
    items = [words[name] for name in ("sign_language", "captions") if getattr(offered, name)]
    line = "; ".join(part for part in (", ".join(items), offered.note or "") if part)
    return line[:1].upper() + line[1:]


def change_list(previous: Event, current: Event, locale: str) -> list[SimpleNamespace]:
    """Old and new values of what changed, worded for the attendee ("" where a value is unset)."""
    labels = CHANGE_LABELS[locale]
    rows = []
    for name in notified_changes(previous, current, locale):
        if name == "time":
            old = format_when(previous.starts_at, previous.ends_at, previous.timezone, locale)["when_zoned"]
            new = format_when(current.starts_at, current.ends_at, current.timezone, locale)["when_zoned"]
        elif name == "title":
            old, new = previous.title_in(locale), current.title_in(locale)
        elif name == "access":
            old, new = _access_difference(previous.access_info, current.access_info, locale)
        elif name == "accessibility":
            old = accessibility_line(previous.accessibility, locale) or ""
            new = accessibility_line(current.accessibility, locale) or ""
        else:
            old, new = getattr(previous, name) or "", getattr(current, name) or ""
        rows.append(SimpleNamespace(field=name, label=labels[name], old=old, new=new, withheld=False))
    return rows


def _access_difference(old: AccessInfo | None, new: AccessInfo | None, locale: str) -> tuple[str, str]:
    """Only the access details that differ, "Kenncode: 4711" → "Kenncode: 0815"; "" for none."""
    before, after = dict(access_rows(old, locale)), dict(access_rows(new, locale))
    labels = [label for label in {**before, **after} if before.get(label) != after.get(label)]

    def shown(values: dict[str, str]) -> str:
        return "; ".join(f"{label}: {values[label]}" for label in labels if label in values)

    return shown(before), shown(after)


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str
    html: str


class Renderer:
    """Renders subject, text and HTML of a kind and locale; templates are compiled once."""

    def __init__(self, template_dir: Path | None = None) -> None:
        loaders: list[jinja2.BaseLoader] = []
        if template_dir is not None:
            if not template_dir.is_dir():
                raise TemplateError(f"MAILER_TEMPLATE_DIR {template_dir} is not a directory")
            loaders.append(jinja2.FileSystemLoader(template_dir))
        # Operators may override single files; the defaults fill in the rest.
        loaders.append(jinja2.FileSystemLoader(default_template_dir()))
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,
            autoescape=jinja2.select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=False,
            auto_reload=False,
        )
        self._compiled: dict[tuple[str, str, str], jinja2.Template] = {}

    def template(self, kind: str, locale: str, part: str) -> jinja2.Template:
        key = (kind, locale, part)
        found = self._compiled.get(key)
        if found is None:
            name = f"{kind}/{_FILES[part].format(locale=locale)}"
            try:
                found = self.env.get_template(name)
            except jinja2.TemplateNotFound:
                raise TemplateError(f"template {name} not found", template=name) from None
            except jinja2.TemplateSyntaxError as exc:
                raise TemplateError(f"{name}:{exc.lineno}: {exc.message}", template=name) from None
            self._compiled[key] = found
        return found

    def render(self, kind: str, locale: str, context: dict[str, Any]) -> Rendered:
        out = {}
        for part in PARTS:
            template = self.template(kind, locale, part)
            try:
                out[part] = template.render(context)
            except jinja2.TemplateError as exc:
                raise TemplateError(f"{template.name}: {exc}", template=template.name) from None
        subject = " ".join(out["subject"].split())
        if not subject:
            raise TemplateError(f"{kind}/subject.{locale}.txt rendered empty", template=kind)
        return Rendered(subject=subject, text=out["text"].strip() + "\n", html=out["html"])


@dataclass(frozen=True, slots=True)
class Recipient:
    """What differs between the registrants of one event in a message: everything else is shared."""

    name: str
    email: str
    reference: str | None = None  # `registration.reference` in the templates
    manage_url: str | None = None  # `registration.manage_url`


_FIELDS = ("name", "email", "reference", "manage_url")
# Stand-ins for the recipient while a message is rendered once for everyone: private-use
# characters survive escaping unchanged, and the two sets differ in length so a template
# that measures or transforms a value cannot pass the equality check below.
# They span every possible length (1 and past each field's limit: 300, 254, 64, 2000).
_STAND_INS = (
    Recipient("\ue000", "\ue001", "\ue004", "\ue005"),
    Recipient("\ue002" * 301, "\ue003" * 255, "\ue006" * 65, "\ue007" * 2001),
)
_NEUTRAL = Recipient("\ue00c", "\ue00d", "\ue00e", "\ue00f")
# The private-use characters the stand-ins are made of; a real value holding one is rendered alone.
_STAND_IN_CHARS = re.compile("[\ue000-\ue00f]")


def _values(person: Recipient) -> tuple[str, ...]:
    return tuple(getattr(person, name) or "" for name in _FIELDS)


def _neutral(rendered: Rendered, stand_in: Recipient) -> tuple[str, ...]:
    parts = [rendered.subject, rendered.text, rendered.html]
    for mark, neutral in zip(_values(stand_in), _values(_NEUTRAL), strict=True):
        parts = [part.replace(mark, neutral) for part in parts]
    return tuple(parts)


def _stand_in(set_: Recipient, present: tuple[bool, ...]) -> Recipient:
    """The stand-in set for the values present; an absent name is "", an absent link None."""
    name, email, reference, manage_url = (
        value if there else None for value, there in zip(_values(set_), present, strict=True)
    )
    return Recipient(name or "", email or "", reference, manage_url)


class SharedRenderer:
    """Renders a kind once per event version and locale, then fills in each recipient.

    The templates cost hundreds of µs a mail, and everything in them but the recipient's
    name, address, booking code and management link is the same for all registrants of an
    event. A template that does more with these than print them or test them for emptiness
    (a filter, a comparison) is found in its syntax tree, and rendering with two stand-ins
    of extreme lengths must give the same result; otherwise it is rendered per recipient.
    """

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        self._shared: dict[Hashable, Rendered | None] = {}
        self._plain_cache: dict[tuple[str, str], bool] = {}

    def render(
        self,
        key: Hashable,
        kind: str,
        locale: str,
        recipient: Recipient | Attendee,
        context: Callable[[Recipient], dict[str, Any]],
    ) -> Rendered:
        """`context(recipient)` builds the full context; `key` names everything else it uses."""
        person = recipient if isinstance(recipient, Recipient) else Recipient(recipient.name, recipient.email)
        values = _values(person)
        if any(_STAND_IN_CHARS.search(value) for value in values) or not self._plain(kind, locale):
            return self.renderer.render(kind, locale, context(person))
        present = tuple(bool(value) for value in values)
        slot = (key, present)
        if slot not in self._shared:
            if len(self._shared) > 4096:
                self._shared.clear()
            self._shared[slot] = self._prepare(kind, locale, context, present)
        shared = self._shared[slot]
        if shared is None:
            return self.renderer.render(kind, locale, context(person))
        subject, text, html = shared.subject, shared.text, shared.html
        for mark, value in zip(_values(_STAND_INS[0]), values, strict=True):
            if value:
                subject, text = subject.replace(mark, value), text.replace(mark, value)
                html = html.replace(mark, str(markupsafe.escape(value)))
        return Rendered(subject=" ".join(subject.split()), text=text, html=html)

    def _plain(self, kind: str, locale: str) -> bool:
        """True if the templates only print the recipient's fields or test them for emptiness."""
        found = self._plain_cache.get((kind, locale))
        if found is None:
            names = [self.renderer.template(kind, locale, part).name for part in PARTS]
            found = all(_prints_recipient_only(self.renderer.env, n) for n in names)
            self._plain_cache[(kind, locale)] = found
        return found

    def _prepare(
        self,
        kind: str,
        locale: str,
        context: Callable[[Recipient], dict[str, Any]],
        present: tuple[bool, ...],
    ) -> Rendered | None:
        results = [
            self.renderer.render(kind, locale, context(_stand_in(set_, present))) for set_ in _STAND_INS
        ]
        if _neutral(results[0], _STAND_INS[0]) != _neutral(results[1], _STAND_INS[1]):
            return None  # the template uses a value in a way a stand-in can't carry
        return results[0]


# The names under which templates see the per-recipient values.
_RECIPIENT_NAMES = frozenset({"attendee", "registration"})


def _prints_recipient_only(env: jinja2.Environment, name: str | None, seen: set[str] | None = None) -> bool:
    """Walk a template (and what it extends or includes): are `attendee` and `registration`
    only ever printed as `{{ attendee.x }}` or tested as `{% if attendee.x %}` (or `not`)?"""
    from jinja2 import meta, nodes

    seen = seen if seen is not None else set()
    if name is None or name in seen:
        return name is not None
    seen.add(name)
    assert env.loader is not None
    source, _, _ = env.loader.get_source(env, name)
    tree = env.parse(source)

    def recipient_field(node: nodes.Node) -> bool:
        return (
            isinstance(node, nodes.Getattr)
            and isinstance(node.node, nodes.Name)
            and node.node.name in _RECIPIENT_NAMES
        )

    def fine(node: nodes.Node, parent: nodes.Node | None) -> bool:
        if isinstance(node, nodes.Name) and node.name in _RECIPIENT_NAMES:
            return False  # on its own, not as attendee.x
        tested = isinstance(parent, nodes.If) and parent.test is node
        if isinstance(node, nodes.Not) and recipient_field(node.node):
            return tested  # `{% if not registration.x %}`: still only a test for emptiness
        if recipient_field(node):
            return tested or (isinstance(parent, nodes.Output) and node in parent.nodes)
        return all(fine(child, node) for child in node.iter_child_nodes())

    if not fine(tree, None):
        return False
    return all(_prints_recipient_only(env, ref, seen) for ref in meta.find_referenced_templates(tree))


def registration_open(event: Event, now: datetime | None = None) -> bool:
    """True while others can still sign up: a registration link and the deadline not yet passed."""
    if event.registration_url is None:
        return False
    deadline = event.registration_deadline
    return deadline is None or (now or datetime.now(UTC)) < deadline


def operator_view(
    footer_address: str | None = None, privacy_url: str | None = None, imprint_url: str | None = None
) -> SimpleNamespace:
    """The `operator` object templates see: the legal sender's address as lines (`;` in
    MAILER_FOOTER_ADDRESS separates them; empty parts are dropped) and the two links."""
    lines = tuple(part.strip() for part in (footer_address or "").split(";") if part.strip())
    return SimpleNamespace(address_lines=lines, privacy_url=privacy_url, imprint_url=imprint_url)


NO_OPERATOR = operator_view()


def _withheld(
    view: SimpleNamespace, changes: list[SimpleNamespace]
) -> tuple[SimpleNamespace, list[SimpleNamespace]]:
    """The view and changes without the join link and access details."""
    # Withheld means absent: not merely unprinted by the default templates, so that no
    # template (an operator's own included) can leak the link through the context.
    view = SimpleNamespace(**{**vars(view), "join_url": None, "access": None})
    changes = [
        SimpleNamespace(**{**vars(c), "old": None, "new": None, "withheld": True})
        if c.field in ("join_url", "access")
        else c
        for c in changes
    ]
    return view, changes


def _reminder_view(event: Event, offset: Offset, locale: str) -> SimpleNamespace:
    return SimpleNamespace(
        offset=offset.iso,
        offset_seconds=offset.total_seconds,
        lead=reminder_lead(offset, locale),
        when=reminder_when(event, offset, locale),
        is_tomorrow=offset.days == 1 and offset.seconds == 0,
    )


def build_context(
    *,
    kind: str,
    locale: str,
    attendee: Attendee | Recipient,
    event: Event,
    event_view_cache: SimpleNamespace | None = None,
    previous: Event | None = None,
    offset: Offset | None = None,
    has_calendar: bool = False,
    now: datetime | None = None,
    operator: SimpleNamespace | None = None,
    reminders: ReminderTimes | None = None,
) -> dict[str, Any]:
    """The variables every template gets (see templates/README.md).

    `now` is the message's build time (default: the current time): it decides whether
    registration is still open, whether a reminder is still to come and whether a withheld
    join link is out already. `reminders` are the event's reminder times with the operator's
    default offsets (default: the event's own offsets only). `operator` is
    `operator_view(settings)`: the footer.
    """
    row = kind_named(kind)
    now = now or datetime.now(UTC)
    reminders = reminders or ReminderTimes.of(event, ())
    show_join = row.shows_join_link(event, released=reminders.released(now))
    view = event_view_cache or event_view(event, locale)
    changes = change_list(previous, event, locale) if previous is not None else []
    if not show_join:
        view, changes = _withheld(view, changes)
    # Web links beside a calendar file that adds or moves the entry, from the same data.
    links = None
    if has_calendar and row.calendar == "PUBLISH":
        links = web_links(calendar_event(event, locale, with_link=show_join))
    person = attendee if isinstance(attendee, Recipient) else None
    return {
        "locale": locale,
        "kind": kind,
        "attendee": SimpleNamespace(name=attendee.name, email=attendee.email),
        "registration": SimpleNamespace(
            reference=person.reference if person else None,
            manage_url=person.manage_url if person else None,
        ),
        "calendar_links": links,
        "event": view,
        "show_join_url": bool(show_join and event.join_url),
        "reminder": _reminder_view(event, offset, locale) if offset is not None else None,
        "changes": changes,
        "has_calendar": has_calendar,
        "registration_open": registration_open(event, now),
        "reminder_follows": reminders.follows(now),
        "operator": operator if operator is not None else NO_OPERATOR,
        "calendar_filename": CALENDAR_FILENAMES.get(locale, "event.ics"),
    }


def all_kinds_and_locales() -> list[tuple[str, str]]:
    return [(kind, locale) for kind in MESSAGE_KINDS for locale in LOCALES]
