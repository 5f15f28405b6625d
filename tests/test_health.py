"""`mailer health`: ok (0), degraded while a relay circuit holds the mail (1), down without Redis (2)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from mailer.errors import RelayFault
from mailer.state.circuit import RelayCircuit
from mailer.state.queue import connect
from tests.conftest import free_port
from tests.test_cli import clean_env, mailer


def test_health_is_ok_with_redis_and_no_open_circuit(tmp_path: Path, redis_url: str) -> None:
    """Redis answers, no relay is held: exit 0."""
    result = mailer("health", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": redis_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [f"redis: ok ({redis_url})", "ok"]


def test_health_is_degraded_while_a_relay_circuit_is_open_and_names_the_fix(
    tmp_path: Path, redis_url: str
) -> None:
    """A wrong password held the relay: exit 1, and the line says what to fix and when the next probe is."""

    async def trip() -> None:
        redis = await connect(redis_url)
        try:
            circuit = RelayCircuit(redis, relay="smtp:relay.example.org:587", base_ms=60_000, cap_ms=60_000)
            reply = "login refused: 535 5.7.8 bad credentials"
            fault = RelayFault(reply, code=535, healable=False, setting="MAILER_SMTP_PASSWORD")
            await circuit.trip(fault, now_ms=_now_ms())
        finally:
            await redis.aclose()

    asyncio.run(trip())
    result = mailer("health", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": redis_url})
    assert result.returncode == 1, result.stderr
    out = result.stdout.decode()
    assert "relay smtp:relay.example.org:587: refused (waiting will not help)" in out
    assert "fix MAILER_SMTP_PASSWORD" in out
    assert "535 5.7.8 bad credentials" in out
    assert out.strip().endswith("degraded")


def test_health_is_down_without_redis(tmp_path: Path) -> None:
    """Redis unreachable: exit 2 with one line, no traceback."""
    env = {**clean_env(), "MAILER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = mailer("health", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr.decode()
    assert result.stdout.decode().splitlines()[-1] == "down"
    assert result.stdout.decode().startswith("redis: unreachable")


def _now_ms() -> int:
    return int(time.time() * 1000)


def test_circuits_are_read_without_a_scan_of_the_keyspace(tmp_path: Path, redis_url: str) -> None:
    """A million registrations are a million keys: the readers of the circuit (health, /readyz,
    /metrics, the dashboard) look the relays up in their set, never SCAN for them."""

    async def trip_and_reset() -> None:
        redis = await connect(redis_url)
        try:
            circuit = RelayCircuit(redis, relay="smtp:scan.example.org:25", base_ms=60_000, cap_ms=60_000)
            await circuit.trip(RelayFault("421 busy", code=421), now_ms=_now_ms())
            await redis.config_resetstat()
        finally:
            await redis.aclose()

    async def scans() -> int:
        redis = await connect(redis_url)
        try:
            info = await redis.info("commandstats")
            return int(info.get("cmdstat_scan", {}).get("calls", 0))
        finally:
            await redis.aclose()

    asyncio.run(trip_and_reset())
    result = mailer("health", cwd=tmp_path, env={**clean_env(), "MAILER_REDIS_URL": redis_url})
    assert "relay smtp:scan.example.org:25" in result.stdout.decode()
    assert asyncio.run(scans()) == 0
