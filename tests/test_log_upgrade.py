"""A log an older mailer wrote (JSON entries, indexes by registration and address only), read
and extended by this one: every filter still finds its entries, addresses stay right and can
be forgotten, its failures can be re-driven, and stats say what they do not count."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.clock import ms, utc_now
from mailer.ops.redrive import latest_with_status
from mailer.state.deliverylog import DeliveryLog, LogEntry, recipient_index, registration_index
from mailer.state.logerase import forget_recipient
from mailer.state.logquery import LogFilter, iter_log, log_counts, read_log
from mailer.state.queue import connect_client
from mailer.state.store import registration_key
from tests.test_log_queries import NOW, log_entry, log_filter, queries_agree_with_a_scan
from tests.test_retention import everything, mentions

# The append script of mailer before the indexed log (git 9c4fd33, mailer/state/deliverylog.py),
# copied as it was: the entry as JSON in field "j", its id added to the registration's and the
# recipient's index fields.
OLDER_APPEND = """
local function log_index(bucket, field, id)
  if bucket == '' then return end
  local ids = redis.call('HGET', bucket, field)
  redis.call('HSET', bucket, field, ids and (ids .. ' ' .. id) or id)
end
local function log_append(stream, maxlen, json, reg_bucket, reg_field, rcpt_bucket, rcpt_field)
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'j', json)
  log_index(reg_bucket, reg_field, id)
  log_index(rcpt_bucket, rcpt_field, id)
  return id
end
return log_append(KEYS[1], ARGV[1], ARGV[2], KEYS[2], ARGV[3], KEYS[3], ARGV[4])
"""


async def older_mailer_writes(redis: Any, entries: list[LogEntry]) -> None:
    script = redis.register_script(OLDER_APPEND)
    for entry in entries:
        registration = entry.registration_id or (
            entry.message_id.split("/", 1)[0] if "/" in entry.message_id else ""
        )
        reg_key, reg_field = registration_index(registration) if registration else ("", "")
        rcpt_key, rcpt_field = recipient_index(entry.recipient) if entry.recipient else ("", "")
        await script(
            keys=["mailer:log", reg_key, rcpt_key], args=[10_000, entry.to_json(), reg_field, rcpt_field]
        )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    older=st.lists(log_entry(), max_size=20),
    newer=st.lists(log_entry(), max_size=20),
    filters=st.lists(log_filter(), min_size=1, max_size=4),
    page=st.integers(1, 7),
)
async def test_every_filter_finds_an_older_mailers_entries_too(
    redis_url: str, older: list[LogEntry], newer: list[LogEntry], filters: list[LogFilter], page: int
) -> None:
    """Entries from before the upgrade lie below the first indexed one and are walked; those
    after it come from the indexes: together exactly what a scan matches, paged the same."""
    # The older mailer's ids are Redis's clock ("*"), its times its own: both near now, as
    # they were when it wrote them (the strategies' times are around the module's import).
    shift = utc_now() - NOW
    older = [replace(e, ts=(datetime.fromisoformat(e.ts) + shift).isoformat()) for e in older]
    newer = [replace(e, ts=(datetime.fromisoformat(e.ts) + shift).isoformat()) for e in newer]
    # References are indexed from this mailer on: an older entry is found by its registration,
    # address, message or event, not by its reference (README, "The delivery log").
    filters = [
        replace(f, since=f.since and f.since + shift, until=f.until and f.until + shift, reference=None)
        for f in filters
    ]
    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        await older_mailer_writes(redis, older)
        await DeliveryLog(redis, max_entries=10_000, echo=None).write(newer)
        every = [e async for e in read_log(redis, newest_first=False)]
        assert len(every) == len(older) + len(newer)
        assert [e.recipient.lower() for e in every] == [e.recipient.lower() for e in older + newer]
        await queries_agree_with_a_scan(redis, every, filters, page)
    finally:
        await redis.aclose()


async def test_an_address_an_older_mailer_indexed_gets_its_token_and_can_be_forgotten(
    redis_url: str,
) -> None:
    """The older index field (ids only) gets a token in front when this mailer first logs the
    address: old and new entries read back with the address; forgetting leaves it nowhere."""
    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        common: dict[str, Any] = {"ts": NOW.isoformat(), "message_id": "reg-1/confirmation"}
        await older_mailer_writes(
            redis, [LogEntry(status="retrying", recipient="Maria@Example.org", **common)]
        )
        await DeliveryLog(redis, max_entries=100, echo=None).write(
            [LogEntry(status="sent", recipient="maria@example.org", **common)]
        )
        found = [e async for e in iter_log(redis, LogFilter(recipient="MARIA@example.org"))]
        assert [(e.status, e.recipient.lower()) for e in found] == [
            ("sent", "maria@example.org"),
            ("retrying", "maria@example.org"),
        ]
        key, field = recipient_index("maria@example.org")
        assert (await redis.hget(key, field)).startswith(b"~")
        assert await forget_recipient(redis, "maria@example.org") == 2
        assert not mentions(await everything(redis), "maria@example.org")
    finally:
        await redis.aclose()


async def test_an_older_mailers_failure_can_be_redriven_and_stats_say_what_they_miss(
    redis_url: str,
) -> None:
    """`retry --status failed` walks below the first indexed entry for failures the dead-letter
    hash never saw; `stats` names the time before which it counts nothing."""
    redis = await connect_client(redis_url)
    try:
        await redis.flushdb()
        await redis.hset(
            registration_key("reg-1"), mapping={"e": "evt-1", "m:confirmation": "failed|1|0|0|0"}
        )
        await older_mailer_writes(
            redis,
            [
                LogEntry(
                    ts=NOW.isoformat(), status="failed", message_id="reg-1/confirmation", event_id="evt-1"
                ),
                LogEntry(
                    ts=NOW.isoformat(), status="sent", message_id="reg-2/confirmation", event_id="evt-1"
                ),
            ],
        )
        assert (await log_counts(redis)).uncounted_before is not None  # nothing indexed yet
        await DeliveryLog(redis, max_entries=100, echo=None).write(
            [LogEntry(ts=NOW.isoformat(), status="failed", message_id="reg-3/reminder/P1D", event_id="evt-1")]
        )
        assert await latest_with_status(redis, "failed") == ["reg-3/reminder/P1D", "reg-1/confirmation"]
        assert await latest_with_status(redis, "failed", event_id="evt-1", kind="confirmation") == [
            "reg-1/confirmation"
        ]
        counted = await log_counts(redis)
        assert counted.counts == {("failed", "reminder"): 1}
        assert counted.uncounted_before is not None
        newest, *_ = [e async for e in read_log(redis)]  # the only entry this mailer wrote
        assert ms(counted.uncounted_before) == int(newest.entry_id.split("-")[0])
    finally:
        await redis.aclose()
