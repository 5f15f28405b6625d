"""Writes that mailer acts on outside Redis (a mail handed to the relay, an event acknowledged
to its producer), confirmed by replicas first when MAILER_REDIS_MIN_REPLICAS asks for it.

Redis replicates asynchronously: a master that dies, or is demoted while it still takes writes
(a Sentinel switchover, a partition), loses what its replicas had not yet received, and the
promoted replica knows nothing of it. A mail sent on the strength of a lost `sending` mark
would be sent again without the `uncertain` entry that owns up to it; an event acknowledged on
the strength of a lost write would never be sent. WAIT closes that gap at the two places it
matters: nothing is sent, and nothing acknowledged, before a replica holds it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from mailer.errors import QueueUnavailable
from mailer.state.redis_types import RedisClient

# A healthy replica confirms within milliseconds; past this, it is gone or far behind.
REPLICA_WAIT_MS = 2000


@contextlib.asynccontextmanager
async def one_connection(redis: RedisClient, *, replicas: int) -> AsyncIterator[RedisClient]:
    """`redis` itself; or, with replicas to wait for, a client holding one pooled connection for
    the block: WAIT counts only the writes of the connection it runs on, and a pool would hand
    the write and the WAIT to different ones."""
    if replicas <= 0:
        yield redis
        return
    async with redis.client() as pinned:
        yield pinned


async def confirm_replicated(redis: RedisClient, *, replicas: int, what: str) -> None:
    """Return once `replicas` replicas hold every write made on this connection (one from
    one_connection); else raise QueueUnavailable (an outage: the caller neither sends nor
    acknowledges). 0: no wait."""
    if replicas <= 0:
        return
    confirmed = int(await redis.wait(replicas, REPLICA_WAIT_MS))
    if confirmed < replicas:
        # This connection's server may be a master the Sentinels have replaced (its replica
        # promoted, itself not yet demoted): reconnecting asks them again.
        connection: Any = getattr(redis, "connection", None)
        if connection is not None:
            await connection.disconnect()
        raise QueueUnavailable(
            f"only {confirmed} of {replicas} Redis replica(s) confirmed {what} within "
            f"{REPLICA_WAIT_MS} ms (MAILER_REDIS_MIN_REPLICAS): not acted on until one does"
        )


class ReplicaGate:
    """confirm_replicated for a worker's many concurrent sends: after a WAIT that came back
    short, the hand-overs of the next REPLICA_WAIT_MS fail at once instead of each holding an
    SMTP connection for a WAIT of its own (they queue behind each other for those)."""

    def __init__(self, replicas: int) -> None:
        self.replicas = replicas
        self._behind_until = 0.0
        self._reason = ""

    async def confirm(self, redis: RedisClient, *, what: str) -> None:
        if self.replicas <= 0:
            return
        if time.monotonic() < self._behind_until:
            raise QueueUnavailable(self._reason)
        try:
            await confirm_replicated(redis, replicas=self.replicas, what=what)
        except QueueUnavailable as exc:
            self._behind_until = time.monotonic() + REPLICA_WAIT_MS / 1000
            self._reason = str(exc)
            raise
