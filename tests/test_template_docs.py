"""templates/README.md lists exactly the variables build_context gives the templates."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mailer.constants import MESSAGE_KINDS
from mailer.content.render import Recipient, build_context, operator_view
from mailer.durations import Offset
from mailer.events import Event
from mailer.ops.preview import SAMPLE_OPTIONAL, sample_event_with_everything, sample_previous

README = Path(__file__).parent.parent / "templates" / "README.md"
# What the templates call one item of a list (`{% for change in changes %}`).
ITEM_NAMES = {"changes": "change", "rows": "row"}
_TOKEN = re.compile(r"`([a-z_]+(?:\.[a-z_]+)*|\.[a-z_]+)`")


def variables_in(value: Any, path: str) -> set[str]:
    """`path` and the dotted names of everything under it, as a template reaches them."""
    names = {path}
    if isinstance(value, dict | SimpleNamespace) or dataclasses.is_dataclass(value):
        members = value if isinstance(value, dict) else (
            vars(value) if isinstance(value, SimpleNamespace)
            else {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        )  # fmt: skip
        for name, member in members.items():
            names |= variables_in(member, f"{path}.{name}" if path else name)
    elif isinstance(value, list | tuple) and value and not isinstance(value[0], str):
        item = ITEM_NAMES[path.rsplit(".", 1)[-1]]
        names |= variables_in(value[0], item)
    return names - {""}


def given_variables() -> set[str]:
    """Every name in the context of every kind, with every optional field and setting set."""
    sample = sample_event_with_everything()
    event = Event.model_validate(sample["event"])
    previous = Event.model_validate(sample_previous(sample))
    person = Recipient("Maria Müller", "maria@example.org", **SAMPLE_OPTIONAL["registration"])
    operator = operator_view("Stadtverwaltung; Willy-Brandt-Platz 1", "https://e.org/d", "https://e.org/i")
    names: set[str] = set()
    for kind in MESSAGE_KINDS:
        context = build_context(
            kind=kind,
            locale="de",
            attendee=person,
            event=event,
            previous=previous if kind == "event_changed" else None,
            offset=Offset.parse("P1D") if kind == "reminder" else None,
            has_calendar=kind != "reminder",
            operator=operator,
        )
        names |= variables_in(context, "")
    return names


def documented_variables() -> tuple[set[str], set[str]]:
    """(every name the Variables table documents, the names in its first column)."""
    section = README.read_text().split("## Variables", 1)[1].split("\nSets made", 1)[0]
    documented: set[str] = set()
    listed: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        name_cell, meaning = row.split("|")[1], "|".join(row.split("|")[2:])
        names = _TOKEN.findall(name_cell)
        listed |= set(names)
        documented |= set(names)
        tokens = _TOKEN.findall(meaning)
        # `row.label` counts in the row that has `.rows`; a mere mention elsewhere does not.
        items = [item for owner, item in ITEM_NAMES.items() if f".{owner}" in tokens]
        for token in tokens:
            if token.startswith("."):
                documented.add(names[0] + token)  # `.phone` in the row of `event.contact`
            elif token.split(".")[0] in items:
                documented.add(token)
    return documented, listed


def test_every_variable_the_templates_get_is_documented() -> None:
    """Each name build_context gives (objects and their members, list items as `change.x`) is
    in templates/README.md's table; an object counts as documented when its members are."""
    documented, _ = documented_variables()
    given = given_variables()
    objects = {name.rsplit(".", 1)[0] for name in given if "." in name}
    missing = {name for name in given - documented if name not in objects}
    assert not missing, f"in the context but not in templates/README.md: {sorted(missing)}"


def test_the_readme_lists_no_variable_the_templates_do_not_get() -> None:
    """Each name in the table's first column, and each member it names, exists in the context."""
    documented, _ = documented_variables()
    stale = documented - given_variables()
    assert not stale, f"in templates/README.md but not in the context: {sorted(stale)}"
