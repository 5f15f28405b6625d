"""The ten texts read as a careful city communications office writes: what a native reader flagged
is gone, text and HTML say the same, and a cancellation is marked inside its details box."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from mailer.content.render import all_kinds_and_locales, event_view
from mailer.delivery.builder import Built
from mailer.events import RegistrationCreated, parse_event
from mailer.ops.preview import preview, sample_event, sample_previous
from mailer.settings import Settings
from tests.test_render import _next_zone_change

BERLIN = ZoneInfo("Europe/Berlin")
KINDS_LOCALES = all_kinds_and_locales()
CANCELLATIONS = ("registration_cancelled", "event_cancelled")
BANNERS = {
    ("event_cancelled", "de"): "ABGESAGT – Die Veranstaltung findet nicht statt.",
    ("event_cancelled", "en"): "CANCELLED – This event will not take place.",
    ("registration_cancelled", "de"): "ABGEMELDET – Sie sind nicht mehr angemeldet.",
    ("registration_cancelled", "en"): "REGISTRATION CANCELLED – You are no longer registered.",
}
# The HTML part's button and its fallback line have no counterpart in plain text.
HTML_ONLY = {
    "de": ["Online teilnehmen", "Falls die Schaltfläche nicht funktioniert, öffnen Sie diesen Link:"],
    "en": ["Join online", "If the button does not work, open this link:"],
}


class _Visible(HTMLParser):
    """The text a reader sees: no <head>, nothing inside display:none."""

    VOID = frozenset({"br", "meta", "img", "hr", "input", "link"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[bool] = []  # per open element: hidden?
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            self.parts.append(" ")
            return
        style = (dict(attrs).get("style") or "").replace(" ", "").lower()
        hidden = tag in ("head", "title") or "display:none" in style
        self.stack.append(hidden or (bool(self.stack) and self.stack[-1]))
        self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID and self.stack:
            self.stack.pop()
        self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not (self.stack and self.stack[-1]):
            self.parts.append(data)


def visible(html: str) -> str:
    parser = _Visible()
    parser.feed(html)
    return " ".join("".join(parser.parts).replace("\u00a0", " ").replace("\u034f", "").split())


def flat(text: str) -> str:
    return " ".join(text.replace("\u00a0", " ").split())


def render(settings: Settings, kind: str, locale: str, event: dict[str, Any] | None = None) -> Built:
    registration = event or sample_event()
    previous = sample_previous(registration) if kind == "event_changed" else None
    built, _ = preview(settings, kind, registration, locale, previous=previous)
    return built


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "var")


@pytest.mark.parametrize(("kind", "locale"), KINDS_LOCALES)
def test_no_phrase_the_native_reader_flagged(settings: Settings, kind: str, locale: str) -> None:
    """None of the flagged phrases in subject, text or HTML; "Wir freuen uns" at most once;
    English closes "Kind regards," with a comma; no long "(Mitteleuropäische Normalzeit)"."""
    built = render(settings, kind, locale)
    for part in (built.subject, flat(built.text), visible(built.html)):
        if locale == "de":
            assert "Teilnahme an „" not in part  # the title takes no case
            assert "Ihre Veranstaltung" not in part  # the citizen does not organise it
            assert part.count("Wir freuen uns") <= 1
            for flagged in ("entfällt", "mitteilen, dass", "abgesagt werden musste", "aktualisiert den"):
                assert flagged not in part
        else:
            for flagged in ("lapses", "has had to be", "your event", "Your event", "updates the entry"):
                assert flagged not in part
        assert "Normalzeit" not in part
        assert "Standard Time" not in part
        assert "Mitteleuropäische" not in part
        assert "Central European" not in part
    closing = "Mit freundlichen Grüßen" if locale == "de" else "Kind regards,"
    assert closing in built.text
    assert closing in visible(built.html)
    if locale == "en":
        assert "Kind regards\n" not in built.text


@pytest.mark.parametrize(("kind", "locale"), KINDS_LOCALES)
def test_text_and_html_say_the_same(settings: Settings, kind: str, locale: str) -> None:
    """Every word of the HTML a reader sees is in the text part and the other way round
    (only the button and its fallback line are HTML's own)."""
    built = render(settings, kind, locale)
    html = visible(built.html)
    for phrase in HTML_ONLY[locale]:
        html = html.replace(phrase, " ")

    def words(text: str) -> set[str]:
        # Addresses are not wording: the text part spells out the calendar web links that the
        # HTML part puts behind "Google Kalender" / "Outlook.com".
        text = re.sub(r"https?://\S+", " ", text)
        return set(re.findall(r"[^\W_]+(?:[-'’][^\W_]+)*", text))

    text = flat(re.sub(r"^[=-]{3,}$", "", built.text, flags=re.M))
    assert words(text) - words(html) == set()
    assert words(html) - words(text) == set()


@pytest.mark.parametrize("locale", ["de", "en"])
def test_the_reminder_subject_names_title_day_and_time(settings: Settings, locale: str) -> None:
    """„Erinnerung: „…“ morgen, 18:00 Uhr“ / "Reminder: “…” tomorrow, 6:00 PM" (a day ahead)."""
    built = render(settings, "reminder", locale)
    title = "Digitaler Dialog zu Weltoffenheit"
    expected = {
        "de": f"Erinnerung: „{title}“ morgen, 18:00 Uhr",
        "en": f"Reminder: “{title}” tomorrow, 6:00 PM",
    }
    assert built.subject == expected[locale]


@pytest.mark.parametrize(("kind", "locale"), KINDS_LOCALES)
def test_times_carry_the_short_zone_name(settings: Settings, kind: str, locale: str) -> None:
    """The details say e.g. "18:00–20:30 Uhr MEZ" (summer: MESZ; English CET/CEST)."""
    sample = sample_event()
    incoming = parse_event(sample)
    assert isinstance(incoming, RegistrationCreated)
    view = event_view(incoming.event, locale)
    built = render(settings, kind, locale, sample)
    assert view.when_zoned in flat(built.text)
    assert flat(view.when_zoned) in visible(built.html)


def _across_clock_change() -> datetime:
    """04:00 Berlin time on the first morning, a week or more from today, after a clock change."""
    return _next_zone_change(datetime.now(BERLIN).date() + timedelta(days=7))


@pytest.mark.parametrize("locale", ["de", "en"])
def test_an_event_across_a_clock_change_shows_both_zones(settings: Settings, locale: str) -> None:
    """A night across the clock change shows the start's and the end's zone, in text and HTML."""
    end = _across_clock_change()
    sample = sample_event()
    sample["event"]["starts_at"] = (end - timedelta(hours=8)).isoformat()
    sample["event"]["ends_at"] = end.isoformat()
    sample["event"]["registration_deadline"] = (end - timedelta(days=3)).isoformat()
    names = {"de": ("MEZ", "MESZ"), "en": ("CET", "CEST")}[locale]
    built = render(settings, "confirmation", locale, sample)
    for part in (flat(built.text), visible(built.html)):
        assert all(f" {name}" in part for name in names), part


@pytest.mark.parametrize(("kind", "locale"), KINDS_LOCALES)
def test_a_cancellation_is_marked_inside_its_details_box(settings: Settings, kind: str, locale: str) -> None:
    """Both cancellation kinds carry a banner inside the details box (HTML: the box's table;
    text: the line before "Was:"/"What:"); no other kind does."""
    built = render(settings, kind, locale)
    label = "Was" if locale == "de" else "What"
    box = re.search(
        r"<table[^>]*>(?:(?!</table>).)*?>" + label + r"</p>(?:(?!</table>).)*</table>", built.html, re.S
    )
    assert box is not None
    text_box = built.text[: built.text.index(f"{label}:")].rstrip().splitlines()[-1]
    banner = BANNERS.get((kind, locale))
    if banner is None:
        assert not any(b in built.text or b in visible(built.html) for b in BANNERS.values())
    else:
        assert banner in visible(box.group(0))
        assert text_box == banner
