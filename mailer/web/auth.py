"""Bearer tokens for the API: any of MAILER_API_TOKEN's, compared in constant time, never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from mailer.web.problems import Problem


def matching_token(tokens: list[bytes], offered: bytes) -> bytes | None:
    """The configured token `offered` is, or None. Every token is compared, in constant time,
    so the time taken tells neither whether nor which one nearly matched."""
    matched = None
    for token in tokens:
        if hmac.compare_digest(offered, token) and offered:
            matched = token
    return matched


async def require_token(request: Request) -> None:
    """A dependency: the request carries one of the configured tokens, or it is refused.
    (async: FastAPI runs a plain function dependency in a thread, a hop per request.)

    Without a configured token the API is off (503 saying how to turn it on), never open."""
    tokens: list[bytes] = request.app.state.settings.api_tokens
    if not tokens:
        raise Problem(503, "API disabled", "no token is configured: set MAILER_API_TOKEN to use the API")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or matching_token(tokens, given.strip().encode()) is None:
        refusal = Problem(401, "Unauthorized", "send 'Authorization: Bearer <token>' with a valid token")
        refusal.headers["WWW-Authenticate"] = 'Bearer realm="mailer"'
        raise refusal
