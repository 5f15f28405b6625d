"""`/healthz` (the process answers), `/readyz` (mail can flow) and `/readyz/intake` (events can
be handed over): no token needed, so container probes and load balancers can ask."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from mailer.clock import ms, utc_now
from mailer.state.circuit import relay_states
from mailer.state.connection import where_connected
from mailer.state.heartbeat import fresh_workers

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the HTTP service runs."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: Redis answers, at least one worker's heartbeat is fresh, no relay circuit is
    open. 200 or 503; the body says which part is not ready and why."""
    return await _readiness(request, whole=True)


@router.get("/readyz/intake")
async def intake_ready(request: Request) -> JSONResponse:
    """Readiness of the intake alone: Redis answers, so POST /v1/events can queue. Stopped
    workers or a relay refusing mail must not turn producers away (their events wait in the
    queue): a load balancer in front of the intake asks this, monitoring asks /readyz."""
    return await _readiness(request, whole=False)


async def _readiness(request: Request, *, whole: bool) -> JSONResponse:
    redis = request.app.state.redis
    now_ms = ms(utc_now())
    checks: dict[str, Any] = {}
    try:
        await redis.ping()
        checks["redis"] = {"ok": True, "at": _where(request)}
        if whole:
            workers = await fresh_workers(redis, now_ms=now_ms)
            checks["workers"] = {"ok": bool(workers), "alive": workers}
            if not workers:
                checks["workers"]["reason"] = (
                    "no worker heartbeat in the last 30 s: is `mailer worker` running?"
                )
            relays = [s for s in await relay_states(redis) if s.open]
            checks["relay"] = {"ok": not relays}
            if relays:
                checks["relay"]["reason"] = "; ".join(f"{s.relay}: {s.reason}" for s in relays)
    except (RedisError, OSError) as exc:
        checks["redis"] = {"ok": False, "at": _where(request), "reason": f"Redis unreachable: {exc}"}
    ready = all(c.get("ok") for c in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


def _where(request: Request) -> str:
    """Which Redis the service asked, passwords masked; with Sentinel, the master last found."""
    return where_connected(request.app.state.redis.connection_pool, request.app.state.redis_target)
