"""Repairs over HTTP: re-drive one message or all that a filter picks (with a dry run), and
erase an attendee's data (GDPR); the same operations as `mailer retry` and `mailer forget`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from mailer.constants import MessageKind
from mailer.ops.log_commands import forget_address
from mailer.ops.redrive import latest_with_status, redrive
from mailer.state.messages import MessageRef
from mailer.web.auth import require_token
from mailer.web.problems import Problem

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])


def _who(request: Request) -> str:
    return f"HTTP API, request {request.state.request_id}"


@router.post("/messages/{message_id:path}/retry", status_code=202)
async def retry_message(request: Request, message_id: str) -> dict[str, Any]:
    """Re-drive one failed or skipped message (same Message-ID, fresh attempts); 409 names the
    status of any other, which is left alone."""
    try:
        ref = MessageRef.parse(message_id)
    except ValueError as exc:
        raise Problem(422, "Invalid request", str(exc)) from None
    settings = request.app.state.settings
    done = await redrive(
        request.app.state.redis, [ref], who=_who(request), log_max_entries=settings.log_max_entries
    )
    if done.refused:
        was = done.refused[ref.id]
        raise Problem(
            409, "Not re-driven", f"{ref.id} is {was}" if was else f"mailer has no message {ref.id}"
        )
    return {"redriven": [ref.id]}


class RetryFilter(BaseModel):
    """Which messages `POST /v1/retry` re-drives: those whose newest log entry has `status`."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["failed", "skipped"]
    kind: MessageKind | None = None
    event: str | None = Field(default=None, max_length=128)
    since: datetime | None = None
    dry_run: bool = False


@router.post("/retry")
async def retry_many(request: Request, chosen_by: RetryFilter) -> dict[str, Any]:
    """Re-drive every message the filter picks, or with `dry_run` only list them."""
    if chosen_by.since is not None and chosen_by.since.tzinfo is None:
        raise Problem(422, "Invalid request", "since needs a time zone (…Z or +01:00)")
    redis = request.app.state.redis
    chosen = await latest_with_status(
        redis, chosen_by.status, kind=chosen_by.kind, event_id=chosen_by.event, since=chosen_by.since
    )
    if chosen_by.dry_run:
        return {"dry_run": True, "chosen": chosen, "redriven": [], "refused": {}}
    settings = request.app.state.settings
    refs = [MessageRef.parse(m) for m in chosen]
    done = await redrive(redis, refs, who=_who(request), log_max_entries=settings.log_max_entries)
    return {
        "dry_run": False,
        "chosen": chosen,
        "redriven": [r.id for r in done.planned],
        "refused": done.refused,
    }


@router.delete("/attendees/{email}")
async def forget_attendee(request: Request, email: str) -> dict[str, Any]:
    """Erase an address and name from every registration and log entry (their registrations end
    as cancelled); the erasure is logged with the request id, without the address."""
    address = email.strip()
    if "@" not in address or any(ch.isspace() for ch in address) or len(address) > 320:
        raise Problem(422, "Invalid request", "not an email address")
    done = await forget_address(request.app.state.settings, address, who=_who(request))
    return {
        "registrations": [
            {"registration_id": rid, "event_id": event or None} for rid, event in done.registrations
        ],
        "log_entries": done.log_entries,
    }
