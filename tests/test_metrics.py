"""`GET /metrics` as a scraper reads it from a real `mailer serve`, while a real worker sends to the
tests' aiosmtpd with faults injected server-side; and the files built on those names:
deploy/prometheus/alerts.yml (checked and unit-tested with promtool) and the Grafana dashboard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mailer.intake.client import MailerClient
from tests.conftest import RedisServer, SmtpServer, make_event, settled
from tests.test_http import Service, start_service, stop_service

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def service(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(redis_server.url, tmp_path_factory.mktemp("serve-metrics"))
    yield running
    stop_service(running)
    assert "Traceback" not in running.log.read_text()


async def scrape(service: Service) -> tuple[str, Samples]:
    """/metrics as Prometheus parses it: the text, and each sample by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(base_url=service.url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def relay_of(smtp: SmtpServer) -> str:
    return f"smtp:{smtp.host}:{smtp.port}"


def attempts(samples: Samples, relay: str) -> dict[str, float]:
    """mailer_send_attempts_total of one relay, by reply class."""
    return {
        dict(labels)["reply_class"]: value
        for (name, labels), value in samples.items()
        if name == "mailer_send_attempts_total" and dict(labels).get("relay") == relay
    }


def duration_buckets(samples: Samples, relay: str) -> list[tuple[float, float]]:
    """mailer_send_duration_seconds' cumulative buckets of one relay: (le, count), ascending."""
    return sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in samples.items()
        if name == "mailer_send_duration_seconds_bucket" and dict(labels).get("relay") == relay
    )


async def publish(redis_url: str, emails: list[str]) -> None:
    async with MailerClient(redis_url) as client:
        for n, email in enumerate(emails):
            await client.publish(make_event(event_id=f"evt-{n}", registration_id=f"reg-{n}", email=email))


async def test_attempts_are_counted_by_the_class_of_the_relays_reply(
    redis_url: str, smtp_server: SmtpServer, mail_worker: Any, service: Service
) -> None:
    """Greylisted twice then taken, refused for good, dropped mid-DATA then taken, taken at
    once: seven attempts, each in its reply class, each in the duration histogram once."""
    faults = {
        "grey@example.org": lambda n: "451 4.7.1 Greylisted, try later" if n <= 2 else None,
        "unknown@example.org": lambda n: "550 5.1.1 User unknown",
        "drop@example.org": lambda n: "drop" if n == 1 else None,
    }
    smtp_server.handler.fault = lambda rcpt, n: faults[rcpt](n) if rcpt in faults else None
    await mail_worker()
    await publish(redis_url, ["ok@example.org", *faults])
    await settled(redis_url)
    text, samples = await scrape(service)
    relay = relay_of(smtp_server)
    assert attempts(samples, relay) == {"2xx": 3, "4xx": 2, "5xx": 1, "no_reply": 1}
    assert samples[("mailer_send_duration_seconds_count", (("relay", relay),))] == 7
    assert duration_buckets(samples, relay)[-1] == (float("inf"), 7)
    assert "@example.org" not in text  # counted, never named


async def test_the_send_duration_is_the_transactions_time(
    redis_url: str, smtp_server: SmtpServer, mail_worker: Any, service: Service
) -> None:
    """A relay that takes 0.4 s per DATA puts every send at 0.4 s or more; a stalled reply that
    times out after MAILER_SMTP_TIMEOUT (1 s) is a no_reply attempt of a second or more."""
    smtp_server.handler.delay = 0.4
    smtp_server.handler.fault = lambda rcpt, n: "stall" if rcpt == "stall@example.org" and n == 1 else None
    await mail_worker(smtp_timeout=1.0)
    await publish(redis_url, ["slow@example.org", "stall@example.org"])
    await settled(redis_url)
    _, samples = await scrape(service)
    relay = relay_of(smtp_server)
    assert attempts(samples, relay) == {"2xx": 2, "4xx": 0, "5xx": 0, "no_reply": 1}
    buckets = duration_buckets(samples, relay)
    below = max(count for le, count in buckets if le < 0.4) if buckets[0][0] < 0.4 else 0
    assert below == 0, buckets  # nothing faster than the relay's 0.4 s
    assert max(count for le, count in buckets if le < 1.0) == 2, buckets  # the two taken ones
    assert buckets[-1] == (float("inf"), 3)
    assert samples[("mailer_send_duration_seconds_sum", (("relay", relay),))] >= 0.4 + 0.4 + 1.0
