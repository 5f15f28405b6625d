"""The Redis pool from mailer.state.queue.connect: hiredis packs the commands, and they mean the same."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from mailer.constants import QUEUE_NAME
from mailer.state.queue import INGEST, Enqueuer, connect


async def test_commands_packed_by_hiredis_read_back_unchanged(redis_url: str) -> None:
    """The pool packs commands with hiredis, and non-ASCII, binary and float values read back unchanged."""
    redis = await connect(redis_url)
    try:
        assert redis.connection_pool.connection_class.__name__.startswith("_Hiredis")
        async with redis.pipeline(transaction=False) as pipe:
            pipe.hset("k", mapping={"name": "Jürgen Groß", "n": 7, "raw": b"\x00\r\n"})
            pipe.zadd("z", {"m": 1764079200123.5})
            pipe.hgetall("k")
            pipe.zscore("z", "m")
            pipe.config_get("maxmemory-policy")  # a two-word command name is split, as redis-py does
            results = await pipe.execute()
        assert results[2] == {b"name": "Jürgen Groß".encode(), b"n": b"7", b"raw": b"\x00\r\n"}
        assert results[3] == 1764079200123.5
        assert "maxmemory-policy" in results[4]
    finally:
        await redis.aclose()


async def test_jobs_due_now_are_scored_by_redis_clock_not_the_producers(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer host whose clock runs two minutes fast must not park its jobs in the future."""
    real_time = time.time
    monkeypatch.setattr("mailer.intake.job_bodies.time", SimpleNamespace(time=lambda: real_time() + 120))
    redis = await connect(redis_url)
    try:
        enqueuer = Enqueuer(redis)
        await enqueuer.enqueue([("now-job", INGEST, {"events": []})])
        later = int(real_time() * 1000) + 3_600_000
        await enqueuer.enqueue([("later-job", INGEST, {"events": []})], run_at_ms=later)
        seconds, micros = await redis.time()
        redis_now = seconds * 1000 + micros // 1000
        assert abs(await redis.zscore(QUEUE_NAME, "now-job") - redis_now) < 5_000
        assert await redis.zscore(QUEUE_NAME, "later-job") == later
    finally:
        await redis.aclose()


async def test_every_job_mailer_writes_itself_passes_the_strict_deserializer(redis_url: str) -> None:
    """What mailer's own writers enqueue (Enqueuer, the inbox's drain, arq's cron) is run, not rejected."""
    from mailer.intake.inbox import Inbox
    from mailer.intake.job_bodies import deserialize
    from mailer.state.queue import FAN_OUT, SEND, job_key

    redis = await connect(redis_url)
    try:
        enqueuer = Enqueuer(redis)
        await enqueuer.enqueue(
            [
                ("j-ingest", INGEST, {"events": [{"id": "e-1"}, "not json"]}),
                ("j-send", SEND, {"messages": ["reg-1/confirmation"]}),
                ("j-fan", FAN_OUT, {"member": "evt-1|reminder|P1D", "due_ms": 1764079200000, "cursor": 0}),
                ("j-changed", FAN_OUT, {"member": "evt-1|event_changed|v2", "due_ms": 1764079200000}),
            ]
        )
        await Inbox(redis).push([b"{}"])
        ids = [m.decode() for m in await redis.zrange(QUEUE_NAME, 0, -1)]
        assert len(ids) == 5
        for job_id in ids:
            job = deserialize(await redis.get(job_key(job_id)))
            assert job["f"] != "reject", (job_id, job["k"])
        cron = b'{"t":null,"f":"cron:tick","a":[],"k":{},"et":1764079200000}'  # arq's own enqueue
        assert deserialize(cron)["f"] == "cron:tick"
    finally:
        await redis.aclose()
