"""The delivery API: the log's filters and cursor pages, a registration's or message's
timeline, and stats; the same readers as `mailer log`, `show` and `stats`."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Query, Request

from mailer.constants import ID_PATTERN, LOG_KINDS
from mailer.ops.log_reading import MessageStory, Timeline, stats, timeline
from mailer.state.deliverylog import LOG_STATUSES, LogEntry
from mailer.state.logquery import LogFilter, log_page
from mailer.state.messages import MessageRef
from mailer.web.auth import require_token
from mailer.web.problems import Problem

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])

ENTRY_ID = r"^\d{1,16}-\d{1,4}$"


def entry_json(entry: LogEntry) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(entry.to_json())
    return {"id": entry.entry_id} | data


def _one_of(name: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise Problem(
            422,
            "Invalid request",
            f"{name} must be one of {', '.join(allowed)}",
            errors=[{"field": name, "reason": "unknown value"}],
        )


def _aware(name: str, moment: datetime | None) -> None:
    if moment is not None and moment.tzinfo is None:
        raise Problem(422, "Invalid request", f"{name} needs a time zone (…Z or +01:00)")


@router.get("/deliveries")
async def deliveries(
    request: Request,
    recipient: str | None = Query(None, max_length=320),
    registration: str | None = Query(None, max_length=128),
    reference: str | None = Query(None, max_length=64),
    message: str | None = Query(None, max_length=300),
    event: str | None = Query(None, max_length=128),
    status: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = Query(50, ge=1, le=500),
    cursor: str | None = Query(None, pattern=ENTRY_ID),
) -> dict[str, Any]:
    """Log entries newest first, filtered like `mailer log`; `next_cursor` pages on (null: no more)."""
    _one_of("status", status, LOG_STATUSES)
    _one_of("kind", kind, LOG_KINDS)
    _aware("since", since)
    _aware("until", until)
    flt = LogFilter(
        recipient=recipient,
        registration=registration,
        reference=reference,
        message=message,
        event=event,
        status=status,
        kind=kind,
        since=since,
        until=until,
    )
    page = await log_page(request.app.state.redis, flt, cursor=cursor, limit=limit)
    return {"entries": [entry_json(e) for e in page.entries], "next_cursor": page.cursor}


def _story_json(story: Timeline) -> dict[str, Any]:
    def message_json(message: MessageStory) -> dict[str, Any]:
        now = message.current
        return {
            "message_id": message.message_id,
            "kind": message.kind,
            "status": message.status,
            "attempts": message.attempts,
            "sequence": message.sequence,
            "now": None
            if now is None
            else {"status": now.status, "next_look": message.due.isoformat() if message.due else None},
            "entries": [entry_json(e) for e in message.entries],
        }

    return {
        "registration_id": story.registration_id,
        "event_id": story.event_id or None,
        "recipient": story.recipient or None,
        "messages": [message_json(m) for m in story.messages],
        "other": [entry_json(e) for e in story.other],
    }


async def _timeline(request: Request, ident: str) -> dict[str, Any]:
    story = await timeline(request.app.state.redis, ident)
    if not story.messages and not story.other:
        raise Problem(404, "Not found", f"mailer knows nothing of {ident}")
    return _story_json(story)


@router.get("/registrations/{registration_id}")
async def registration(request: Request, registration_id: str) -> dict[str, Any]:
    """A registration's timeline: every message, every attempt, each message's state now."""
    if not re.match(ID_PATTERN, registration_id):
        raise Problem(422, "Invalid request", f"not a registration id (the contract's pattern {ID_PATTERN})")
    return await _timeline(request, registration_id)


@router.get("/messages/{message_id:path}")
async def message(request: Request, message_id: str) -> dict[str, Any]:
    """One message's timeline (REGISTRATION/KIND[/DETAIL])."""
    try:
        MessageRef.parse(message_id)
    except ValueError as exc:
        raise Problem(422, "Invalid request", str(exc)) from None
    return await _timeline(request, message_id)


@router.get("/stats")
async def stats_of(
    request: Request, event: str | None = Query(None, max_length=128), since: datetime | None = None
) -> dict[str, Any]:
    """Counts per status and kind, latency, dead letters, the oldest waiting message."""
    _aware("since", since)
    result = await stats(request.app.state.redis, LogFilter(event=event, since=since))
    return {"event_id": event, "since": since.isoformat() if since else None} | result.as_dict()
