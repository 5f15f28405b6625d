"""Poison in the queue and the inbox: whatever is written to Redis ends as `rejected`, never a dead worker."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from mailer.client import MailerClient
from mailer.constants import QUEUE_NAME
from mailer.queue import connect, job_key
from tests.conftest import log_until, make_event, wait_for

# The bodies that killed every worker that picked them up (issue 15), so systemd's
# Restart=on-failure turned one bad write into a crash loop.
CRASH_LOOP_BODIES = {
    "et-text": b'{"t":1,"f":"send","a":[],"k":{"messages":[]},"et":"yesterday"}',
    "t-text": b'{"t":"x","f":"send","a":[],"k":{"messages":[]},"et":1764079200000}',
    "et-null": b'{"t":1,"f":"send","a":[],"k":{"messages":[]},"et":null}',
    "et-huge": b'{"t":1,"f":"send","a":[],"k":{"messages":[]},"et":1e30}',
}


async def put_jobs(url: str, bodies: dict[str, bytes]) -> None:
    """Write job bodies under their ids and queue them, as anyone with Redis access could."""
    redis = await connect(url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for job_id, body in bodies.items():
                pipe.set(job_key(job_id), body)
                # Score 1 (long due): arq skips a job scored 0 as "already finished".
                pipe.zadd(QUEUE_NAME, {job_id: 1})
            await pipe.execute()
    finally:
        await redis.aclose()


def rejected(entries: list[Any]) -> list[Any]:
    return [e for e in entries if e.status == "rejected"]


async def queue_settled(url: str, job_ids: list[str]) -> None:
    """Wait until none of the jobs is queued or stored any more (run once, not retried)."""
    redis = await connect(url)
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            async with redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.zscore(QUEUE_NAME, job_id)
                    pipe.exists(job_key(job_id))
                left = [r for r in await pipe.execute() if r]
            if not left:
                return
            assert asyncio.get_running_loop().time() < deadline, f"jobs still queued: {left}"
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


async def test_crash_loop_bodies_leave_the_worker_process_alive(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """The four job bodies that killed `mailer worker` are each rejected once; the process lives on."""
    worker = worker_process(redis_url, smtp_server)
    await put_jobs(redis_url, CRASH_LOOP_BODIES)
    entries = await log_until(redis_url, lambda log: len(rejected(log)) >= 4, 20)
    assert worker.alive
    details = sorted(e.detail for e in rejected(entries))
    assert len(details) == 4
    assert all("malformed job" in d for d in details)
    async with MailerClient(redis_url) as client:
        await client.publish(make_event())
    await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)
    await queue_settled(redis_url, list(CRASH_LOOP_BODIES))
    assert worker.alive
    assert len(rejected(await log_until(redis_url, lambda log: True))) == 4


NOW_MS = 1_764_079_200_000


def body(function: str, kwargs: Any = None, *, args: Any = None, **extra: Any) -> bytes:
    job: dict[str, Any] = {"t": 1, "f": function, "a": args or [], "k": kwargs or {}, "et": NOW_MS}
    job.update(extra)
    return orjson.dumps(job)


WRONG_ARGUMENTS = {
    "unknown-kwarg": body("send", {"messages": [], "urgent": True}),
    "positional": body("send", {"messages": []}, args=["reg-1/confirmation"]),
    "empty-body": b"",
    "empty-object": b"{}",
    "missing-kwargs": body("fan_out", {"member": "evt|reminder|P1D"}),
    "due-ms-text": body("fan_out", {"member": "evt|reminder|P1D", "due_ms": "abc"}),
    "member-garbage": body("fan_out", {"member": "no separators", "due_ms": NOW_MS}),
    "member-bad-offset": body("fan_out", {"member": "evt|reminder|P1Y", "due_ms": NOW_MS}),
    "cursor-negative": body("fan_out", {"member": "evt|reminder|P1D", "due_ms": NOW_MS, "cursor": -1}),
    "messages-not-list": body("send", {"messages": "reg-1/confirmation"}),
    "messages-not-text": body("send", {"messages": [{"id": 1}]}),
    "events-not-list": body("ingest", {"events": {"id": "e-1"}}),
    "drain-with-kwargs": body("drain", {"turn": 1}),
    "tick-with-kwargs": body("cron:tick", {"now": 1}),
    "reject-bad-reason": body("reject", {"reason": 42}),
    "t-bool": body("send", {"messages": []}, t=True),
    "t-negative": body("send", {"messages": []}, t=-1),
    "t-huge": body("send", {"messages": []}, t=10**12),
    "et-bool": body("send", {"messages": []}, et=True),
    "et-float": body("send", {"messages": []}, et=1764079200000.5),
    "et-negative": body("send", {"messages": []}, et=-5),
    "unknown-function": body("rm_rf", {}),
    "array": b"[1, 2, 3]",
    "not-utf8": b"\xff\xfe\x00garbage",
}


async def test_known_functions_with_wrong_arguments_are_rejected_once_and_not_retried(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """Wrong kwargs, positional args, an empty body, `due_ms: "abc"`: one `rejected` entry each, no retry."""
    await mail_worker()
    await put_jobs(redis_url, WRONG_ARGUMENTS)
    await queue_settled(redis_url, list(WRONG_ARGUMENTS))
    entries = await log_until(redis_url, lambda log: len(rejected(log)) >= len(WRONG_ARGUMENTS))
    assert len(rejected(entries)) == len(WRONG_ARGUMENTS)
    assert all(e.detail.startswith("malformed job: ") for e in rejected(entries))
    assert not [e for e in entries if e.status != "rejected"]


async def test_a_rejection_names_the_field_and_the_reason(
    redis_url: str, smtp_server: Any, mail_worker: Any
) -> None:
    """The reason says which argument was wrong and how, so an operator can find the producer's bug."""
    await mail_worker()
    await put_jobs(redis_url, {"fan": WRONG_ARGUMENTS["due-ms-text"], "et": CRASH_LOOP_BODIES["et-text"]})
    entries = rejected(await log_until(redis_url, lambda log: len(rejected(log)) >= 2))
    details = " | ".join(e.detail for e in entries)
    assert "fan_out: due_ms" in details
    assert "et" in details
