"""Poison in the queue and the inbox: whatever is written to Redis ends as `rejected`, never a dead worker."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailer.constants import EVENT_KEY, INBOX_KEY, JOB_WAITS_KEY, QUEUE_NAME
from mailer.intake.client import MailerClient
from mailer.state.queue import NEWER_FORMAT, connect, job_key
from tests.conftest import log_until, make_event, until, wait_for

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


# --- one bad event never holds back its neighbours ---------------------------------------


def neighbours(bad: dict[str, Any]) -> list[dict[str, Any]]:
    """A batch of three: a good registration, the bad one, another good one."""
    first = make_event(event_id="good-1", registration_id="reg-g1", email="g1@example.org")
    last = make_event(event_id="good-2", registration_id="reg-g2", email="g2@example.org")
    return [first, bad, last]


def unplannable() -> dict[str, Any]:
    """Year 9999 and a 274-million-year reminder: planning its reminders overflows."""
    return make_event(
        event_id="bad-1",
        registration_id="reg-b1",
        email="b1@example.org",
        starts_at=datetime(9999, 6, 1, 18, 0, tzinfo=UTC),
        event={"id": "far-future"},
        reminder_offsets=["P99999999999D"],
    )


async def start_worker(make_settings: Any, running_worker: Any, redis_url: str, smtp_server: Any) -> Any:
    settings = make_settings(redis_url=redis_url, smtp_host=smtp_server.host, smtp_port=smtp_server.port)
    return await running_worker(settings)


async def test_an_unplannable_event_is_rejected_and_its_neighbours_are_sent_at_once(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> None:
    """publish_many(good, year-9999, good): two confirmations, one `rejected` naming the bad id, no retry."""
    worker = await start_worker(make_settings, running_worker, redis_url, smtp_server)
    async with MailerClient(redis_url) as client:
        await client.publish_many(neighbours(unplannable()))
    await wait_for(lambda: len(smtp_server.handler.received) == 2, 5)
    entries = await log_until(redis_url, lambda log: any(e.source_event == "bad-1" for e in log), 5)
    (refusal,) = [e for e in entries if e.source_event == "bad-1"]
    assert refusal.status == "rejected"
    assert "starts_at" in refusal.detail
    assert "reminder_offsets" in refusal.detail
    assert sorted(r.rcpt_tos[0] for r in smtp_server.handler.received) == ["g1@example.org", "g2@example.org"]
    assert worker.jobs_retried == 0


async def test_an_unplannable_event_written_past_the_client_is_rejected_by_the_worker(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> None:
    """The same batch written straight into an ingest job (no client validation): the worker refuses it."""
    worker = await start_worker(make_settings, running_worker, redis_url, smtp_server)
    await put_jobs(redis_url, {"raw-batch": body("ingest", {"events": neighbours(unplannable())})})
    await wait_for(lambda: len(smtp_server.handler.received) == 2, 5)
    entries = await log_until(redis_url, lambda log: any(e.source_event == "bad-1" for e in log), 5)
    assert [e.status for e in entries if e.source_event == "bad-1"] == ["rejected"]
    assert worker.jobs_retried == 0


async def test_an_event_that_fails_while_planned_is_rejected_alone(
    redis_url: str, smtp_server: Any, make_settings: Any, running_worker: Any
) -> None:
    """A valid event whose planning raises (here: its event's stored record is unreadable, as
    one written by hand or by an older version) is `rejected` with its id and the reason at
    once; the two clean events of the same batch are confirmed in the same pass."""
    redis = await connect(redis_url)
    try:
        await redis.hset(
            EVENT_KEY.format(event_id="broken"),
            mapping={"data": b'{"not": "an event"}', "v": 1, "t": 0, "status": "active"},
        )
    finally:
        await redis.aclose()
    bad = make_event(
        event_id="bad-2", registration_id="reg-b2", email="b2@example.org", event={"id": "broken"}
    )
    worker = await start_worker(make_settings, running_worker, redis_url, smtp_server)
    async with MailerClient(redis_url) as client:
        report = await client.publish_many(neighbours(bad))
    assert report.accepted == 3
    await wait_for(lambda: len(smtp_server.handler.received) == 2, 5)
    entries = await log_until(redis_url, lambda log: any(e.source_event == "bad-2" for e in log), 5)
    (refusal,) = [e for e in entries if e.source_event == "bad-2"]
    assert refusal.status == "rejected"
    assert "broken" in refusal.detail
    assert worker.jobs_retried == 0
    assert not [e for e in entries if e.status == "rejected" and e.source_event != "bad-2"]


# --- property: arbitrary bytes and JSON into a running worker's queue and inbox ----------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
KWARG_NAMES = ["events", "messages", "member", "due_ms", "cursor", "reason", "preview", "turn"]
NO_FORMAT = object()  # the body has no "v" (format 1, as before the marker)
arq_shaped = st.fixed_dictionaries(
    {
        # Formats this worker reads, newer ones (left queued for a newer worker), and junk.
        "v": st.just(NO_FORMAT) | st.integers(-1, 3) | st.just(2**40) | json_values,
        "t": json_values | st.integers(-2, 200),
        "f": st.sampled_from(
            ["ingest", "drain", "send", "fan_out", "reject", "cron:tick", "newer_format", "nope"]
        ),
        "a": st.just([]) | json_values,
        "k": st.dictionaries(st.sampled_from(KWARG_NAMES), json_values, max_size=3) | json_values,
        "et": st.just(NOW_MS) | json_values,
    }
).map(lambda job: {k: v for k, v in job.items() if not (k == "t" and v == -2) and v is not NO_FORMAT})
job_bodies = st.binary(max_size=120) | json_values.map(orjson.dumps) | arq_shaped.map(orjson.dumps)

EVENT_FIELDS = ["id", "type", "occurred_at", "registration", "event", "event.starts_at", "event.timezone"]


def mutated_event(path: str, value: Any) -> bytes:
    event = make_event(event_id="prop-e", registration_id="prop-r", email="prop@example.org")
    where, _, name = path.rpartition(".")
    (event[where] if where else event)[name] = value
    return orjson.dumps(event)


inbox_entries = (
    st.binary(max_size=120)
    | json_values.map(orjson.dumps)
    | st.builds(mutated_event, st.sampled_from(EVENT_FIELDS), json_values)
)


def expected_rejections(jobs: dict[str, bytes], inbox: list[bytes]) -> tuple[set[str], int, set[str]]:
    """Which jobs must be rejected as malformed, how many events as invalid, and which jobs are
    of a newer format, left queued for a newer worker (the oracle)."""
    from mailer.events import parse_event
    from mailer.intake.job_bodies import deserialize

    def invalid(raw: Any) -> bool:
        try:
            parse_event(raw)
        except Exception:
            return True
        return False

    malformed, newer = set(), set()
    invalid_events = sum(invalid(raw) for raw in inbox)
    for job_id, raw in jobs.items():
        job = deserialize(raw)
        if job["f"] == "reject":
            malformed.add(job_id)
        elif job["f"] == NEWER_FORMAT:
            newer.add(job_id)
        elif job["f"] == "ingest":
            invalid_events += sum(invalid(e) for e in job["k"]["events"])
    return malformed, invalid_events, newer


async def left_for_a_newer_worker(url: str, bodies: dict[str, bytes]) -> None:
    """Each job waits in the queue, looked at and left as written; then the test takes it out
    (no newer worker will come)."""
    redis = await connect(url)
    try:
        for job_id, raw in bodies.items():
            waits = JOB_WAITS_KEY.format(job_id=job_id)
            await until(lambda: redis.exists(waits), 10)  # noqa: B023 (awaited in this pass)
            assert await redis.get(job_key(job_id)) == raw
            assert await redis.zscore(QUEUE_NAME, job_id) is not None
            await redis.zrem(QUEUE_NAME, job_id)
            await redis.delete(job_key(job_id), waits, f"arq:retry:{job_id}")
    finally:
        await redis.aclose()


def worker_task_alive() -> bool:
    mains = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__.endswith("Worker.main")]  # type: ignore[union-attr]
    return bool(mains) and not any(t.done() for t in mains)


EXAMPLES = iter(range(10**6))


async def queue_empty(url: str) -> None:
    """Wait until nothing but arq's cron jobs is queued and the inbox is drained."""
    redis = await connect(url)
    try:
        for _ in range(1000):
            members = [m for m in await redis.zrange(QUEUE_NAME, 0, -1) if not m.startswith(b"cron:")]
            if not members and not await redis.llen(INBOX_KEY):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"still queued: {members[:5]}")
    finally:
        await redis.aclose()


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(jobs=st.lists(job_bodies, max_size=6), inbox=st.lists(inbox_entries, max_size=6))
async def test_whatever_is_written_to_the_queue_or_inbox_is_accounted_for_and_the_worker_lives(
    redis_url: str, smtp_server: Any, mail_worker: Any, jobs: list[bytes], inbox: list[bytes]
) -> None:
    """Arbitrary bytes and JSON (arq-shaped too, of every job format) as job bodies and inbox
    entries of a running worker: it stays alive, each malformed job and each invalid event is one
    `rejected` entry, each job of a newer format is left queued as written (never rejected), and
    a valid event published afterwards is delivered."""
    from mailer.intake.inbox import Inbox

    if not worker_task_alive():
        await mail_worker()
    n = next(EXAMPLES)
    redis = await connect(redis_url)
    try:
        await redis.delete("mailer:log")
        bodies = {f"prop-{n}-{i}": raw for i, raw in enumerate(jobs)}
        malformed, invalid_events, newer = expected_rejections(bodies, inbox)
        event(f"jobs of a newer format: {'some' if newer else 'none'}")
        await put_jobs(redis_url, bodies)
        if inbox:
            await Inbox(redis).push(inbox)

        def accounted(log: list[Any]) -> bool:
            found = " ".join(e.detail for e in rejected(log))
            invalid = sum(e.detail.startswith("invalid event") for e in rejected(log))
            return all(f"job {job_id!r}" in found for job_id in malformed) and invalid >= invalid_events

        entries = await log_until(redis_url, accounted)
        for job_id in malformed:
            assert len([e for e in rejected(entries) if f"job {job_id!r}" in e.detail]) == 1, job_id
        await queue_settled(redis_url, [job_id for job_id in bodies if job_id not in newer])
        await left_for_a_newer_worker(redis_url, {job_id: bodies[job_id] for job_id in newer})
        await queue_empty(redis_url)
        entries = await log_until(redis_url, lambda log: True)
        assert sum(e.detail.startswith("invalid event") for e in rejected(entries)) == invalid_events
        assert not [e for e in entries if "could not be planned" in e.detail]
        assert not [e for e in rejected(entries) if any(f"job {job_id!r}" in e.detail for job_id in newer)]
        assert worker_task_alive()
        address = f"after-{n}@example.org"
        async with MailerClient(redis_url) as client:
            await client.publish(make_event(event_id=f"after-{n}", registration_id=f"reg-{n}", email=address))
        await wait_for(lambda: bool(smtp_server.handler.to(address)), 10)
        await queue_empty(redis_url)
    finally:
        await redis.aclose()


async def test_queue_members_arq_cannot_read_are_removed_and_logged(
    redis_url: str, smtp_server: Any, worker_process: Any
) -> None:
    """Queue entries themselves can be poison: a member that is not UTF-8 or a score of -inf
    crashed arq's poll loop, and score-0 entries were skipped forever (enough of them starve
    the queue). Each is removed and logged `rejected`; the worker lives and sends on."""
    worker = worker_process(redis_url, smtp_server)
    redis = await connect(redis_url)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            body = b'{"t":1,"f":"send","a":[],"k":{"messages":[]},"et":1764079200000}'
            pipe.set(job_key("minus-inf"), body)
            pipe.zadd(QUEUE_NAME, {"minus-inf": float("-inf"), b"\xff\xfe not utf-8": 1})
            pipe.zadd(QUEUE_NAME, {f"zero-{i}": 0 for i in range(150)})
            await pipe.execute()
        entries = await log_until(redis_url, lambda log: len(rejected(log)) >= 152, 20)
        assert worker.alive
        assert any("not UTF-8" in e.detail for e in rejected(entries))
        assert any("-inf" in e.detail for e in rejected(entries))
        async with MailerClient(redis_url) as client:
            await client.publish(make_event())
        await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)
        poison = [b"minus-inf", b"\xff\xfe not utf-8", *(f"zero-{i}".encode() for i in range(150))]
        async with redis.pipeline(transaction=False) as pipe:
            for member in poison:
                pipe.zscore(QUEUE_NAME, member)
            assert await pipe.execute() == [None] * len(poison)  # every one taken out of the queue
        assert worker.alive
    finally:
        await redis.aclose()
