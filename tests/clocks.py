"""A clock tests can set: injected into in-process workers, so a test moves time instead of waiting."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass
class SettableClock:
    """Now, as far as the worker is concerned; starts at the real time and moves only when told."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by

    def set(self, moment: datetime) -> None:
        self.now = moment
