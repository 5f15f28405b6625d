"""The schedule: fan-outs (reminders, change and cancel notices) due at a time, and who they reach."""

from __future__ import annotations

from typing import NamedTuple

from mailer.constants import MESSAGE_KINDS, SCHEDULE_KEY, MessageKind
from mailer.state.redis_types import RedisClient
from mailer.state.store import registrations_key


async def _due_schedule(redis: RedisClient, *, now_ms: int, limit: int) -> list[tuple[str, int]]:
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


class ScheduleMember(NamedTuple):
    """One schedule entry, "EVENT|KIND|DETAIL": a message kind for all of an event's registrations."""

    event_id: str
    kind: MessageKind
    disc: str

    @classmethod
    def parse(cls, member: str) -> ScheduleMember:
        event_id, kind, disc = member.split("|", 2)
        for known in MESSAGE_KINDS:  # narrows the kind to the Literal without a cast
            if kind == known:
                return cls(event_id, known, disc)
        raise ValueError(f"{member!r} names no message kind")


class ScheduleStore:
    """Reads due entries, removes the ones run, and pages through the registrations they reach."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._unschedule_if = redis.register_script(UNSCHEDULE_IF_SCRIPT)

    async def due(self, *, now_ms: int, limit: int) -> list[tuple[str, int]]:
        """(member, due ms) of entries due by `now_ms`, earliest first."""
        return await _due_schedule(self.redis, now_ms=now_ms, limit=limit)

    async def remove_if_still(self, member: str, due_ms: int) -> None:
        """Remove the entry unless a reschedule has moved it since it was read."""
        await self._unschedule_if(keys=[SCHEDULE_KEY], args=[member, due_ms])

    async def registrations_page(self, event_id: str, cursor: int, *, count: int) -> tuple[int, list[str]]:
        """One SSCAN page of an event's active registrations: (next cursor, 0 at the end; ids)."""
        next_cursor, raw_ids = await self.redis.sscan(registrations_key(event_id), cursor, count=count)
        return int(next_cursor), [r.decode() for r in raw_ids]
