"""Message identity and per-message state: the key that makes "planned once, sent once" hold."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, cast

from mailer.constants import MESSAGE_KINDS, MessageKind

# held: waiting for the relay circuit or the rate limit (aux = until); attempts not counted.
Status = Literal["planned", "claimed", "sending", "sent", "retrying", "held", "failed", "skipped"]
FINAL_STATUSES: frozenset[str] = frozenset({"sent", "failed", "skipped"})


@dataclass(frozen=True, slots=True)
class MessageRef:
    """One message: registration + kind + discriminator (reminder offset and time, event version).

    Its `id` ("reg-1001/reminder/P1D/20261209T170000Z") is the message key everywhere:
    the Redis state field, the delivery log, `mailer retry`, and the seed of the Message-ID.
    """

    registration_id: str
    kind: MessageKind
    disc: str = ""

    @property
    def id(self) -> str:
        base = f"{self.registration_id}/{self.kind}"
        return f"{base}/{self.disc}" if self.disc else base

    @property
    def field(self) -> str:
        """The field in the registration hash that holds this message's state."""
        return f"m:{self.kind}/{self.disc}" if self.disc else f"m:{self.kind}"

    @classmethod
    def parse(cls, message_id: str) -> MessageRef:
        parts = message_id.split("/", 2)
        if len(parts) < 2 or parts[1] not in MESSAGE_KINDS or not parts[0]:
            raise ValueError(f"{message_id!r} is not a message id (REGISTRATION/KIND[/DETAIL])")
        kind = parts[1]  # narrowed to MessageKind by the membership check above
        return cls(parts[0], kind, parts[2] if len(parts) == 3 else "")

    def header_id(self, domain: str) -> str:
        """A Message-ID value (without brackets), the same for every attempt of this message."""
        digest = hashlib.blake2b(self.id.encode(), digest_size=12).hexdigest()
        return f"{self.kind}.{digest}@{domain}"


# The same encoding for the Lua scripts that read and write states (mailer.state.store): each
# script starts with this snippet, so the layout is spelled out here and in MessageState only.
# It carries no version: every worker reads a state as it is (none can leave it for a newer
# one), so a release may change it only readers first (deploy/README.md, "Upgrading"). A status
# a worker does not know is claimed like `planned` by its claim script: a new status needs a
# release whose scripts know it before any release writes it.
# A string that is not a state decodes to nil fields, and the script errors on them, as the
# Python decode raises: a state written by hand is never taken for a valid one.
STATE_LUA = """
local function decode_state(raw)
  if not raw then return nil end
  local status, attempts, since, at, aux =
    string.match(raw, '^([^|]+)|([^|]+)|([^|]+)|([^|]+)|([^|]+)$')
  return status, tonumber(attempts), tonumber(since), tonumber(at), tonumber(aux)
end
local function encode_state(status, attempts, since, at, aux)
  return status .. '|' .. attempts .. '|' .. since .. '|' .. at .. '|' .. aux
end
"""


@dataclass(frozen=True, slots=True)
class MessageState:
    """What happened to one message so far, stored as one compact string per message."""

    status: Status
    attempts: int = 0
    since_ms: int = 0  # when it was first planned: the start of its TTL
    at_ms: int = 0  # last change
    aux_ms: int = 0  # sending: lease end; retrying: next attempt; held: until

    def encode(self) -> str:
        return f"{self.status}|{self.attempts}|{self.since_ms}|{self.at_ms}|{self.aux_ms}"

    @classmethod
    def decode(cls, raw: bytes | str) -> MessageState:
        text = raw.decode() if isinstance(raw, bytes) else raw
        status, attempts, since, at, aux = text.split("|")
        return cls(cast(Status, status), int(attempts), int(since), int(at), int(aux))

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES
