"""CSV exports of survey tools as registration.created events: decoding, separators, the column
mapping, and one validated event per row with an id that is the same on every re-import."""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from mailer.errors import FieldProblem, InvalidEvent, UnreadableImport
from mailer.events import RegistrationCreated, parse_event

# What a column can fill: the registration part of the contract (mailer/events.py).
TARGETS: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "email": ("attendee", "email"),
    "name": ("attendee", "name"),
    "locale": ("attendee", "locale"),
    "reference": ("reference",),
    "manage_url": ("manage_url",),
}

# Headers taken without --map, compared casefolded without spaces, "-" and "_". `id` is never
# guessed: a survey's response number ("1", "2", ...) is not unique across events, and
# registration ids are.
_ALIASES: dict[str, frozenset[str]] = {
    "email": frozenset({"email", "emailadresse", "emailaddress", "mail", "mailadresse"}),
    "name": frozenset({"name", "vollständigername", "fullname"}),
    "locale": frozenset({"locale", "sprache", "language", "lang"}),
    "reference": frozenset({"reference", "referenz"}),
    "manage_url": frozenset({"manageurl"}),
}
# Survey forms often ask first and last name apart; the name is then both, joined by a space.
_NAME_PARTS = (("vorname", "nachname"), ("firstname", "lastname"))
_LOCALES = {"de": "de", "dede": "de", "deutsch": "de", "german": "de", "en": "en", "english": "en"}
_LOCALES |= {"englisch": "en", "engb": "en", "enus": "en"}

# Separators sniffed in this order of preference: German Excel writes ";" and decimal commas,
# so a tie goes to ";".
SEPARATORS = (";", ",", "\t")
_SNIFF_RECORDS = 20


def _key(header: str) -> str:
    return re.sub(r"[\s_\-]+", "", header.casefold())


def parse_map(values: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """`--map email=E-Mail,name=Vorname+Nachname` (given once or several times) as target ->
    source columns; UnreadableImport naming every unknown target and malformed pair."""
    spec: dict[str, tuple[str, ...]] = {}
    problems: list[str] = []
    for value in values:
        for pair in value.split(","):
            if not pair.strip():
                continue
            target, eq, source = (part.strip() for part in pair.partition("="))
            columns = tuple(c.strip() for c in source.split("+"))
            if not eq or not target or not all(columns):
                problems.append(f"{pair.strip()!r} is not FIELD=COLUMN")
            elif target not in TARGETS:
                problems.append(f"unknown field {target!r}")
            elif target in spec:
                problems.append(f"{target!r} is mapped twice")
            elif len(columns) > 1 and target != "name":
                problems.append(f"only name can join columns with '+', not {target!r}")
            else:
                spec[target] = columns
    if problems:
        raise UnreadableImport(f"{'; '.join(problems)} (fields: {', '.join(TARGETS)})")
    return spec


def load_event(data: bytes) -> dict[str, Any]:
    """The event object of an EVENT.json file (or the `event` of a whole registration.created
    event in it), checked against the contract; UnreadableImport lists every problem."""
    try:
        raw = orjson.loads(data.removeprefix(codecs.BOM_UTF8))
    except orjson.JSONDecodeError as exc:
        raise UnreadableImport(f"not valid JSON: {exc}") from None
    if isinstance(raw, dict) and raw.get("type") == "registration.created" and "event" in raw:
        raw = raw["event"]
    if not isinstance(raw, dict):
        raise UnreadableImport("must be a JSON object: the event's id, title, starts_at, ...")
    check = {"type": "event.updated", "id": "csv-check", "occurred_at": "2000-01-01T00:00:00+00:00"}
    try:
        parse_event({**check, "event": raw})
    except InvalidEvent as exc:
        raise UnreadableImport("; ".join(str(p) for p in exc.problems)) from None
    return raw


@dataclass(frozen=True, slots=True)
class Row:
    """One record of the file: where it starts, its cells, or why it could not be read."""

    line: int
    cells: list[str]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Table:
    encoding: str
    separator: str
    header: list[str]
    rows: list[Row]


def read_table(data: bytes, *, encoding: str | None = None, separator: str | None = None) -> Table:
    """The header and rows of a CSV file; UnreadableImport if it is not text or has no header."""
    text, used = _decode(data, encoding)
    if "\x00" in text:
        raise UnreadableImport("the file holds NUL bytes: it is not CSV text (a spreadsheet? save it as CSV)")
    if not text.strip():
        raise UnreadableImport("the file is empty: it needs a header row naming the columns")
    separator = separator or _sniff(text)
    records = [row for row in _rows(text, separator) if row.error or any(c.strip() for c in row.cells)]
    if not records:
        raise UnreadableImport("the file has no header row naming the columns, only empty cells")
    first = records[0]
    if first.error:
        raise UnreadableImport(f"line {first.line}: the header row cannot be read: {first.error}")
    return Table(used, separator, [c.strip() for c in first.cells], records[1:])


def _decode(data: bytes, encoding: str | None) -> tuple[str, str]:
    """The text and the name of its encoding: as given, else UTF-8 (with or without a BOM),
    UTF-16 with a BOM, else Windows-1252 (what Excel on German Windows writes)."""
    if encoding:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            raise UnreadableImport(f"unknown encoding {encoding!r} (e.g. utf-8, cp1252, latin-1)") from None
        candidates = [name]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        candidates = ["utf-16"]
    else:
        candidates = ["utf-8", "cp1252"]
    for name in candidates:
        try:
            return data.decode(name).removeprefix("\ufeff"), name
        except UnicodeDecodeError as exc:
            error = exc
    line = data[: error.start].count(b"\n") + 1
    tried = " nor ".join(candidates)
    raise UnreadableImport(
        f"not {tried} text: byte 0x{data[error.start]:02x} on line {line} (name the encoding with --encoding)"
    )


def _sniff(text: str) -> str:
    """The separator that splits the header into the most columns and every sampled row into
    as many; ties in SEPARATORS order."""
    sample = text[:65536]

    def score(separator: str) -> tuple[bool, int]:
        rows = [r for r in _rows(sample, separator) if not r.error and r.cells][:_SNIFF_RECORDS]
        if not rows:
            return (False, 0)
        width = len(rows[0].cells)
        # The sample may end inside a row: the last one does not count.
        return (all(len(r.cells) == width for r in rows[1:-1]), width)

    return max(SEPARATORS, key=score)


def _rows(text: str, separator: str) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True)
    start = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Row(start, [], _csv_error(str(exc)))
        else:
            yield Row(start, cells)
        start = reader.line_num + 1


def _csv_error(message: str) -> str:
    if message.startswith("field larger than field limit"):
        return f"a cell holds more than {csv.field_size_limit()} characters"
    if message == "unexpected end of data":
        return "a quoted cell is not closed before the end of the file"
    return f"not CSV: {message}"


@dataclass(frozen=True, slots=True)
class Columns:
    """Which header positions fill which target, and how to name them in a report."""

    positions: dict[str, tuple[int, ...]]
    header: list[str]

    def label(self, target: str) -> str:
        return "+".join(self.header[i] for i in self.positions[target])

    def describe(self) -> str:
        return ", ".join(f"{target} ← {self.label(target)}" for target in self.positions)


def resolve_columns(header: list[str], spec: dict[str, tuple[str, ...]]) -> Columns:
    """The mapped columns, and for the targets not mapped the headers that already say what they
    hold; UnreadableImport naming every missing or ambiguous column."""
    problems: list[str] = []
    positions: dict[str, tuple[int, ...]] = {}
    for target, sources in spec.items():
        found = [_find(header, source, problems) for source in sources]
        if all(i is not None for i in found):
            positions[target] = tuple(i for i in found if i is not None)
    taken = {i for found in positions.values() for i in found}
    for target, aliases in _ALIASES.items():
        if target in spec:
            continue
        matches = [i for i, h in enumerate(header) if _key(h) in aliases and i not in taken]
        if len(matches) > 1:
            shown = " and ".join(f"{header[i]!r} (column {i + 1})" for i in matches)
            problems.append(f"{shown} could each be {target}: choose one with --map {target}=COLUMN")
        elif matches:
            positions[target] = (matches[0],)
    if "name" not in positions and "name" not in spec:
        keys = [_key(h) for h in header]
        for first, last in _NAME_PARTS:
            if keys.count(first) == 1 and keys.count(last) == 1:
                positions["name"] = (keys.index(first), keys.index(last))
                break
    if "email" not in positions and "email" not in spec:
        problems.append("no email column (map one with --map email=COLUMN)")
    if problems:
        columns = ", ".join(repr(h) for h in header)
        raise UnreadableImport(f"{'; '.join(problems)}; the header has {columns}")
    return Columns(positions, header)


def _find(header: list[str], source: str, problems: list[str]) -> int | None:
    exact = [i for i, h in enumerate(header) if h == source]
    found = exact or [i for i, h in enumerate(header) if h.casefold() == source.casefold()]
    if not found:
        problems.append(f"no column {source!r}")
        return None
    if len(found) > 1:
        where = ", ".join(str(i + 1) for i in found)
        problems.append(f"column {source!r} appears {len(found)} times (columns {where}): rename one")
        return None
    return found[0]


def derived_id(prefix: str, *parts: str) -> str:
    """A contract id from `parts`, the same on every run: what makes a re-import a replay."""
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return f"{prefix}-{digest[:24]}"


@dataclass
class RowEvents:
    """Turns rows into registration.created events for one event; remembers the registrations
    of this file so a second row for one of them is refused, naming the first."""

    columns: Columns
    event: dict[str, Any]
    occurred_at: str
    _first_line: dict[str, int] = field(default_factory=dict)

    def convert(self, row: Row) -> tuple[str, dict[str, Any] | InvalidEvent]:
        """("line N", the event) or ("line N", why the row was refused)."""
        where = f"line {row.line}"
        try:
            return where, self._event(row)
        except InvalidEvent as exc:
            return where, exc

    def _event(self, row: Row) -> dict[str, Any]:
        values = self._values(row)
        registration: dict[str, Any] = {"id": "csv-pending", "attendee": {}}
        for target, value in values.items():
            if value:
                *parents, last = TARGETS[target]
                place = registration["attendee"] if parents else registration
                place[last] = value
        record = {
            "type": "registration.created",
            "id": "csv-pending",
            "occurred_at": self.occurred_at,
            "registration": registration,
            "event": self.event,
        }
        try:
            parsed = parse_event(record)
        except InvalidEvent as exc:
            raise InvalidEvent([self._named(p) for p in exc.problems]) from None
        assert isinstance(parsed, RegistrationCreated)
        event_id = str(self.event["id"])
        if "id" not in values:
            # The same address for the same event is the same registration, on every re-import.
            email = parsed.registration.attendee.email.lower()
            registration["id"] = derived_id("csv", event_id, email)
        first = self._first_line.setdefault(registration["id"], row.line)
        if first != row.line:
            target = "id" if "id" in values else "email"
            same = "registration id" if target == "id" else "address"
            raise InvalidEvent(
                [FieldProblem(self.columns.label(target), f"the same {same} as line {first}: imported once")]
            )
        record["id"] = derived_id("csv", "registration.created", event_id, registration["id"])
        return record

    def _values(self, row: Row) -> dict[str, str]:
        """Target -> the row's trimmed text (columns joined by a space); InvalidEvent for a row
        that could not be read, has another cell count than the header, or lacks a required cell."""
        if row.error:
            raise InvalidEvent([FieldProblem("(row)", row.error)])
        width = len(self.columns.header)
        # Trailing empty cells are a separator too many (some exports end every row with one).
        if len(row.cells) < width or any(c.strip() for c in row.cells[width:]):
            raise InvalidEvent([FieldProblem("(row)", f"has {len(row.cells)} cells, the header has {width}")])
        values = {
            target: " ".join(v for v in (row.cells[i].strip() for i in found) if v)
            for target, found in self.columns.positions.items()
        }
        for required in ("email", "id"):
            if required in values and not values[required]:
                raise InvalidEvent([FieldProblem(self.columns.label(required), "is empty")])
        if values.get("locale"):
            values["locale"] = _LOCALES.get(_key(values["locale"]), values["locale"])
        return values

    def _named(self, problem: FieldProblem) -> FieldProblem:
        """A contract path (registration.attendee.email) as the column that filled it (E-Mail)."""
        for target, path in TARGETS.items():
            if problem.field == ".".join(("registration", *path)) and target in self.columns.positions:
                return FieldProblem(self.columns.label(target), problem.reason)
        return problem
