"""The message-state string means the same to Python (MessageState) and to the Lua scripts (STATE_LUA)."""

from __future__ import annotations

from typing import get_args

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.state.messages import STATE_LUA, MessageState, Status
from mailer.state.queue import connect_client

MILLIS = st.integers(min_value=0, max_value=4_102_444_800_000)
STATES = st.builds(
    MessageState,
    status=st.sampled_from(get_args(Status)),
    attempts=st.integers(min_value=0, max_value=10_000),
    since_ms=MILLIS,
    at_ms=MILLIS,
    aux_ms=MILLIS,
)

# Decode what Python encoded, encode it again in Lua; and return the fields as strings
# (Lua numbers would come back as integers anyway, but a float formatting slip would show).
ROUND_TRIP = (
    STATE_LUA
    + """
local status, attempts, since, at, aux = decode_state(ARGV[1])
return {encode_state(status, attempts, since, at, aux), status, tostring(attempts), tostring(aux)}
"""
)
MALFORMED = STATE_LUA + "return decode_state(ARGV[1]) or 'none'"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=STATES)  # the fixture only names the server: no state carries over between examples
async def test_lua_reads_and_writes_the_state_python_writes(redis_url: str, state: MessageState) -> None:
    """Every field survives Python encode → Lua decode → Lua encode, to the byte (timestamps up
    to 2100 included: Lua formats them without an exponent)."""
    redis = await connect_client(redis_url)
    try:
        encoded, status, attempts, aux = await redis.eval(ROUND_TRIP, 0, state.encode())
    finally:
        await redis.aclose()
    assert encoded.decode() == state.encode()
    assert MessageState.decode(encoded) == state
    assert (status.decode(), int(attempts), int(aux)) == (state.status, state.attempts, state.aux_ms)


async def test_a_string_that_is_not_a_state_decodes_to_nothing(redis_url: str) -> None:
    """Four fields, an empty field or prose are not a state: the scripts see nil, not a guess."""
    redis = await connect_client(redis_url)
    try:
        for raw in ["sent|1|2|3", "sent||2|3|4", "hello", "sent|1|2|3|4|5"]:
            assert await redis.eval(MALFORMED, 0, raw) == b"none", raw
    finally:
        await redis.aclose()
