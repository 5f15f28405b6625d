"""What `mailer health` reports: is Redis reachable, and is any relay's circuit open."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from mailer.errors import QueueUnavailable
from mailer.state.circuit import CircuitState, relay_states
from mailer.state.connection import RedisTarget, where_connected
from mailer.state.redis_types import as_client

Verdict = Literal["ok", "degraded", "down"]
EXIT_STATUS: dict[Verdict, int] = {"ok": 0, "degraded": 1, "down": 2}


@dataclass(slots=True)
class Health:
    verdict: Verdict = "ok"
    lines: list[str] = field(default_factory=list)


def describe(state: CircuitState, now_ms: int) -> str:
    """One line an operator can act on."""
    if not state.open:
        return f"relay {state.relay}: ok"
    since = datetime.fromtimestamp(state.since_ms / 1000, tz=UTC).isoformat(timespec="seconds")
    wait = max(0.0, (state.until_ms - now_ms) / 1000)
    fix = f"; fix {state.setting}" if state.setting else ""
    kind = "refused (waiting will not help)" if not state.healable else "unavailable"
    return (
        f"relay {state.relay}: {kind} since {since}, {state.failures} failed probe(s), mail is held; "
        f"next probe in {wait:.0f} s; last reply: {state.reason}{fix}"
    )


async def check(where: RedisTarget | str, *, now_ms: int) -> Health:
    """Ask Redis; `down` when it cannot be reached, `degraded` while a relay circuit is open.
    The lines say which Redis was asked (passwords masked; with Sentinel, the master found)."""
    from mailer.state.queue import connect

    health = Health()
    try:
        pool = await connect(where)
    except QueueUnavailable as exc:  # its message names the Redis tried
        return Health("down", [f"redis: unreachable ({exc})"])
    redis = as_client(pool)
    try:
        await redis.ping()
        health.lines.append(f"redis: ok ({where_connected(pool.connection_pool, RedisTarget.of(where))})")
        for state in sorted(await relay_states(redis), key=lambda s: s.relay):
            health.lines.append(describe(state, now_ms))
            if state.open:
                health.verdict = "degraded"
    finally:
        await redis.aclose()
    return health
