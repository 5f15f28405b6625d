"""When to try a failed message again: SMTP reply classification and backoff with full jitter."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")


def enhanced_code(text: str) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply text ("5.1.1"), if any."""
    match = _ENHANCED.match(text or "")
    return ".".join(match.groups()) if match else None


def is_transient(code: int | None, text: str = "") -> bool:
    """True for replies worth retrying.

    4xx replies and 4.x.x enhanced codes are transient, 5xx and 5.x.x permanent. The
    enhanced code wins when the two disagree, because relays use it for the precise
    reason (a "550 4.7.1 try later" is greylisting, not a rejection).
    """
    enhanced = enhanced_code(text)
    if enhanced is not None:
        return enhanced.startswith("4")
    if code is None:
        return True  # no reply at all: connection trouble
    return 400 <= code < 500


def backoff_seconds(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before attempt `attempt + 1`, with "full jitter": uniform in [0, min(cap, base·2^(n-1))].

    Full jitter spreads a burst of failures (a relay that went down for everyone at once)
    over the whole window instead of bringing them all back in the same second.
    """
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    base_seconds: float
    max_seconds: float

    def next_attempt_ms(self, *, attempt: int, now_ms: int, deadline_ms: int) -> int | None:
        """When to try again after failed attempt number `attempt`, or None: give up."""
        if attempt >= self.max_attempts:
            return None
        at = now_ms + int(1000 * backoff_seconds(attempt, base=self.base_seconds, cap=self.max_seconds))
        return at if at < deadline_ms else None
