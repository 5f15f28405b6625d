"""The event contract: what a registration system hands mailer, validated with pydantic."""

from __future__ import annotations

import contextlib
import re
import unicodedata
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from mailer.constants import ID_PATTERN
from mailer.durations import Offset, parse_offsets
from mailer.errors import FieldProblem, InvalidEvent


def _no_control_characters(value: str) -> str:
    # Anything that ends up in a header must not be able to start a new header line.
    if value.isprintable():
        return value  # the common case: no Cc, Zl or Zp is printable, so nothing to look for
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            raise ValueError(f"must not contain control characters or line breaks (found {ch!r})")
    return value


def _no_control_characters_but_newlines(value: str) -> str:
    _no_control_characters(value.replace("\n", " ").replace("\r", " ").replace("\t", " "))
    return value


# A dot-atom local part of plain ASCII: what nearly every real address has. Anything else
# (quoted, non-ASCII, odd) takes email-validator's whole path.
_PLAIN_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


@lru_cache(maxsize=65536)
def _ascii_domain(domain: str) -> str:
    # email-validator's domain checks (IDNA, special-use names, label rules) cost ~20 µs and
    # depend on the domain alone, so they run once per domain, not once per attendee.
    result = validate_email(f"postmaster@{domain}", check_deliverability=False, allow_smtputf8=False)
    return str(result.ascii_domain)


@lru_cache(maxsize=65536)
def _validate_fully(value: str) -> str:
    try:
        result = validate_email(value, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ValueError(f"{value!r} is not a valid email address: {exc}") from None
    # ascii_email has internationalised domains in their xn-- form, which every relay accepts.
    return result.ascii_email or result.normalized


def _normalise_email(value: str) -> str:
    """email-validator's verdict and normal form (tests hold the fast path to it exactly)."""
    local, at, domain = value.rpartition("@")
    if at and len(local) <= 64 and _PLAIN_LOCAL.match(local):
        try:
            address = f"{local}@{_ascii_domain(domain)}"
        except EmailNotValidError:
            pass  # the full path raises with email-validator's own explanation
        else:
            if len(address) <= 254:
                return address
    return _validate_fully(value)


def _email(value: str) -> str:
    _no_control_characters(value)
    return _normalise_email(value)


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone name (e.g. Europe/Berlin)") from None
    return value


def _http_url(value: str) -> str:
    _no_control_characters(value)
    if not value.startswith(("https://", "http://")) or len(value) < 11 or " " in value:
        raise ValueError("must be an http(s) URL without spaces")
    return value


# Every moment in the contract lies in this range, so every date derived from it (reminders
# up to P366D earlier, millisecond scores, calendar entries) can be computed.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
_ISO_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\d[Tt ]")
_LAX_MOMENT: TypeAdapter[datetime] = TypeAdapter(AwareDatetime)


def _iso_text(value: object) -> object:
    # pydantic's strict mode takes no strings from Python input, and its JSON mode reads a
    # string of digits as Unix time: so the text is parsed here, and only ISO 8601 text.
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_DATE_TIME.match(value):
        raise ValueError(
            "must be an ISO 8601 date and time with a UTC offset, e.g. 2026-12-10T18:00:00+01:00 "
            "(a number is not a timestamp)"
        )
    return _LAX_MOMENT.validate_python(value)


def _in_range(value: datetime) -> datetime:
    if not EARLIEST <= value < LATEST:
        raise ValueError("must lie between 2000-01-01 and 2100-01-01 (UTC)")
    return value


Moment = Annotated[
    AwareDatetime,
    BeforeValidator(_iso_text),
    Strict(),
    AfterValidator(_in_range),
    Field(
        description="ISO 8601 date and time with a UTC offset, from 2000-01-01 up to "
        "2100-01-01 (UTC); numbers are not accepted"
    ),
]
StrictBool = Annotated[bool, Strict(), Field(description="JSON true or false; no strings, no numbers")]
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Line = Annotated[str, StringConstraints(max_length=300), AfterValidator(_no_control_characters)]
Title = Annotated[
    str, StringConstraints(min_length=1, max_length=300), AfterValidator(_no_control_characters)
]
Email = Annotated[str, StringConstraints(max_length=254), AfterValidator(_email)]
Url = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_http_url)]
Text = Annotated[str, StringConstraints(max_length=5000), AfterValidator(_no_control_characters_but_newlines)]
TimeZoneName = Annotated[str, AfterValidator(_timezone)]
# A booking code as the registration system prints it ("KL-2026-0815"): short, one line.
Reference = Annotated[
    str, StringConstraints(min_length=1, max_length=64), AfterValidator(_no_control_characters)
]
_PHONE = re.compile(r"\+?[0-9][0-9 ()/.\-]{2,38}\Z")


def _phone(value: str) -> str:
    if not _PHONE.match(value) or sum(ch.isdigit() for ch in value) < 3:
        raise ValueError('must be a phone number of digits, spaces and ( ) / . - (e.g. "+49 631 365-0")')
    return value


Phone = Annotated[str, AfterValidator(_phone)]
Locale = Literal["de", "en"]


class _Model(BaseModel):
    # Unknown fields are refused: a misspelt "reminder_offset" must not be silently ignored,
    # and attendee data we do not need should not be stored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Attendee(_Model):
    email: Email
    name: Line = ""
    locale: Literal["de", "en"] = "de"


class Organizer(_Model):
    name: Title
    email: Email


class Registration(_Model):
    id: Id
    attendee: Attendee
    # Shown in every mail about this registration, so the attendee can quote it.
    reference: Reference | None = None
    # Where the attendee views or cancels the registration; without it, mails say "email us".
    manage_url: Url | None = None


class RegistrationRef(_Model):
    id: Id


class Event(_Model):
    id: Id
    title: Title
    starts_at: Moment
    ends_at: Moment
    timezone: TimeZoneName
    location: Line | None = None
    join_url: Url | None = None
    description: Text | None = None
    organizer: Organizer
    registration_deadline: Moment | None = None
    # Where others can sign up: the confirmation asks to pass the event on while registration is open.
    registration_url: Url | None = None
    # None: the MAILER_REMINDER_OFFSETS default; []: no reminders for this event.
    reminder_offsets: list[str] | None = Field(
        default=None,
        description="ISO 8601 durations before starts_at, e.g. P1D, PT1H: at most 10, "
        "each at most P366D, none twice",
    )
    join_url_in_confirmation: StrictBool = True
    url: Url | None = None  # the event's own page
    contact: Contact | None = None
    access_info: AccessInfo | None = None
    accessibility: Accessibility | None = None
    # The title and description in other languages: {"en": "..."}; a locale not listed gets
    # the main `title` / `description`.
    title_i18n: dict[Locale, Title] | None = None
    description_i18n: dict[Locale, Text] | None = None

    @field_validator("reminder_offsets")
    @classmethod
    def _check_offsets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            parse_offsets(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> Event:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self

    def offsets(self, default: tuple[Offset, ...]) -> tuple[Offset, ...]:
        """The reminder offsets that apply to this event."""
        return default if self.reminder_offsets is None else parse_offsets(self.reminder_offsets)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def title_in(self, locale: str) -> str:
        """The title in `locale`, or the main one."""
        return _translated(self.title_i18n, locale) or self.title

    def description_in(self, locale: str) -> str | None:
        """The description in `locale`, or the main one."""
        return _translated(self.description_i18n, locale) or self.description


def _translated(texts: dict[Locale, str] | None, locale: str) -> str | None:
    for known, text in (texts or {}).items():  # at most two: a scan, no cast from str to Locale
        if known == locale:
            return text
    return None


class _AtLeastOne(_Model):
    @model_validator(mode="after")
    def _not_empty(self) -> _AtLeastOne:
        if all(value in (None, False) for value in self.__dict__.values()):
            raise ValueError(f"give at least one of {', '.join(type(self).model_fields)}")
        return self


class Contact(_AtLeastOne):
    """Whom attendees ask, when it is not the organiser's address (a person, a hotline)."""

    name: Line | None = None
    email: Email | None = None
    phone: Phone | None = None


class AccessInfo(_AtLeastOne):
    """How to get into an online event besides the link; withheld exactly like the link."""

    platform: Line | None = None
    meeting_id: Line | None = None
    passcode: Line | None = None
    dial_in: Line | None = None


class Accessibility(_AtLeastOne):
    """What the event offers for access: a line in every mail's details."""

    sign_language: StrictBool = False
    captions: StrictBool = False
    note: Line | None = None


class EventRef(_Model):
    id: Id


class _Envelope(_Model):
    id: Id
    occurred_at: Moment


class RegistrationCreated(_Envelope):
    type: Literal["registration.created"]
    registration: Registration
    event: Event


class RegistrationCancelled(_Envelope):
    type: Literal["registration.cancelled"]
    registration: RegistrationRef


class EventUpdated(_Envelope):
    type: Literal["event.updated"]
    event: Event


class EventCancelled(_Envelope):
    type: Literal["event.cancelled"]
    event: EventRef | Event


IncomingEvent = Annotated[
    Union[RegistrationCreated, RegistrationCancelled, EventUpdated, EventCancelled],  # noqa: UP007
    Field(discriminator="type"),
]
EVENT_TYPES = ("registration.created", "registration.cancelled", "event.updated", "event.cancelled")
_adapter: TypeAdapter[IncomingEvent] = TypeAdapter(IncomingEvent)


def _problems(exc: ValidationError) -> list[FieldProblem]:
    problems = []
    for error in exc.errors(include_url=False):
        # Drop the discriminator tag pydantic puts in the path ("registration.created").
        loc = [str(p) for p in error["loc"] if str(p) not in EVENT_TYPES]
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "union_tag_invalid":
            message = f"must be one of {', '.join(EVENT_TYPES)}"
            loc = ["type"]
        elif error["type"] == "union_tag_not_found":
            loc, message = ["type"], "is missing"
        elif error["type"] == "missing":
            message = "is required"
        elif error["type"] == "string_pattern_mismatch":
            message = "must be 1-128 characters of letters, digits and . _ : @ + - (no spaces, / or |)"
        problems.append(FieldProblem(".".join(loc) or "(record)", message))
    return problems


def parse_event(data: bytes | str | dict[str, Any]) -> IncomingEvent:
    """Validate one event (JSON text or an already-decoded dict); InvalidEvent lists every problem."""
    try:
        raw = orjson.loads(data) if isinstance(data, bytes | str) else data
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent([FieldProblem("(record)", f"not valid JSON: {exc}")]) from None
    if not isinstance(raw, dict):
        raise InvalidEvent([FieldProblem("(record)", "must be a JSON object")])
    event = raw.get("event")
    if isinstance(event, dict) and raw.get("type") in ("registration.created", "event.updated"):
        # A bulk import repeats the same event object for every registration: validate it
        # once. An invalid one falls through to the full validation below for its messages.
        with contextlib.suppress(ValidationError, TypeError):
            raw = {**raw, "event": _event_from_json(orjson.dumps(event))}
    try:
        return _adapter.validate_python(raw)
    except ValidationError as exc:
        event_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        raise InvalidEvent(_problems(exc), event_id=event_id) from None


@lru_cache(maxsize=1024)
def _event_from_json(data: bytes) -> Event:
    return Event.model_validate_json(data)


def json_schema() -> dict[str, Any]:
    """The contract as JSON Schema (what `mailer schema` prints)."""
    schema = _adapter.json_schema()
    schema["title"] = "mailer event"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
