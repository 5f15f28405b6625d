"""The Redis pool from mailer.queue.connect: hiredis packs the commands, and they mean the same."""

from __future__ import annotations

from mailer.queue import connect


async def test_commands_packed_by_hiredis_read_back_unchanged(redis_url: str) -> None:
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
