"""What the planner reads and writes: producer ids seen, events, registrations, and its changes."""

from __future__ import annotations

from collections.abc import Iterable

from redis.exceptions import RedisError

from mailer.state.redis_types import RedisClient
from mailer.state.store import (
    Change,
    Loaded,
    StoredEvent,
    StoredRegistration,
    load_events,
    load_registrations,
    queue_changes,
    registrations_key,
    seen,
)

# What a Redis call can raise: a refused command, or the connection going away. The planner
# tells these (the batch's trouble: the job retries) from an event it cannot plan.
REDIS_FAILURES: tuple[type[Exception], ...] = (RedisError, OSError)


class Records:
    """The planner's view of the stored state; every Redis command it needs goes through here."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis

    async def seen(self, producer_event_ids: Iterable[str]) -> set[str]:
        """The producer event ids that were applied before (replays)."""
        return await seen(self.redis, producer_event_ids)

    async def events(self, event_ids: Iterable[str]) -> Loaded[StoredEvent]:
        return await load_events(self.redis, event_ids)

    async def registrations(self, registration_ids: Iterable[str]) -> Loaded[StoredRegistration]:
        return await load_registrations(self.redis, registration_ids)

    async def apply(self, changes: Iterable[Change]) -> None:
        """Write a batch's changes in one pipeline, in order."""
        async with self.redis.pipeline(transaction=False) as pipe:
            queue_changes(pipe, changes)
            await pipe.execute()

    async def enrolled(self, event_id: str, *, sample: int) -> tuple[int, list[str]]:
        """How many registrations an event has, and the ids of up to `sample` of them."""
        count = await self.redis.scard(registrations_key(event_id))
        ids = [m.decode() for m in await self.redis.srandmember(registrations_key(event_id), sample)]
        return int(count), ids
