"""Rendering once per event and filling in each attendee gives what a full render gives."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mailer.events import Attendee
from mailer.render import Renderer, SharedRenderer


def _context(person: Any) -> dict[str, Any]:
    return {"attendee": person, "locale": "de"}


@pytest.mark.parametrize(
    "subject",
    [
        "Hallo {{ attendee.name }} <{{ attendee.email }}>",
        "Hallo {{ attendee.name|upper }}",
        "{% if attendee.name|length > 8 %}Lang{% else %}Kurz{% endif %}",
        "{% if attendee.name %}Guten Tag {{ attendee.name }}{% else %}Guten Tag{% endif %}",
    ],
)
@pytest.mark.parametrize("name", ["Maria Müller", "", "Tom & <Jerry>", "Li"])
def test_shared_render_equals_full_render(tmp_path: Path, subject: str, name: str) -> None:
    """Whatever a template does with the name, the shared path matches rendering per attendee."""
    kind = tmp_path / "confirmation"
    kind.mkdir()
    (kind / "subject.de.txt").write_text(subject)
    (kind / "body.de.txt").write_text(subject + "\n")
    (kind / "body.de.html").write_text("<html><p>" + subject + "</p></html>")
    renderer = Renderer(tmp_path)
    shared = SharedRenderer(renderer)
    for person in (
        Attendee(email="a@example.org", name=name),
        Attendee(email="b@example.org", name=name + "x"),
    ):
        expected = renderer.render(
            "confirmation", "de", _context(SimpleNamespace(name=person.name, email=person.email))
        )
        got = shared.render(("evt", 1), "confirmation", "de", person, _context)
        assert got == expected


def test_a_comparison_on_the_name_is_rendered_per_attendee(tmp_path: Path) -> None:
    """`{% if attendee.name == "Li" %}` can't be carried by a stand-in: the syntax check catches it."""
    kind = tmp_path / "confirmation"
    kind.mkdir()
    for part in ("subject.de.txt", "body.de.txt", "body.de.html"):
        (kind / part).write_text('{% if attendee.name == "Li" %}Hallo Li{% else %}Hallo{% endif %}')
    shared = SharedRenderer(Renderer(tmp_path))
    assert shared.render(
        "k", "confirmation", "de", Attendee(email="a@example.org", name="Li"), _context
    ).subject == ("Hallo Li")
    assert shared.render(
        "k", "confirmation", "de", Attendee(email="b@example.org", name="Bo"), _context
    ).subject == ("Hallo")
