"""Bearer tokens for the API: any of MAILER_API_TOKEN's, compared in constant time, never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from mailer.web.problems import Problem


async def require_token(request: Request) -> None:
    """A dependency: the request carries one of the configured tokens, or it is refused.
    (async: FastAPI runs a plain function dependency in a thread, a hop per request.)

    Without a configured token the API is off (503 saying how to turn it on), never open."""
    tokens: list[bytes] = request.app.state.settings.api_tokens
    if not tokens:
        raise Problem(503, "API disabled", "no token is configured: set MAILER_API_TOKEN to use the API")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    offered = given.strip().encode()
    # Compare against every token, so the time taken does not tell which one nearly matched.
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(offered, token)
    if scheme.lower() != "bearer" or not offered or not matched:
        refusal = Problem(401, "Unauthorized", "send 'Authorization: Bearer <token>' with a valid token")
        refusal.headers["WWW-Authenticate"] = 'Bearer realm="mailer"'
        raise refusal
