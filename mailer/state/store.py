"""The state mailer keeps in Redis: events, registrations, message states, schedule, due index."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mailer.constants import (
    DUE_KEY,
    EVENT_KEY,
    EVENT_REGISTRATIONS_KEY,
    LOG_STREAM,
    REGISTRATION_KEY,
    SCHEDULE_KEY,
    SEEN_KEY,
)
from mailer.events import Attendee, Event
from mailer.state.messages import STATE_LUA, MessageRef, MessageState
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

    def to_fields(self) -> dict[str, str | int]:
        fields: dict[str, str | int] = {"s": self.status, "t": self.occurred_ms, "c": self.created_ms}
        if self.attendee is not None:
            # Separate short fields, not one JSON blob: Redis keeps a hash whose values are all
            # under 64 bytes as a compact listpack (~5x smaller than a hashtable).
            fields["ae"] = self.attendee.email
            fields["an"] = self.attendee.name
            fields["al"] = self.attendee.locale
        if self.event_id is not None:
            fields["e"] = self.event_id
        return fields

    @classmethod
    def from_fields(cls, registration_id: str, raw: dict[bytes, bytes]) -> StoredRegistration:
        email = raw.get(b"ae")
        event_id = raw.get(b"e")
        attendee = None
        if email is not None:
            # Stored values were validated on the way in; construct without re-validating.
            attendee = Attendee.model_construct(
                email=email.decode(), name=raw.get(b"an", b"").decode(), locale=raw.get(b"al", b"de").decode()
            )
        return cls(
            id=registration_id,
            attendee=attendee,
            event_id=event_id.decode() if event_id else None,
            status=raw.get(b"s", b"active").decode(),
            occurred_ms=int(raw.get(b"t", 0)),
            created_ms=int(raw.get(b"c", 0)),
        )


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


# Claim messages for sending, atomically per message, so two workers (or a re-run of a
# killed job) never send the same message at once. A claimed message is not yet handed
# over: only `sending`, written once a connection is free for it, means "the server may
# have it". Returns one code per message:
#   "claimed|<attempt>|<since>|<was>"    state is now claimed (attempt = its number; was =
#                                        the status before, so a re-held message logs once)
#   "reclaimed|<attempt>|<since>|<was>"  left in sending by a dead worker: resend, uncertain
#   "busy"                 another worker holds a live lease
#   "wait|<ms>"            retrying or held, not due before <ms>
#   "final|<status>"       sent, failed or skipped already
CLAIM_SCRIPT = (
    STATE_LUA
    + """
local now = tonumber(ARGV[1])
local lease_until = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS - 1 do
  local field = ARGV[2 + 2 * i - 1]
  local message_id = ARGV[2 + 2 * i]
  local raw = redis.call('HGET', KEYS[i], field)
  local status, attempts, since, aux = 'planned', 0, now, 0
  if raw then
    local _
    status, attempts, since, _, aux = decode_state(raw)
  end
  local code = nil
  if status == 'sent' or status == 'failed' or status == 'skipped' then
    code = 'final|' .. status
  elseif (status == 'sending' or status == 'claimed') and aux > now then
    code = 'busy'
  elseif (status == 'retrying' or status == 'held') and aux > now then
    code = 'wait|' .. aux
  else
    local verb = 'claimed'
    if status == 'sending' then verb = 'reclaimed' end
    attempts = attempts + 1
    redis.call('HSET', KEYS[i], field, encode_state('claimed', attempts, since, now, lease_until))
    redis.call('ZADD', KEYS[#KEYS], lease_until, message_id)
    code = verb .. '|' .. attempts .. '|' .. since .. '|' .. status
  end
  out[i] = code
end
return out
"""
)


# The send path's one round trip per mail, as a single command: record the previous
# message's outcome (state, due index, delivery log) and hand the next one over (only if
# the claim is still ours: same status and attempt, so a lane that waited past its lease
# never sends what another worker re-claimed). KEYS: due index, log stream, previous reg, next reg (either
# reg may be the empty string). Returns 1 if the next message may be sent.
STEP_SCRIPT = (
    STATE_LUA
    + """
if KEYS[3] ~= '' then
  -- Only while it is still ours: sending, with the attempt we handed over (ARGV[13]). A send
  -- that outlived its lease may have been re-claimed and even sent by another worker; its
  -- late outcome must not overwrite theirs (a stale 'retrying' over 'sent' sent it again).
  local st, at = decode_state(redis.call('HGET', KEYS[3], ARGV[1]) or nil)
  if st == 'sending' and at == tonumber(ARGV[13]) then
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
    if ARGV[3] == '1' then
      redis.call('ZREM', KEYS[1], ARGV[4])
    else
      redis.call('ZADD', KEYS[1], ARGV[5], ARGV[4])
    end
  end
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[7], '*', 'j', ARGV[6])
end
if KEYS[4] == '' then return 1 end
local status, attempts = decode_state(redis.call('HGET', KEYS[4], ARGV[8]) or nil)
if status ~= 'claimed' or attempts ~= tonumber(ARGV[9]) then return 0 end
redis.call('HSET', KEYS[4], ARGV[8], ARGV[10])
redis.call('ZADD', KEYS[1], ARGV[11], ARGV[12])
return 1
"""
)


# Write a new state for messages this worker claimed, each only while the claim still holds
# (claimed, same attempt): a claim that lapsed may belong to another worker by now, and a
# hold or skip written over its 'sending' would let a third worker send it again.
# KEYS: the registrations, then the due index; ARGV per message: field, attempt, state,
# final ('1'/'0'), due score, message id. Returns 1/0 per message.
SETTLE_SCRIPT = (
    STATE_LUA
    + """
local out = {}
for i = 1, #KEYS - 1 do
  local b = (i - 1) * 6
  local st, at = decode_state(redis.call('HGET', KEYS[i], ARGV[b + 1]) or nil)
  if st == 'claimed' and at == tonumber(ARGV[b + 2]) then
    redis.call('HSET', KEYS[i], ARGV[b + 1], ARGV[b + 3])
    if ARGV[b + 4] == '1' then
      redis.call('ZREM', KEYS[#KEYS], ARGV[b + 6])
    else
      redis.call('ZADD', KEYS[#KEYS], ARGV[b + 5], ARGV[b + 6])
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Claim:
    ref: MessageRef
    code: str  # claimed | reclaimed | busy | wait | final
    attempt: int = 0
    since_ms: int = 0
    previous: str = ""  # the status it had before this claim (claimed / reclaimed only)


class MessageStore:
    """Reads and writes message states; the one place that knows their Redis layout."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._step = redis.register_script(STEP_SCRIPT)
        self._settle = redis.register_script(SETTLE_SCRIPT)

    async def claim(self, refs: list[MessageRef], *, now_ms: int, lease_ms: int) -> list[Claim]:
        if not refs:
            return []
        keys = [registration_key(r.registration_id) for r in refs] + [DUE_KEY]
        args: list[Any] = [now_ms, now_ms + lease_ms]
        for ref in refs:
            args += [ref.field, ref.id]
        codes = await self._claim(keys=keys, args=args)
        claims = []
        for ref, raw in zip(refs, codes, strict=True):
            parts = raw.decode().split("|")
            if parts[0] in ("claimed", "reclaimed"):
                claims.append(Claim(ref, parts[0], int(parts[1]), int(parts[2]), parts[3]))
            else:
                claims.append(Claim(ref, parts[0]))
        return claims

    async def settle(self, claimed: list[tuple[MessageRef, int, MessageState]]) -> list[bool]:
        """Write each (ref, claimed attempt, new state) while its claim still holds; which did."""
        if not claimed:
            return []
        keys = [registration_key(ref.registration_id) for ref, _, _ in claimed] + [DUE_KEY]
        args: list[Any] = []
        for ref, attempt, state in claimed:
            args += [
                ref.field,
                attempt,
                state.encode(),
                "1" if state.final else "0",
                state.aux_ms or state.at_ms,
                ref.id,
            ]
        return [bool(flag) for flag in await self._settle(keys=keys, args=args)]

    def write_state(self, pipe: Pipeline, ref: MessageRef, state: MessageState) -> None:
        """Queue a state write (and the due-index update) on a pipeline."""
        pipe.hset(registration_key(ref.registration_id), ref.field, state.encode())
        if state.final:
            pipe.zrem(DUE_KEY, ref.id)
        else:
            pipe.zadd(DUE_KEY, {ref.id: state.aux_ms or state.at_ms})

    async def step(
        self,
        done: tuple[MessageRef, MessageState, bytes, int] | None,
        following: tuple[MessageRef, int, MessageState] | None,
        *,
        log_max_entries: int,
    ) -> bool:
        """Record `done` (ref, final-or-retry state, log JSON, the attempt it was handed over
        with; the state only if it is still that handover) and hand `following` (ref, claimed
        attempt, sending state) over, in one command. False: don't send `following`."""
        keys = [DUE_KEY, LOG_STREAM, "", ""]
        args: list[Any] = ["", "", "", "", 0, "", log_max_entries, "", 0, "", 0, "", 0]
        if done is not None:
            ref, state, entry, handed_attempt = done
            args[12] = handed_attempt
            keys[2] = registration_key(ref.registration_id)
            args[0:6] = [
                ref.field,
                state.encode(),
                "1" if state.final else "0",
                ref.id,
                state.aux_ms or state.at_ms,
                entry,
            ]
        if following is not None:
            ref, attempt, state = following
            keys[3] = registration_key(ref.registration_id)
            args[7:12] = [ref.field, attempt, state.encode(), state.aux_ms, ref.id]
        return bool(await self._step(keys=keys, args=args))

    async def due(self, *, now_ms: int, limit: int) -> list[str]:
        rows = await self.redis.zrangebyscore(DUE_KEY, "-inf", now_ms, start=0, num=limit)
        return [r.decode() for r in rows]

    async def postpone(self, message_ids: list[str], until_ms: int) -> None:
        if message_ids:
            await self.redis.zadd(DUE_KEY, dict.fromkeys(message_ids, until_ms), xx=True)


async def due_schedule(redis: RedisClient, *, now_ms: int, limit: int) -> list[tuple[str, int]]:
    rows = await redis.zrangebyscore(SCHEDULE_KEY, "-inf", now_ms, start=0, num=limit, withscores=True)
    return [(m.decode(), int(score)) for m, score in rows]


# Remove a schedule entry only if it still has the score we ran it for: a reschedule that
# moved it in the meantime must survive.
UNSCHEDULE_IF_SCRIPT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""
