"""Message states in Redis: claiming, handing over, settling, and the due index, each in one script.

The state string itself (status|attempts|since|at|aux) is defined in mailer.state.messages,
for Python and for the scripts here; this module owns the commands that move it along.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailer.constants import DUE_KEY, SEND_STATS_KEY
from mailer.state.deliverylog import LOG_APPEND_LUA, LOG_ARGS, LOG_KEYS, LogAppend
from mailer.state.messages import STATE_LUA, MessageRef, MessageState
from mailer.state.redis_types import RedisClient
from mailer.state.store import registration_key

# Claim messages for sending, atomically per message, so two workers (or a re-run of a
# killed job) never send the same message at once. A claimed message is not yet handed
# over: only `sending`, written once a connection is free for it, means "the server may
# have it". Returns one code per message:
#   "claimed|<attempt>|<since>|<was>"    state is now claimed (attempt = its number; was =
#                                        the status before, so a re-held message logs once)
#   "reclaimed|<attempt>|<since>|<was>"  left in sending by a dead worker: resend, uncertain
#   "busy"                 another worker holds a live lease
#   "wait|<ms>"            retrying or held, not due before <ms>
#   "final|<status>"       sent, failed or skipped already
CLAIM_SCRIPT = (
    STATE_LUA
    + """
local now = tonumber(ARGV[1])
local lease_until = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS - 1 do
  local field = ARGV[2 + 2 * i - 1]
  local message_id = ARGV[2 + 2 * i]
  local raw = redis.call('HGET', KEYS[i], field)
  local status, attempts, since, aux = 'planned', 0, now, 0
  if raw then
    local _
    status, attempts, since, _, aux = decode_state(raw)
  end
  local code = nil
  if status == 'sent' or status == 'failed' or status == 'skipped' then
    code = 'final|' .. status
    -- Nothing is left to do for it: a due entry planned again over a final state (a
    -- registration sent again) would otherwise be re-driven every minute for good.
    redis.call('ZREM', KEYS[#KEYS], message_id)
  elseif (status == 'sending' or status == 'claimed') and aux > now then
    code = 'busy'
  elseif (status == 'retrying' or status == 'held') and aux > now then
    code = 'wait|' .. aux
  else
    local verb = 'claimed'
    if status == 'sending' then verb = 'reclaimed' end
    attempts = attempts + 1
    redis.call('HSET', KEYS[i], field, encode_state('claimed', attempts, since, now, lease_until))
    redis.call('ZADD', KEYS[#KEYS], lease_until, message_id)
    code = verb .. '|' .. attempts .. '|' .. since .. '|' .. status
  end
  out[i] = code
end
return out
"""
)


# The send path's one round trip per mail, as a single command: record the previous
# message's outcome (state, due index, delivery log) and hand the next one over (only if
# the claim is still ours: same status and attempt, so a lane that waited past its lease
# never sends what another worker re-claimed). KEYS: due index, previous reg, next reg (either
# reg may be the empty string), then the log append's keys (deliverylog.append_parts), then the
# send counters (sendstats; '' for none); ARGV: the previous message's field, state, final, id,
# due score and handed-over attempt, the next one's field, attempt, state, lease end and id,
# then the log append's arguments, then the two counter fields of the previous attempt.
# Returns 1 if the next message may be sent.
_STATS_KEY = 4 + LOG_KEYS
_STATS_ARG = 12 + LOG_ARGS
STEP_SCRIPT = (
    STATE_LUA
    + LOG_APPEND_LUA
    + f"""
local stats, stat = KEYS[{_STATS_KEY}], {_STATS_ARG}
"""
    + """
if KEYS[2] ~= '' then
  -- Only while it is still ours: sending, with the attempt we handed over (ARGV[6]). A send
  -- that outlived its lease may have been re-claimed and even sent by another worker; its
  -- late outcome must not overwrite theirs (a stale 'retrying' over 'sent' sent it again).
  local st, at = decode_state(redis.call('HGET', KEYS[2], ARGV[1]) or nil)
  if st == 'sending' and at == tonumber(ARGV[6]) then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
    if ARGV[3] == '1' then
      redis.call('ZREM', KEYS[1], ARGV[4])
    else
      redis.call('ZADD', KEYS[1], ARGV[5], ARGV[4])
    end
  end
  log_append(KEYS, 4, ARGV, 12)
  -- The attempt counts whoever holds the message now: it was made either way.
  if stats ~= '' then
    redis.call('HINCRBY', stats, ARGV[stat], 1)
    redis.call('HINCRBY', stats, ARGV[stat + 1], 1)
  end
end
if KEYS[3] == '' then return 1 end
local status, attempts = decode_state(redis.call('HGET', KEYS[3], ARGV[7]) or nil)
if status ~= 'claimed' or attempts ~= tonumber(ARGV[8]) then return 0 end
redis.call('HSET', KEYS[3], ARGV[7], ARGV[9])
redis.call('ZADD', KEYS[1], ARGV[10], ARGV[11])
return 1
"""
)


# Write a new state for messages this worker claimed, each only while the claim still holds
# (claimed, same attempt): a claim that lapsed may belong to another worker by now, and a
# hold or skip written over its 'sending' would let a third worker send it again.
# KEYS: the registrations, then the due index; ARGV per message: field, attempt, state,
# final ('1'/'0'), due score, message id. Returns 1/0 per message.
SETTLE_SCRIPT = (
    STATE_LUA
    + """
local out = {}
for i = 1, #KEYS - 1 do
  local b = (i - 1) * 6
  local st, at = decode_state(redis.call('HGET', KEYS[i], ARGV[b + 1]) or nil)
  if st == 'claimed' and at == tonumber(ARGV[b + 2]) then
    redis.call('HSET', KEYS[i], ARGV[b + 1], ARGV[b + 3])
    if ARGV[b + 4] == '1' then
      redis.call('ZREM', KEYS[#KEYS], ARGV[b + 6])
    else
      redis.call('ZADD', KEYS[#KEYS], ARGV[b + 5], ARGV[b + 6])
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Claim:
    ref: MessageRef
    code: str  # claimed | reclaimed | busy | wait | final
    attempt: int = 0
    since_ms: int = 0
    previous: str = ""  # the status it had before this claim (claimed / reclaimed only)


# Re-drive (`mailer retry`): a message goes back to planned only from failed or skipped, checked
# in the same script, so a sent message is never planned (and sent) again, nor one in flight.
# KEYS: registration hashes, then the due index; ARGV[1] now, then (field, message id) per
# message. Returns the status each had ("" for none).
REDRIVABLE = ("failed", "skipped")
REPLAN_SCRIPT = (
    STATE_LUA
    + """
local now = ARGV[1]
local due = KEYS[#KEYS]
local out = {}
for i = 1, #KEYS - 1 do
  local field, message = ARGV[2 * i], ARGV[2 * i + 1]
  local status = decode_state(redis.call('HGET', KEYS[i], field))
  if status == 'failed' or status == 'skipped' then
    redis.call('HSET', KEYS[i], field, encode_state('planned', 0, now, now, now))
    redis.call('ZADD', due, now, message)
  end
  out[i] = status or ''
end
return out
"""
)


class MessageStore:
    """Reads and writes message states; the one place that knows their Redis layout."""

    def __init__(self, redis: RedisClient) -> None:
        self.redis = redis
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._step = redis.register_script(STEP_SCRIPT)
        self._settle = redis.register_script(SETTLE_SCRIPT)
        self._replan = redis.register_script(REPLAN_SCRIPT)

    async def claim(self, refs: list[MessageRef], *, now_ms: int, lease_ms: int) -> list[Claim]:
        if not refs:
            return []
        keys = [registration_key(r.registration_id) for r in refs] + [DUE_KEY]
        args: list[Any] = [now_ms, now_ms + lease_ms]
        for ref in refs:
            args += [ref.field, ref.id]
        codes = await self._claim(keys=keys, args=args)
        claims = []
        for ref, raw in zip(refs, codes, strict=True):
            parts = raw.decode().split("|")
            if parts[0] in ("claimed", "reclaimed"):
                claims.append(Claim(ref, parts[0], int(parts[1]), int(parts[2]), parts[3]))
            else:
                claims.append(Claim(ref, parts[0]))
        return claims

    async def settle(self, claimed: list[tuple[MessageRef, int, MessageState]]) -> list[bool]:
        """Write each (ref, claimed attempt, new state) while its claim still holds; which did."""
        if not claimed:
            return []
        keys = [registration_key(ref.registration_id) for ref, _, _ in claimed] + [DUE_KEY]
        args: list[Any] = []
        for ref, attempt, state in claimed:
            args += [
                ref.field,
                attempt,
                state.encode(),
                "1" if state.final else "0",
                state.aux_ms or state.at_ms,
                ref.id,
            ]
        return [bool(flag) for flag in await self._settle(keys=keys, args=args)]

    async def replan(self, refs: list[MessageRef], *, now_ms: int) -> list[str]:
        """Plan each failed or skipped message again, attempts from zero; per message the status
        it had ("" for none): only those that were failed or skipped were planned."""
        if not refs:
            return []
        keys = [registration_key(r.registration_id) for r in refs] + [DUE_KEY]
        args: list[Any] = [now_ms]
        for ref in refs:
            args += [ref.field, ref.id]
        return [raw.decode() for raw in await self._replan(keys=keys, args=args)]

    async def step(
        self,
        done: tuple[MessageRef, MessageState, int, LogAppend] | None,
        following: tuple[MessageRef, int, MessageState] | None,
        *,
        counted: tuple[str, str] | None = None,
        client: RedisClient | None = None,
    ) -> bool:
        """Record `done` (ref, final-or-retry state, the attempt it was handed over with, its
        log append; the state only if it is still that handover) and hand `following` (ref,
        claimed attempt, sending state) over, in one command. False: don't send `following`.

        `counted`: the send counters' fields for `done`'s attempt (sendstats.attempt_fields);
        `client`: the connection to run it on (default: the store's pool)."""
        keys = [DUE_KEY, "", ""]
        args: list[Any] = ["", "", "", "", 0, 0, "", 0, "", 0, ""]
        if done is not None:
            ref, state, handed_attempt, (log_keys, log_args) = done
            keys[1] = registration_key(ref.registration_id)
            args[0:6] = [
                ref.field,
                state.encode(),
                "1" if state.final else "0",
                ref.id,
                state.aux_ms or state.at_ms,
                handed_attempt,
            ]
            keys += log_keys
            args += log_args
        else:
            keys += [""] * LOG_KEYS
            args += [""] * LOG_ARGS
        keys.append(SEND_STATS_KEY if done is not None and counted is not None else "")
        args += list(counted or ("", ""))
        if following is not None:
            ref, attempt, state = following
            keys[2] = registration_key(ref.registration_id)
            args[6:11] = [ref.field, attempt, state.encode(), state.aux_ms, ref.id]
        return bool(await self._step(keys=keys, args=args, client=client))

    async def due(self, *, now_ms: int, limit: int) -> list[str]:
        rows = await self.redis.zrangebyscore(DUE_KEY, "-inf", now_ms, start=0, num=limit)
        return [r.decode() for r in rows]

    async def postpone(self, message_ids: list[str], until_ms: int) -> None:
        if message_ids:
            await self.redis.zadd(DUE_KEY, dict.fromkeys(message_ids, until_ms), xx=True)
