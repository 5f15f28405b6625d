"""`GET /metrics` as a scraper reads it from a real `mailer serve`, while a real worker sends to the
tests' aiosmtpd with faults injected server-side; and the files built on those names:
deploy/prometheus/alerts.yml (checked and unit-tested with promtool) and the Grafana dashboard."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml

from mailer.constants import SEND_STATS_KEY
from mailer.errors import RelayFault
from mailer.intake.client import MailerClient
from mailer.state.circuit import RelayCircuit
from tests.conftest import RedisServer, SmtpServer, make_event, settled
from tests.test_http import Service, redis_at, start_service, stop_service

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "mailer.json"
README = DEPLOY.parent / "README.md"
METRIC_NAME = re.compile(r"\b(mailer_[a-z0-9_]+)\b")


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
    async with redis_at(redis_url) as redis:
        stored = await redis.hgetall(SEND_STATS_KEY)
    for name in stored:  # the hash names no message, registration, event or address
        assert name.decode().startswith(("c|", "d|")), name
        assert not re.search(rb"reg-|evt-|@|weltoffen", name), name


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


# --- deploy/prometheus/alerts.yml and deploy/grafana/mailer.json ------------------------------


def promtool() -> str:
    """promtool's path; the test skips, saying how to get it, where it is not installed."""
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: Debian's prometheus package (APT_PACKAGES; make system-deps)")
    return path


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    panels = orjson.loads(DASHBOARD.read_bytes())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def test_the_alert_rules_pass_promtool_check() -> None:
    """`promtool check rules` reads every rule, its PromQL and its templates."""
    result = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"SUCCESS: 5 rules found" in result.stdout


def test_each_alert_fires_on_its_trouble_and_not_on_a_near_miss() -> None:
    """`promtool test rules alerts.test.yml` passes, and that file has, for every alert, a case
    where it fires (with its annotations as rendered) and one where it must not."""
    command = [promtool(), "test", "rules", str(ALERT_TESTS)]
    result = subprocess.run(command, capture_output=True, timeout=60, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown to fire"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} is never shown quiet"
        shown = [alert for case in mine for alert in case["exp_alerts"]]
        assert all(alert["exp_annotations"].keys() == {"summary", "description"} for alert in shown)
    assert {rule["alert"] for rule in alert_rules()} == {
        "MailerDeadLettersGrowing",
        "MailerOldDueMessage",
        "MailerHighTransientFailureRate",
        "MailerRelayCircuitOpen",
        "MailerNoWorkerHeartbeat",
    }


def test_every_alert_says_what_to_do() -> None:
    """Each alert has a summary and a description naming a mailer command or the README."""
    for rule in alert_rules():
        notes = rule["annotations"]
        assert notes["summary"].startswith("mailer: "), rule["alert"]
        assert "`mailer " in notes["description"], rule["alert"]
        assert "README" in notes["description"] or "deploy/README.md" in notes["description"], rule["alert"]


def test_the_dashboard_shows_each_view_with_valid_promql(tmp_path: Path) -> None:
    """deploy/grafana/mailer.json parses, has a panel for each view the README names, every
    target asks the dashboard's Prometheus data source, and every query is PromQL promtool
    accepts (as a recording rule)."""
    board = orjson.loads(DASHBOARD.read_bytes())
    titles = [panel["title"] for panel in board["panels"]]
    for view in (
        "Sends per minute by status",
        "Queue and due depth",
        "Oldest due age",
        "Dead letters",
        "Delivery latency (planned → sent)",
        "Send duration",
        "Send attempts per minute by reply class",
        "Relay circuit",
        "Workers alive",
        "Intake requests per minute by status",
    ):
        assert view in titles
    assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"])
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    quantiles = [e for e in dashboard_exprs() if e.startswith("histogram_quantile(")]
    assert any("mailer_delivery_latency_seconds_bucket" in e for e in quantiles)
    assert any("mailer_send_duration_seconds_bucket" in e for e in quantiles)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{n}", "expr": expr} for n, expr in enumerate(dashboard_exprs())
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_every_metric_the_alerts_and_the_dashboard_use_is_emitted(
    redis_url: str, smtp_server: SmtpServer, worker_process: Any, service: Service
) -> None:
    """A running mailer serve, a worker process that sent a mail, an open relay circuit and an intake
    request: every mailer_ name in alerts.yml, alerts.test.yml and the dashboard is a sample
    name /metrics emits (a renamed metric fails here, not silently in production)."""
    worker_process(redis_url, smtp_server)  # its own process: it beats as operators run it
    await publish(redis_url, ["ok@example.org"])
    await settled(redis_url)
    async with redis_at(redis_url) as redis:
        circuit = RelayCircuit(redis, relay="smtp:relay.example.org:587", base_ms=60_000, cap_ms=60_000)
        await circuit.trip(RelayFault("421 4.3.2 try later", code=421), now_ms=int(time.time() * 1000))
    async with httpx.AsyncClient(base_url=service.url) as http:
        await http.post("/v1/events", json=make_event())  # 503: intake is off without a token
    emitted: set[str] = set()
    families: set[str] = set()

    async def scraped_all() -> bool:
        text, samples = await scrape(service)
        emitted.clear()
        emitted.update(name for name, _ in samples)
        families.update(re.findall(r"^# TYPE (\S+)", text, re.M))
        return samples.get(("mailer_workers_alive", ()), 0) >= 1  # the worker's first beat

    deadline = time.monotonic() + 20
    while not await scraped_all():
        assert time.monotonic() < deadline, sorted(emitted)
        await asyncio.sleep(0.05)  # the worker's first heartbeat, as scraped
    used = {
        "alerts.yml": {n for rule in alert_rules() for n in METRIC_NAME.findall(rule["expr"])},
        "alerts.test.yml": {
            METRIC_NAME.findall(series["series"])[0]
            for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
            for series in test["input_series"]
        },
        "mailer.json": {n for expr in dashboard_exprs() for n in METRIC_NAME.findall(expr)},
    }
    for where, names in used.items():
        assert names, where
        assert names <= emitted, f"{where} uses {sorted(names - emitted)}, not in /metrics"
    assert {"mailer_send_attempts_total", "mailer_send_duration_seconds_bucket"} <= used["mailer.json"]
    # The README's list of what /metrics emits is what it emits, no more and no less.
    listed = set(METRIC_NAME.findall(readme_metrics()))
    assert listed <= emitted | families
    assert listed == families


def readme_metrics() -> str:
    """The README's `GET /metrics` item."""
    text = README.read_text()
    start = text.index("- `GET /metrics`")
    return text[start : text.index("\n- ", start)]


def test_the_readme_names_each_alert() -> None:
    """The README's alerts.yml item names every alert there is, and no other."""
    text = README.read_text()
    start = text.index("- `deploy/prometheus/alerts.yml`")
    item = text[start : text.index("\n- ", start)]
    assert set(re.findall(r"`(Mailer[A-Za-z]+)`", item)) == {rule["alert"] for rule in alert_rules()}
