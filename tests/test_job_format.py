"""The job format is versioned: a worker runs the formats it reads, leaves a newer one in the queue
untouched for a worker that reads it (never rejected, never dropped), and rejects a "v" that is
no format at all. Old and new workers can then run side by side during an upgrade."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest

from mailer.constants import JOB_WAITS_KEY, QUEUE_NAME
from mailer.intake import job_bodies
from mailer.intake.client import MailerClient
from mailer.intake.inbox import Inbox
from mailer.intake.job_bodies import deserialize
from mailer.state.queue import (
    DRAIN,
    INGEST,
    JOB_EXPIRY_MS,
    JOB_FORMAT,
    NEWER_FORMAT,
    Enqueuer,
    connect,
    connect_client,
    job_key,
)
from tests.conftest import log_until, make_event, until, wait_for
from tests.test_poison import NOW_MS, put_jobs, rejected


def ingest_body(email: str, **envelope: Any) -> bytes:
    """An ingest job for one registration, as a producer of some release would write it."""
    local = email.split("@")[0]
    event = make_event(event_id=f"fmt-{local}", registration_id=f"reg-{local}", email=email)
    job: dict[str, Any] = {"t": 1, "f": INGEST, "a": [], "k": {"events": [event]}, "et": NOW_MS}
    return orjson.dumps({**envelope, **job})


async def waits(url: str, job_id: str) -> int:
    redis = await connect_client(url)
    try:
        return int(await redis.get(JOB_WAITS_KEY.format(job_id=job_id)) or 0)
    finally:
        await redis.aclose()


async def test_every_body_mailer_writes_is_marked_with_its_format(redis_url: str) -> None:
    """Producers, the inbox and the workers' own jobs all write "v": JOB_FORMAT; arq writes the
    tick's body itself without one, which is format 1."""
    redis = await connect_client(redis_url)
    try:
        await Enqueuer(redis).enqueue([("j-send", "send", {"messages": ["reg-1/confirmation"]})])
        await Inbox(redis).push([b"{}"])  # enqueues a drain job from Lua
        async with MailerClient(redis_url) as client:
            await client.publish_many([make_event()])
        functions = set()
        for member in await redis.zrange(QUEUE_NAME, 0, -1):
            body = orjson.loads(await redis.get(job_key(member.decode())) or b"{}")
            assert body["v"] == JOB_FORMAT, body
            assert list(body)[-1] == "et"  # the Lua that appends Redis's clock relies on it
            functions.add(body["f"])
        assert functions == {"send", DRAIN, INGEST}
    finally:
        await redis.aclose()
    tick = b'{"t":null,"f":"cron:tick","a":[],"k":{},"et":1764079200000}'
    assert deserialize(tick)["f"] == "cron:tick"


@pytest.mark.parametrize(
    ("body", "reads_as"),
    [
        (ingest_body("a@example.org"), INGEST),  # format 1 as every mailer before the marker wrote it
        (ingest_body("a@example.org", v=1), INGEST),
        (ingest_body("a@example.org", v=2), NEWER_FORMAT),
        (ingest_body("a@example.org", v=10**15), NEWER_FORMAT),
        # A newer format may change anything, arq's own fields too: nothing else is read.
        (b'{"v":2,"job":{"fn":"ingest"},"when":"now"}', NEWER_FORMAT),
        (ingest_body("a@example.org", v=0), "reject"),
        (ingest_body("a@example.org", v=-1), "reject"),
        (ingest_body("a@example.org", v="2"), "reject"),
        (ingest_body("a@example.org", v=2.0), "reject"),
        (ingest_body("a@example.org", v=True), "reject"),
        (ingest_body("a@example.org", v=None), "reject"),
        (b'{"v":1,"f":"newer_format","a":[],"k":{"version":2},"et":1764079200000}', "reject"),
    ],
)
def test_which_formats_a_worker_reads(body: bytes, reads_as: str) -> None:
    """The reading rule, body by body: no "v" and "v": 1 are format 1; a whole number above
    JOB_FORMAT is left for a newer worker; anything else in "v" is malformed. No body may name
    the stand-in for a newer format itself."""
    job = deserialize(body)
    assert job["f"] == reads_as
    if reads_as == "reject":
        assert job["k"]["reason"].startswith(("v: ", "f: "))
    if reads_as == NEWER_FORMAT:
        assert job["k"] == {"version": orjson.loads(body)["v"]}


async def test_a_worker_runs_its_formats_and_leaves_a_newer_one_for_a_newer_worker(
    redis_url: str,
    smtp_server: Any,
    mail_worker: Any,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker of format 1 beside jobs of format 1 (unmarked and marked) and format 2: it runs
    both format 1 jobs; the format 2 job is neither run nor rejected but stays queued with its
    body as written, its arq try count untouched, looked at again with a growing delay and a
    warning line. Once the worker reads format 2 (the next release), that job runs: nothing
    was lost while it waited."""
    caplog.set_level(logging.WARNING, logger="mailer.jobs")
    await mail_worker()
    newer = ingest_body("newer@example.org", v=JOB_FORMAT + 1)
    await put_jobs(
        redis_url,
        {
            "unmarked": ingest_body("unmarked@example.org"),
            "current": ingest_body("current@example.org", v=JOB_FORMAT),
            "newer": newer,
        },
    )
    handler = smtp_server.handler
    await wait_for(lambda: len(handler.received) == 2, 10)
    await wait_for(lambda: any("'newer' is in job format 2" in r.getMessage() for r in caplog.records), 10)

    async def looked_at_twice() -> bool:
        return await waits(redis_url, "newer") >= 2  # the second look comes a second after the first

    await until(looked_at_twice, 10)
    redis = await connect(redis_url)
    try:
        assert await redis.get(job_key("newer")) == newer
        assert await redis.zscore(QUEUE_NAME, "newer") is not None
        # Its time to live runs a day from its last look, not from when it was written.
        assert await redis.pttl(job_key("newer")) > JOB_EXPIRY_MS - 60_000
        assert await redis.get("arq:retry:newer") == b"0"  # no try used up for a newer worker
    finally:
        await redis.aclose()
    assert sorted(r.rcpt_tos[0] for r in handler.received) == ["current@example.org", "unmarked@example.org"]
    entries = await log_until(redis_url, lambda log: True)
    assert not rejected(entries)
    assert not [e for e in entries if e.source_event == "fmt-newer"]
    notices = [r.getMessage() for r in caplog.records if "job format 2" in r.getMessage()]
    assert len(notices) == 2  # the 1st and 2nd look; then one at the 4th, 8th ...
    assert "nothing is lost" in notices[0]

    # The release that brings format 2 (here: the same reader, told it reads format 2).
    monkeypatch.setattr(job_bodies, "JOB_FORMAT", JOB_FORMAT + 1)
    await wait_for(lambda: len(handler.received) == 3, 10)
    assert handler.received[-1].rcpt_tos == ["newer@example.org"]


def test_the_release_before_the_marker_reads_format_1_bodies() -> None:
    """mailer before the marker checked a body with _envelope_problem and _arguments_problem (both
    unchanged since), and arq reads only f, a, k, t and et: a "v" passes both."""
    from arq.jobs import deserialize_job_raw

    from mailer.intake.job_bodies import _arguments_problem, _envelope_problem

    raw = ingest_body("a@example.org", v=JOB_FORMAT)
    body = orjson.loads(raw)
    assert _envelope_problem(body) is None
    assert _arguments_problem(INGEST, body["k"]) is None
    assert deserialize_job_raw(raw, deserializer=orjson.loads)[0] == INGEST
