"""The seam between the send path and where mail goes: one protocol, SMTP or a Maildir behind it.

The sender sees only `Transport` and `Lane` (as httpx's client sees its transports); the
worker picks the implementation (mailer.worker.build_transport): mailer.delivery.smtp or
mailer.delivery.maildir.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Accepted:
    """The server took the message: its reply, for the delivery log."""

    code: int | None
    detail: str


class Lane(Protocol):
    """One connection (or its equivalent) held for a run of sends."""

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted: ...


class Transport(Protocol):
    """Delivers one message to one recipient; raises a DeliveryError subclass otherwise.

    `lane()` holds one of the transport's connections, so the caller can mark a message as
    handed over only once a connection is really free for it.
    """

    name: str

    def lane(self) -> contextlib.AbstractAsyncContextManager[Lane]: ...

    async def send(self, *, sender: str, recipient: str, data: bytes) -> Accepted: ...

    async def probe(self) -> None:
        """Check the relay takes connections (raises RelayFault if not); for the circuit."""
        ...

    async def close(self) -> None: ...
