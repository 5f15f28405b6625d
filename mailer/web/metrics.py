"""`GET /metrics` in Prometheus' text format, every name prefixed `mailer_`: read from Redis at
scrape time (the log's counters and histogram, the send attempts' reply classes and durations,
the queue, the due index, the dead letters, the relay circuits, the worker heartbeats), plus
this process's intake requests. No token: a scraper asks; nothing in it names an attendee."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from mailer.clock import ms, utc_now
from mailer.constants import (
    DUE_KEY,
    LOG_COUNTS_KEY,
    LOG_DEAD_KEY,
    LOG_LATENCY_KEY,
    QUEUE_NAME,
    SEND_STATS_KEY,
    WORKERS_KEY,
)
from mailer.state.circuit import relay_states
from mailer.state.deliverylog import ALL_SCOPE, bucket_upper_ms
from mailer.state.heartbeat import FRESH_MS
from mailer.state.sendstats import REPLY_CLASSES, SendStats, bucket_upper_seconds, parse

router = APIRouter()

# A `_created` sample per counter says when this process began counting: beside the counters
# read from Redis, which have none, it is one more series that means nothing to an operator.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

# This process's own: what POST /v1/events answered.
_OWN = CollectorRegistry(auto_describe=True)
INTAKE_REQUESTS = Counter(
    "mailer_intake_requests", "POST /v1/events answers by HTTP status.", ["status"], registry=_OWN
)


class _Snapshot(Collector):
    """Metric families computed before the scrape (the reads are async; collectors are not)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Any:
        return iter(self.families)


async def _families(redis: Any) -> list[Any]:
    now_ms = ms(utc_now())
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(LOG_COUNTS_KEY.format(scope=ALL_SCOPE))
        pipe.hgetall(LOG_LATENCY_KEY.format(scope=ALL_SCOPE))
        pipe.hlen(LOG_DEAD_KEY.format(scope=ALL_SCOPE))
        pipe.zcard(QUEUE_NAME)
        pipe.zcard(DUE_KEY)
        pipe.zrange(DUE_KEY, 0, 0, withscores=True)
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        pipe.hgetall(SEND_STATS_KEY)
        counts, latency, dead, queued, due, oldest, workers, sends = await pipe.execute()
    entries = CounterMetricFamily(
        "mailer_log_entries", "Delivery log entries by status and message kind.", labels=["status", "kind"]
    )
    for name, value in counts.items():
        status, _, kind = name.decode().partition("|")
        entries.add_metric([status, kind], int(value))
    histogram = HistogramMetricFamily(
        "mailer_delivery_latency_seconds",
        "Planned to sent, per sent message (quarter-octave buckets; the sum is estimated from bucket tops).",
    )
    latency_buckets = {int(b): int(n) for b, n in latency.items()}
    histogram.add_metric([], *_cumulative(latency_buckets, lambda b: bucket_upper_ms(b) / 1000))
    gauges = [
        ("mailer_dead_letters", "Messages whose newest state is failed.", int(dead)),
        ("mailer_queue_jobs", "Jobs in the arq queue (due and deferred).", int(queued)),
        ("mailer_due_messages", "Messages not yet final, waiting in the due index.", int(due)),
        (
            "mailer_oldest_due_age_seconds",
            "How long the oldest message in the due index is overdue (0: none is).",
            max(0.0, (now_ms - oldest[0][1]) / 1000) if oldest else 0.0,
        ),
    ]
    families: list[Any] = [entries, histogram, *_send_families(parse(sends))]
    for name, doc, value in gauges:
        families.append(GaugeMetricFamily(name, doc, value=value))
    alive = GaugeMetricFamily("mailer_workers_alive", "Worker processes with a heartbeat in the last 30 s.")
    alive.add_metric([], sum(1 for _, beat in workers if now_ms - beat < FRESH_MS))
    beats = GaugeMetricFamily(
        "mailer_worker_last_beat_timestamp_seconds", "Each worker's last heartbeat.", labels=["worker"]
    )
    for name, beat in workers:
        beats.add_metric([name.decode()], beat / 1000)
    circuit = GaugeMetricFamily(
        "mailer_relay_circuit_open", "1 while the relay's circuit is open.", labels=["relay"]
    )
    for state in await relay_states(redis):
        circuit.add_metric([state.relay], 1 if state.open else 0)
    return [*families, alive, beats, circuit]


Buckets = tuple[list[tuple[str, int]], float]


def _cumulative(buckets: dict[int, int], upper: Callable[[int], float]) -> Buckets:
    """Prometheus' cumulative buckets (`le` the bucket's top) and a sum estimated from the tops."""
    running, cumulative, estimated_sum = 0, [], 0.0
    for bucket, n in sorted(buckets.items()):
        running += n
        top = upper(bucket)
        cumulative.append((repr(top), running))
        estimated_sum += n * top
    cumulative.append(("+Inf", running))
    return cumulative, estimated_sum


def _send_families(stats: SendStats) -> list[Any]:
    attempts = CounterMetricFamily(
        "mailer_send_attempts",
        "Messages handed to the relay, by relay and the class of its reply (2xx, 4xx, 5xx, or "
        "no_reply: connection refused or lost, timeout).",
        labels=["relay", "reply_class"],
    )
    relays = sorted({relay for relay, _ in stats.attempts} | set(stats.durations))
    for relay in relays:
        # Every class of a relay that was used, zeros too: a rate of 4xx is then 0, not absent.
        for klass in REPLY_CLASSES:
            attempts.add_metric([relay, klass], stats.attempts.get((relay, klass), 0))
    duration = HistogramMetricFamily(
        "mailer_send_duration_seconds",
        "One message's SMTP transaction on its connection, from hand-over to the final reply "
        "(opening the connection included when the lane had none; quarter-octave buckets, the "
        "sum estimated from bucket tops).",
        labels=["relay"],
    )
    for relay in relays:
        duration.add_metric([relay], *_cumulative(stats.durations.get(relay, {}), bucket_upper_seconds))
    return [attempts, duration]


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(await _families(request.app.state.redis)))
    body = generate_latest(registry) + generate_latest(_OWN)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
