"""What the ops alert mails remember in Redis: one check at a time across workers, each cause's
quiet period after a mail, and the dead-letter count ops were last told of."""

from __future__ import annotations

from mailer.constants import ALERT_CHECK_KEY, ALERT_QUIET_KEY, ALERT_TOLD_DEAD_KEY
from mailer.state.redis_types import RedisClient


async def take_check(redis: RedisClient, *, worker: str, every_ms: int) -> bool:
    """True for the one worker that checks now; the others skip until `every_ms` has passed."""
    return bool(await redis.set(ALERT_CHECK_KEY, worker, nx=True, px=every_ms))


async def claim_cause(redis: RedisClient, cause: str, *, quiet_ms: int) -> bool:
    """True if no mail about `cause` went out within its quiet period; starts a new one."""
    return bool(await redis.set(ALERT_QUIET_KEY.format(cause=cause), "1", nx=True, px=quiet_ms))


async def shorten_quiet(redis: RedisClient, cause: str, *, quiet_ms: int) -> None:
    """A mail that did not go out: try again after `quiet_ms` instead of the full period."""
    await redis.set(ALERT_QUIET_KEY.format(cause=cause), "1", px=quiet_ms)


async def told_dead_letters(redis: RedisClient) -> int:
    """The dead-letter count of the last mail about them (0: none since they last fell back)."""
    return int(await redis.get(ALERT_TOLD_DEAD_KEY) or 0)


async def tell_dead_letters(redis: RedisClient, count: int) -> None:
    """Remember the count told; 0 forgets it (the set fell back under the threshold)."""
    if count:
        await redis.set(ALERT_TOLD_DEAD_KEY, count)
    else:
        await redis.delete(ALERT_TOLD_DEAD_KEY)
