"""The relay circuit: what every worker knows about the relay's health, shared through Redis.

A relay that refuses connections, answers 421, fails TLS or refuses the login says
something about itself, not about the message in hand. The first such fault *opens* the
circuit: every worker holds its sends to that relay (the held messages keep their
attempts), and once the hold has run out exactly one worker at a time *probes* the relay
by opening a connection. A probe that succeeds closes the circuit; one that fails opens
it again for twice as long (with jitter, up to MAILER_RELAY_PROBE_MAX_SECONDS), as
Postfix does for a dead destination. Messages fail only when their own deadline passes.

The count of failed probes outlives a close for a while (FAILURES_REMEMBERED_MS), so a
relay that accepts connections but keeps answering 421 backs off further each time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from mailer.constants import RELAY_CIRCUIT_KEY, RELAY_PROBE_KEY, RELAYS_KEY
from mailer.errors import RelayFault
from mailer.state.store import RedisClient

FAILURES_REMEMBERED_MS = 600_000

# Open (or re-open) the circuit. A fault reported while the circuit is already open and
# its hold still runs comes from a send that started before it opened: it only updates
# the reason. ARGV: now, base ms, cap ms, jitter in [0, 1), reason, code, setting, healable,
# relay name. KEYS[3] names every relay that ever tripped, so readers need no SCAN of the
# keyspace (a million registrations are a million keys).
_TRIP = """
redis.call('SADD', KEYS[3], ARGV[9])
local now = tonumber(ARGV[1])
local st = redis.call('HMGET', KEYS[1], 'state', 'until', 'failures', 'since')
local failures = tonumber(st[3] or '0')
local hold_until = tonumber(st[2] or '0')
local fresh = 0
if st[1] == 'open' and hold_until > now then
  redis.call('HSET', KEYS[1], 'reason', ARGV[5], 'code', ARGV[6], 'setting', ARGV[7], 'healable', ARGV[8])
  return {fresh, hold_until, failures}
end
local since = now
if st[1] == 'open' then since = tonumber(st[4] or now) else fresh = 1 end
failures = failures + 1
local delay = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ (failures - 1))
hold_until = now + math.floor(delay * (0.5 + 0.5 * tonumber(ARGV[4])))
redis.call('HSET', KEYS[1], 'state', 'open', 'until', hold_until, 'failures', failures,
  'since', since, 'reason', ARGV[5], 'code', ARGV[6], 'setting', ARGV[7], 'healable', ARGV[8])
redis.call('PERSIST', KEYS[1])
redis.call('DEL', KEYS[2])
return {fresh, hold_until, failures}
"""

# May this worker send now? {1, 0}: the circuit is closed. {2, until}: it is open and its
# hold is over, and this caller holds the probe lock (ARGV[2] token, ARGV[3] lease ms).
# {0, until}: hold (until may be past while another worker probes).
_GATE = """
local st = redis.call('HMGET', KEYS[1], 'state', 'until')
if st[1] ~= 'open' then return {1, 0} end
local hold_until = tonumber(st[2])
if hold_until > tonumber(ARGV[1]) then return {0, hold_until} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {2, hold_until} end
return {0, hold_until}
"""

# Is the circuit holding the mail? 1 while open and either its hold runs or a probe is out.
_HOLDING = """
local st = redis.call('HMGET', KEYS[1], 'state', 'until')
if st[1] ~= 'open' then return 0 end
if tonumber(st[2]) > tonumber(ARGV[1]) then return 1 end
return redis.call('EXISTS', KEYS[2])
"""

# Close after a good probe or a good send; keep the failure count for a while.
_CLOSE = """
redis.call('DEL', KEYS[2])
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_at', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""


class Gate(Enum):
    SEND = 1
    PROBE = 2
    HOLD = 0


@dataclass(frozen=True, slots=True)
class CircuitState:
    """The relay's health as every worker sees it (for `mailer health` and the log)."""

    relay: str
    open: bool = False
    until_ms: int = 0  # open: no send and no probe before this
    failures: int = 0  # faults in a row (probes included)
    since_ms: int = 0  # open: when it opened
    reason: str = ""
    code: int | None = None
    setting: str | None = None  # the MAILER_ setting(s) an operator must fix, if any
    healable: bool = True


@dataclass(frozen=True, slots=True)
class Trip:
    until_ms: int
    failures: int
    fresh: bool  # the circuit was closed before this fault


class RelayCircuit:
    """One relay's circuit; `base_ms`/`cap_ms` bound the hold between probes."""

    def __init__(
        self, redis: RedisClient, *, relay: str, base_ms: int, cap_ms: int, rng: random.Random | None = None
    ) -> None:
        self.redis = redis
        self.relay = relay
        self.base_ms = base_ms
        self.cap_ms = cap_ms
        self._rng = rng or random.Random()
        self._keys = [RELAY_CIRCUIT_KEY.format(relay=relay), RELAY_PROBE_KEY.format(relay=relay)]
        self._trip = redis.register_script(_TRIP)
        self._gate = redis.register_script(_GATE)
        self._close = redis.register_script(_CLOSE)
        self._holding = redis.register_script(_HOLDING)

    async def gate(self, *, now_ms: int, token: str, probe_lease_ms: int) -> tuple[Gate, int]:
        """Send, probe, or hold (with the hold's end); one round trip."""
        code, until = await self._gate(keys=self._keys, args=[now_ms, token, probe_lease_ms])
        return Gate(int(code)), int(until)

    async def trip(self, fault: RelayFault, *, now_ms: int) -> Trip:
        """Record a relay fault: open the circuit or, after a failed probe, hold it longer."""
        args = [
            now_ms,
            self.base_ms,
            self.cap_ms,
            self._rng.random(),
            fault.detail[:500],
            fault.code if fault.code is not None else "",
            fault.setting or "",
            "1" if fault.healable else "0",
            self.relay,
        ]
        fresh, until, failures = await self._trip(keys=[*self._keys, RELAYS_KEY], args=args)
        return Trip(until_ms=int(until), failures=int(failures), fresh=bool(int(fresh)))

    async def close(self, *, now_ms: int) -> bool:
        """The relay works again; True if the circuit was open."""
        return bool(await self._close(keys=self._keys, args=[now_ms, FAILURES_REMEMBERED_MS]))

    async def holding(self, *, now_ms: int) -> bool:
        """True while no message should even be tried: the hold runs, or a probe is out."""
        return bool(await self._holding(keys=self._keys, args=[now_ms]))

    async def state(self) -> CircuitState:
        raw = await self.redis.hgetall(self._keys[0])
        return circuit_state(self.relay, raw)


def circuit_state(relay: str, raw: dict[bytes, bytes]) -> CircuitState:
    """Decode the circuit hash (an empty one is a closed circuit)."""
    if raw.get(b"state") != b"open":
        return CircuitState(relay=relay, failures=int(raw.get(b"failures", 0)))
    code = raw.get(b"code", b"")
    return CircuitState(
        relay=relay,
        open=True,
        until_ms=int(raw.get(b"until", 0)),
        failures=int(raw.get(b"failures", 0)),
        since_ms=int(raw.get(b"since", 0)),
        reason=raw.get(b"reason", b"").decode(errors="replace"),
        code=int(code) if code.isdigit() else None,
        setting=raw.get(b"setting", b"").decode() or None,
        healable=raw.get(b"healable", b"1") == b"1",
    )


async def relay_states(redis: RedisClient) -> list[CircuitState]:
    """Every relay circuit Redis holds (ops surfaces: `mailer health`, /readyz, /metrics, the
    dashboard): the relays that ever tripped, less those whose circuit has expired since."""
    relays = sorted(r.decode() for r in await redis.smembers(RELAYS_KEY))
    async with redis.pipeline(transaction=False) as pipe:
        for relay in relays:
            pipe.hgetall(RELAY_CIRCUIT_KEY.format(relay=relay))
        found = await pipe.execute() if relays else []
    return [circuit_state(relay, raw) for relay, raw in zip(relays, found, strict=True) if raw]
