"""Idempotency keys of the HTTP intake: the first answer to a key, replayed for 24 hours.

One string per key (its SHA-256, so a caller's key is never a Redis key name): "pending|<body
digest>" while the first request runs, then "done|<digest>|<status>|<body>". SET NX decides
which of two concurrent requests runs; the other is told to wait.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mailer.constants import IDEMPOTENCY_KEY
from mailer.state.redis_types import RedisClient

KEEP_MS = 24 * 3600 * 1000
# A first request that dies mid-way (the process killed) frees its key after this.
PENDING_MS = 60_000


@dataclass(frozen=True, slots=True)
class Earlier:
    """What an earlier request with the same key left: still running, or its answer."""

    digest: str
    status: int | None = None  # None: still running
    body: bytes = b""


def key_of(idempotency_key: str) -> str:
    return IDEMPOTENCY_KEY.format(digest=hashlib.sha256(idempotency_key.encode()).hexdigest())


async def claim(redis: RedisClient, idempotency_key: str, digest: str) -> Earlier | None:
    """None: this request runs (the key is now pending); else what the earlier one left."""
    key = key_of(idempotency_key)
    if await redis.set(key, f"pending|{digest}", px=PENDING_MS, nx=True):
        return None
    raw = await redis.get(key)
    if raw is None:  # expired between the two commands: run
        return None if await redis.set(key, f"pending|{digest}", px=PENDING_MS, nx=True) else Earlier(digest)
    state, earlier_digest, *rest = raw.split(b"|", 3)
    if state == b"pending":
        return Earlier(earlier_digest.decode())
    return Earlier(earlier_digest.decode(), int(rest[0]), rest[1])


async def finish(redis: RedisClient, idempotency_key: str, digest: str, status: int, body: bytes) -> None:
    await redis.set(key_of(idempotency_key), b"done|%s|%d|%s" % (digest.encode(), status, body), px=KEEP_MS)


async def release(redis: RedisClient, idempotency_key: str) -> None:
    """The first request failed without an answer worth keeping (Redis, a bug): retry may run."""
    await redis.delete(key_of(idempotency_key))
