"""Events and registrations in Redis: their keys, how they are stored and loaded, the planner's changes."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from mailer.constants import (
    DUE_KEY,
    EVENT_KEY,
    EVENT_REGISTRATIONS_KEY,
    REGISTRATION_KEY,
    SCHEDULE_KEY,
    SEEN_KEY,
)
from mailer.events import Attendee, Event
from mailer.state.messages import MessageRef, MessageState
from mailer.state.redis_types import Pipeline, RedisClient

__all__ = ["RedisClient"]  # re-exported: the state modules take the typed client from here


@dataclass(slots=True)
class StoredEvent:
    event: Event
    version: int  # bumped by every change an attendee can see; the calendar SEQUENCE
    occurred_ms: int  # occurred_at of the newest applied producer event
    status: str  # "active" | "cancelled"
    previous: Event | None = None  # the event before the latest visible change
    _fingerprint: str = field(default="", repr=False, compare=False)

    @property
    def fingerprint(self) -> str:
        """A digest of everything a message is built from, for the per-event caches.

        Not the version: it moves only with changes an attendee is told about, so a new
        description or organiser would leave a worker rendering the old text from its cache
        while a freshly started one renders the new.
        """
        if not self._fingerprint:
            digest = hashlib.blake2b(self.event.model_dump_json().encode(), digest_size=12)
            if self.previous is not None:
                digest.update(self.previous.model_dump_json().encode())
            digest.update(b"%d" % self.version)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def to_fields(self) -> dict[str, bytes | str | int]:
        fields: dict[str, bytes | str | int] = {
            "data": self.event.model_dump_json(),
            "v": self.version,
            "t": self.occurred_ms,
            "status": self.status,
        }
        if self.previous is not None:
            fields["prev"] = self.previous.model_dump_json()
        return fields

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> StoredEvent:
        prev = raw.get(b"prev")
        return cls(
            event=Event.model_validate_json(raw[b"data"]),
            version=int(raw[b"v"]),
            occurred_ms=int(raw[b"t"]),
            status=raw[b"status"].decode(),
            previous=Event.model_validate_json(prev) if prev else None,
        )


@dataclass(slots=True)
class StoredRegistration:
    id: str
    attendee: Attendee | None  # None for a cancellation that arrived before its registration
    event_id: str | None
    status: str  # "active" | "cancelled"
    occurred_ms: int  # occurred_at of the newest applied producer event for it
    created_ms: int  # when the person registered (occurred_at of registration.created)
    reference: str | None = None  # the registration system's booking code, shown in every mail
    manage_url: str | None = None  # where the attendee views or cancels the registration

    def to_fields(self) -> dict[str, str | int]:
        # Separate short fields, not one JSON blob, so that Redis keeps the hash as a compact
        # listpack (438 bytes against 1 072 as a hashtable, measured); longer values go in pieces.
        fields: dict[str, str | int] = {"s": self.status, "t": self.occurred_ms, "c": self.created_ms}
        if self.attendee is not None:
            # An address over 64 bytes (rare: the contract allows 254) costs this one record
            # its compact form; it stays whole because the erase script compares it.
            fields["ae"] = self.attendee.email
            fields |= pieces("an", self.attendee.name)
            fields["al"] = self.attendee.locale
        if self.event_id is not None:
            fields["e"] = self.event_id
        # Written even when empty: HSET merges, and a registration sent again without them
        # must lose the old values.
        fields |= pieces("rr", self.reference or "")
        fields |= pieces("rm", self.manage_url or "")
        return fields

    @classmethod
    def from_fields(cls, registration_id: str, raw: dict[bytes, bytes]) -> StoredRegistration:
        email = raw.get(b"ae")
        event_id = raw.get(b"e")
        reference, manage_url = joined(raw, "rr"), joined(raw, "rm")
        attendee = None
        if email is not None:
            # Stored values were validated on the way in; construct without re-validating.
            attendee = Attendee.model_construct(
                email=email.decode(), name=joined(raw, "an"), locale=raw.get(b"al", b"de").decode()
            )
        return cls(
            id=registration_id,
            attendee=attendee,
            event_id=event_id.decode() if event_id else None,
            status=raw.get(b"s", b"active").decode(),
            occurred_ms=int(raw.get(b"t", 0)),
            created_ms=int(raw.get(b"c", 0)),
            reference=reference or None,
            manage_url=manage_url or None,
        )


# Redis keeps a hash as a listpack while every value is at most 64 bytes and it has at most 128
# fields (hash-max-listpack-value/-entries); one longer value turns it into a hashtable for
# good. A management link is rarely that short, and a name or booking code in another script
# may not be either: such values are stored in pieces of at most 64 bytes, "rm", "rm.1",
# "rm.2", ..., cut between characters. A piece shorter than 61 bytes (a cut between characters
# gives up at most 3) is the last; after a last piece of 61 bytes or more comes an empty one.
# So a shorter value written over a longer one (HSET merges) ends where it should, and the
# pieces left behind it are never read. A link at the contract's limit (2 000 ASCII
# characters) takes 32 fields: the record stays compact.
PIECE_BYTES = 64
_LAST_IF_SHORTER = PIECE_BYTES - 3


def pieces(name: str, value: str) -> dict[str, str]:
    """`value` as the fields `name`, `name.1`, ... of at most PIECE_BYTES each (see above)."""
    data = value.encode()
    if len(data) < _LAST_IF_SHORTER:
        return {name: value}  # nearly every name and code: one field, nothing after it
    cuts = [0]
    while cuts[-1] < len(data):
        end = min(cuts[-1] + PIECE_BYTES, len(data))
        while end < len(data) and data[end] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
            end -= 1
        cuts.append(end)
    found = [data[start:end] for start, end in itertools.pairwise(cuts)] or [b""]
    if len(found[-1]) >= _LAST_IF_SHORTER:
        found.append(b"")
    return {piece_field(name, index): piece.decode() for index, piece in enumerate(found)}


def joined(raw: dict[bytes, bytes], name: str) -> str:
    """The value `pieces` stored under `name` ("" if none). A record written before values were
    cut has `name` alone, of any length: no `name.1` follows it, so it is read whole too."""
    data = b""
    index = 0
    while (piece := raw.get(piece_field(name, index).encode())) is not None:
        data += piece
        if len(piece) < _LAST_IF_SHORTER:
            break
        index += 1
    return data.decode()


def piece_field(name: str, index: int) -> str:
    return name if index == 0 else f"{name}.{index}"


# --- what the planner decides, applied in one pipeline -----------------------------------------
# The planner returns these instead of touching Redis; each carries its values as they were
# when it was decided (a later change in the same batch writes again, last one wins).


@dataclass(frozen=True, slots=True)
class MarkSeen:
    """A producer event id was applied: the same id again is a replay."""

    producer_event_id: str


@dataclass(frozen=True, slots=True)
class PutEvent:
    event_id: str
    fields: dict[str, bytes | str | int]


@dataclass(frozen=True, slots=True)
class PutRegistration:
    registration_id: str
    fields: dict[str, str | int]


@dataclass(frozen=True, slots=True)
class Enrol:
    """The registration is among the event's active ones (fan-outs reach it), or no longer."""

    event_id: str
    registration_id: str
    active: bool


@dataclass(frozen=True, slots=True)
class Schedule:
    """A fan-out entry ("event|kind|disc") due at `due_ms`, or removed (None)."""

    member: str
    due_ms: int | None


@dataclass(frozen=True, slots=True)
class PlanMessage:
    """A message's first state, unless it has one; looked at again at `recheck_ms` if unsent."""

    ref: MessageRef
    state: MessageState
    recheck_ms: int


Change = MarkSeen | PutEvent | PutRegistration | Enrol | Schedule | PlanMessage


def queue_changes(pipe: Pipeline, changes: Iterable[Change]) -> None:
    """Put the planner's changes on a pipeline, in order (the caller executes it)."""
    for change in changes:
        match change:
            case MarkSeen(producer_event_id):
                pipe.set(seen_key(producer_event_id), 1)
            case PutEvent(event_id, fields):
                pipe.hset(event_key(event_id), mapping=fields)
            case PutRegistration(registration_id, fields):
                pipe.hset(registration_key(registration_id), mapping=fields)
            case Enrol(event_id, registration_id, active):
                (pipe.sadd if active else pipe.srem)(registrations_key(event_id), registration_id)
            case Schedule(member, due_ms):
                if due_ms is None:
                    pipe.zrem(SCHEDULE_KEY, member)
                else:
                    pipe.zadd(SCHEDULE_KEY, {member: due_ms})
            case PlanMessage(ref, state, recheck_ms):
                pipe.hsetnx(registration_key(ref.registration_id), ref.field, state.encode())
                pipe.zadd(DUE_KEY, {ref.id: recheck_ms}, nx=True)


def event_key(event_id: str) -> str:
    return EVENT_KEY.format(event_id=event_id)


def registrations_key(event_id: str) -> str:
    return EVENT_REGISTRATIONS_KEY.format(event_id=event_id)


def registration_key(registration_id: str) -> str:
    return REGISTRATION_KEY.format(registration_id=registration_id)


def seen_key(producer_event_id: str) -> str:
    return SEEN_KEY.format(event_id=producer_event_id)


def schedule_member(event_id: str, kind: str, disc: str) -> str:
    return f"{event_id}|{kind}|{disc}"


def parse_schedule_member(member: str) -> tuple[str, str, str]:
    event_id, kind, disc = member.split("|", 2)
    return event_id, kind, disc


T = TypeVar("T")


@dataclass(slots=True)
class Loaded(Generic[T]):
    """Stored records by id, and the ones that cannot be read (written by an older version,
    edited by hand) with why: one unreadable record must fail only the work that needs it."""

    found: dict[str, T] = field(default_factory=dict)
    unreadable: dict[str, Exception] = field(default_factory=dict)


async def _load(
    redis: RedisClient, keys: dict[str, str], decode: Callable[[str, dict[bytes, bytes]], T]
) -> Loaded[T]:
    loaded: Loaded[T] = Loaded()
    if not keys:
        return loaded
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys.values():
            pipe.hgetall(key)
        rows = await pipe.execute()
    for record_id, row in zip(keys, rows, strict=True):
        if not row:
            continue
        try:
            loaded.found[record_id] = decode(record_id, row)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # ValidationError is a ValueError
            loaded.unreadable[record_id] = exc
    return loaded


async def load_events(redis: RedisClient, event_ids: Iterable[str]) -> Loaded[StoredEvent]:
    keys = {eid: event_key(eid) for eid in event_ids}
    return await _load(redis, keys, lambda _id, row: StoredEvent.from_fields(row))


async def load_registrations(
    redis: RedisClient, registration_ids: Iterable[str]
) -> Loaded[StoredRegistration]:
    keys = {rid: registration_key(rid) for rid in registration_ids}
    return await _load(redis, keys, StoredRegistration.from_fields)


async def seen(redis: RedisClient, producer_event_ids: Iterable[str]) -> set[str]:
    ids = list(dict.fromkeys(producer_event_ids))
    if not ids:
        return set()
    async with redis.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.exists(seen_key(i))
        rows = await pipe.execute()
    return {i for i, hit in zip(ids, rows, strict=True) if hit}
