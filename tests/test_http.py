"""`mailer serve` against a real uvicorn on a free port and the tests' real Redis: intake for any
language, its tokens and limits, probes, and arbitrary bodies that must never make it fail."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.state.logquery import LogFilter, iter_log
from mailer.state.queue import connect_client
from tests.conftest import RedisServer, SmtpServer, make_event, wait_for

TOKENS = "old-token-4f1c9,new-token-8a2d7"
AUTH = {"Authorization": "Bearer new-token-8a2d7"}


@dataclass
class Service:
    url: str
    log: Path
    process: subprocess.Popen[bytes]


@contextlib.asynccontextmanager
async def redis_at(url: str) -> AsyncIterator[Any]:
    """A client of the tests' Redis for one block, closed after it."""
    redis = await connect_client(url)
    try:
        yield redis
    finally:
        await redis.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(redis_url: str, directory: Path, **env: str) -> Service:
    port = free_port()
    log = directory / f"serve-{port}.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "mailer", "serve", "--port", str(port)],
        env=clean | {"MAILER_REDIS_URL": redis_url, "MAILER_DATA_DIR": str(directory / "var")} | env,
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return Service(url, log, process)
        except httpx.TransportError:
            time.sleep(0.05)  # not listening yet: nothing to wait on but the port


def stop_service(service: Service) -> None:
    service.process.terminate()
    service.process.wait(timeout=10)


@pytest.fixture(scope="module")
def service(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = start_service(redis_server.url, tmp_path_factory.mktemp("serve"), MAILER_API_TOKEN=TOKENS)
    yield running
    stop_service(running)
    # Whatever the tests sent, the service answered without a stack trace in its log.
    assert "Traceback" not in running.log.read_text()


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The RFC 9457 body of an error answer, checked for the members every problem has."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


async def rejected(redis_url: str) -> list[str]:
    async with redis_at(redis_url) as redis:
        return [e.detail async for e in iter_log(redis, LogFilter(status="rejected"))]


async def test_an_event_posted_over_http_is_sent(
    redis_url: str, service: Service, smtp_server: SmtpServer, worker_process: Any
) -> None:
    """POST one event with a token: 202 with its id; the worker sends the confirmation."""
    worker_process(redis_url, smtp_server)
    async with httpx.AsyncClient(base_url=service.url) as http:
        answer = await http.post("/v1/events", json=make_event(), headers=AUTH)
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"accepted": ["evt-1"]}
    await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)


async def test_the_delivery_api_answers_what_the_cli_answers(
    redis_url: str, service: Service, smtp_server: SmtpServer, worker_process: Any
) -> None:
    """After a posted registration is sent: GET /v1/deliveries finds its entry by recipient (any
    case); /v1/registrations/ID tells its story message by message; /v1/messages/ID one
    message; /v1/stats counts it. Unknown ids are 404,
    bad filters 422, and all of it needs the token."""
    worker_process(redis_url, smtp_server)
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH) as http:
        assert (await http.post("/v1/events", json=make_event())).status_code == 202
        await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)
        deadline = time.monotonic() + 10
        while not (
            found := (
                await http.get("/v1/deliveries", params={"recipient": "MARIA.Mueller@example.org"})
            ).json()
        )["entries"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)  # the `sent` entry follows the relay's 250
        (sent,) = found["entries"]
        assert (sent["status"], sent["message_id"], sent["recipient"]) == (
            "sent",
            "reg-1001/confirmation",
            "maria.mueller@example.org",
        )
        assert found["next_cursor"] is None
        story = (await http.get("/v1/registrations/reg-1001")).json()
        by_kind = {m["kind"]: m for m in story["messages"]}
        assert by_kind["confirmation"]["status"] == "sent"
        assert [e["id"] for e in by_kind["confirmation"]["entries"]] == [sent["id"]]
        assert by_kind["confirmation"]["now"] == {"status": "sent", "next_look": None}  # final
        assert story["event_id"] == "weltoffen"
        one = (await http.get("/v1/messages/reg-1001/confirmation")).json()
        assert [m["message_id"] for m in one["messages"]] == ["reg-1001/confirmation"]
        counted = (await http.get("/v1/stats", params={"event": "weltoffen"})).json()
        assert counted["counts"]["sent"] == {"confirmation": 1}
        problem(await http.get("/v1/registrations/reg-404"), 404)
        problem(await http.get("/v1/messages/reg-1001/nonsense"), 422)
        problem(await http.get("/v1/deliveries", params={"status": "lost"}), 422)
        problem(await http.get("/v1/deliveries", params={"since": "2026-12-01T10:00"}), 422)
        problem(await http.get("/v1/deliveries", params={"cursor": "x"}), 422)
        problem(await http.get("/v1/deliveries", headers={"Authorization": ""}), 401)


async def test_repairs_over_http_redrive_what_failed_and_erase_an_attendee(
    redis_url: str, service: Service, smtp_server: SmtpServer, worker_process: Any
) -> None:
    """A confirmation the relay refused (550): POST /v1/retry with dry_run lists it and changes
    nothing; POST /v1/messages/ID/retry sends it again once the relay takes it, and a second
    retry is 409 naming its status; DELETE /v1/attendees/EMAIL erases the address."""
    refusing = {"on": True}
    smtp_server.handler.fault = lambda rcpt, n: "550 5.1.1 User unknown" if refusing["on"] else None
    worker_process(redis_url, smtp_server)
    message = "reg-1001/confirmation"
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH) as http:
        assert (await http.post("/v1/events", json=make_event())).status_code == 202
        deadline = time.monotonic() + 20
        while not (await http.get("/v1/deliveries", params={"status": "failed"})).json()["entries"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)  # the worker's attempt, through the API
        dry = (await http.post("/v1/retry", json={"status": "failed", "dry_run": True})).json()
        assert dry == {"dry_run": True, "chosen": [message], "redriven": [], "refused": {}}
        assert (await http.get(f"/v1/messages/{message}")).json()["messages"][0]["status"] == "failed"
        refusing["on"] = False
        again = await http.post(f"/v1/messages/{message}/retry")
        assert again.status_code == 202, again.text
        assert again.json() == {"redriven": [message]}
        await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)
        assert "is " in problem(await http.post(f"/v1/messages/{message}/retry"), 409)["detail"]
        problem(await http.post("/v1/retry", json={"status": "sent"}), 422)
        problem(await http.post("/v1/retry", json={"status": "failed", "everything": True}), 422)
        problem(await http.post("/v1/messages/reg-1001/nonsense/retry"), 422)
        erased = (await http.delete("/v1/attendees/Maria.Mueller@example.org")).json()
        assert erased["registrations"] == [{"registration_id": "reg-1001", "event_id": "weltoffen"}]
        left = await http.get("/v1/deliveries", params={"recipient": "maria.mueller@example.org"})
        assert left.json()["entries"] == []
        problem(await http.delete("/v1/attendees/not-an-address"), 422)
    async with redis_at(redis_url) as redis:
        redriven = [e async for e in iter_log(redis, LogFilter(status="redriven"))]
    assert [e.detail.startswith("HTTP API, request ") for e in redriven] == [True]


async def test_deliveries_page_by_cursor_through_every_entry(redis_url: str, service: Service) -> None:
    """Seven refusals read three at a time: every entry once, newest first, then no cursor."""
    async with redis_at(redis_url) as redis:
        from mailer.state.deliverylog import DeliveryLog, LogEntry

        log = DeliveryLog(redis, max_entries=1000, echo=None)
        await log.write([LogEntry(ts=log.now(), status="rejected", detail=f"r{i}") for i in range(7)])
    seen: list[str] = []
    cursor = None
    async with httpx.AsyncClient(base_url=service.url, headers=AUTH) as http:
        for _ in range(4):
            params = {"status": "rejected", "limit": "3"} | ({"cursor": cursor} if cursor else {})
            page = (await http.get("/v1/deliveries", params=params)).json()
            seen += [e["detail"] for e in page["entries"]]
            if (cursor := page["next_cursor"]) is None:
                break
    assert seen == [f"r{i}" for i in reversed(range(7))]


async def test_both_tokens_work_others_are_refused_and_none_is_logged(
    redis_url: str, service: Service
) -> None:
    """Either configured token is accepted (rotation); a missing, wrong or non-bearer one is 401
    with WWW-Authenticate; the service's log never shows a token."""
    async with httpx.AsyncClient(base_url=service.url) as http:
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic old-token-4f1c9"}):
            refused = await http.post("/v1/events", json=make_event(), headers=header)
            problem(refused, 401)
            assert refused.headers["www-authenticate"].startswith("Bearer")
        old = await http.post(
            "/v1/events",
            json=make_event(event_id="e-old"),
            headers={"Authorization": "Bearer old-token-4f1c9"},
        )
        assert old.status_code == 202, old.text
    text = service.log.read_text()
    assert "POST /v1/events 401" in text
    assert "POST /v1/events 202" in text
    assert "token-4f1c9" not in text
    assert "token-8a2d7" not in text


async def test_without_a_token_configured_intake_is_off(redis_url: str, tmp_path: Path) -> None:
    """No MAILER_API_TOKEN: the API answers 503 saying how to turn it on, and queues nothing."""
    off = start_service(redis_url, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=off.url) as http:
            body = problem(await http.post("/v1/events", json=make_event(), headers=AUTH), 503)
    finally:
        stop_service(off)
    assert "MAILER_API_TOKEN" in body["detail"]
    async with redis_at(redis_url) as redis:
        assert await redis.llen("mailer:inbox") == 0


async def test_a_batch_queues_the_valid_records_and_names_each_invalid_line(
    redis_url: str, service: Service
) -> None:
    """NDJSON with a bad address on line 2 and a line that is not JSON on line 4: 422 naming
    those lines, field and reason; the valid records are queued and listed; each refusal is a
    `rejected` log entry naming its line."""
    lines = [
        make_event(event_id="b-1", registration_id="r-1"),
        make_event(event_id="b-2", registration_id="r-2", email="not an address"),
        make_event(event_id="b-3", registration_id="r-3"),
    ]
    body = b"\n".join(orjson.dumps(line) for line in lines) + b"\n{not json\n"
    async with httpx.AsyncClient(base_url=service.url) as http:
        answer = await http.post(
            "/v1/events", content=body, headers=AUTH | {"Content-Type": "application/x-ndjson"}
        )
        found = problem(answer, 422)
        array = await http.post("/v1/events", json=[make_event(event_id="a-1")], headers=AUTH)
    assert found["accepted"] == ["b-1", "b-3"]
    assert [(e["line"], e["field"]) for e in found["errors"]] == [
        (2, "registration.attendee.email"),
        (4, "(record)"),
    ]
    assert found["errors"][0]["event_id"] == "b-2"
    assert array.status_code == 202
    assert array.json() == {"accepted": ["a-1"]}
    details = await rejected(redis_url)
    assert any(d.startswith("POST /v1/events line 2: registration.attendee.email") for d in details), details
    assert any(d.startswith("POST /v1/events line 4: (record)") for d in details), details
    async with redis_at(redis_url) as redis:
        assert await redis.zcard("mailer:queue") >= 1  # the batch's job, for the worker to apply


async def test_an_idempotency_key_replays_the_first_answer_and_queues_once(
    redis_url: str, service: Service
) -> None:
    """The same key and body again: the first answer (202 or the 422 of a mixed batch), marked
    Idempotent-Replayed, and nothing queued twice; the same key with another body is 422; a
    malformed key 400."""
    once = {"Idempotency-Key": "order-2026-0001"} | AUTH
    async with httpx.AsyncClient(base_url=service.url) as http:
        event = make_event(event_id="i-1")
        first = await http.post("/v1/events", json=event, headers=once)
        again = await http.post("/v1/events", json=event, headers=once)
        other = await http.post("/v1/events", json=make_event(event_id="i-2"), headers=once)
        mixed = [make_event(event_id="m-1"), {"type": "nonsense"}]
        batch = {"Idempotency-Key": "import-7"} | AUTH
        batch_first = await http.post("/v1/events", json=mixed, headers=batch)
        batch_again = await http.post("/v1/events", json=mixed, headers=batch)
        bad = await http.post(
            "/v1/events", json=make_event(), headers={"Idempotency-Key": "has space"} | AUTH
        )
    assert first.status_code == again.status_code == 202
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert "different body" in problem(other, 422)["detail"]
    assert batch_first.status_code == batch_again.status_code == 422
    assert batch_again.json()["accepted"] == ["m-1"]
    assert batch_again.json()["errors"] == batch_first.json()["errors"]
    problem(bad, 400)
    async with redis_at(redis_url) as redis:
        assert await redis.llen("mailer:inbox") == 1  # i-1, once
        jobs = [j.decode() for j in await redis.zrange("mailer:queue", 0, -1)]
        assert len([j for j in jobs if j.startswith("events:")]) == 1, jobs  # the batch's job, once
        assert len(await rejected(redis_url)) == 1  # the nonsense record, logged once


async def test_the_limits_are_refused_before_anything_is_queued(redis_url: str, tmp_path: Path) -> None:
    """413 over the body size (MAILER_API_MAX_BODY_BYTES) or past 1 000 records, 415 for another
    media type, 400 for a body that is not JSON; nothing of them is queued."""
    small = start_service(redis_url, tmp_path, MAILER_API_TOKEN=TOKENS, MAILER_API_MAX_BODY_BYTES="20000")
    try:
        async with httpx.AsyncClient(base_url=small.url) as http:
            big = orjson.dumps([make_event(event_id=f"x-{i}") for i in range(40)])
            assert (
                "20000 bytes"
                in problem(await http.post("/v1/events", content=big, headers=AUTH), 413)["detail"]
            )
            many = b"\n".join(b"{}" for _ in range(1001))
            ndjson = AUTH | {"Content-Type": "application/x-ndjson"}
            assert (
                "1000 records"
                in problem(await http.post("/v1/events", content=many, headers=ndjson), 413)["detail"]
            )
            text = AUTH | {"Content-Type": "text/plain"}
            problem(await http.post("/v1/events", content=b"{}", headers=text), 415)
            problem(
                await http.post(
                    "/v1/events", content=b"{oops", headers=AUTH | {"Content-Type": "application/json"}
                ),
                400,
            )
    finally:
        stop_service(small)
    async with redis_at(redis_url) as redis:
        assert await redis.llen("mailer:inbox") == 0
        assert await redis.zcard("mailer:queue") == 0


async def test_ready_only_with_a_fresh_worker_heartbeat(
    redis_url: str, service: Service, smtp_server: SmtpServer, worker_process: Any
) -> None:
    """/healthz and /readyz need no token. Without a worker /readyz is 503 and says so; once a
    worker process beats, 200 with its name."""
    async with httpx.AsyncClient(base_url=service.url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        waiting = await http.get("/readyz")
        assert waiting.status_code == 503
        assert "mailer worker" in waiting.json()["checks"]["workers"]["reason"]
        # No worker: mail does not flow, but producers can still hand events over.
        intake = await http.get("/readyz/intake")
        assert intake.status_code == 200, intake.text
        assert intake.json()["ready"] is True
        assert set(intake.json()["checks"]) == {"redis"}
        worker_process(redis_url, smtp_server, MAILER_WORKER_NAME="w-http-1")
        deadline = time.monotonic() + 20
        while (ready := await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            await asyncio.sleep(0.1)  # the heartbeat is a key in Redis; polled through the API
    assert ready.json()["checks"]["workers"]["alive"] == ["w-http-1"]


bodies = st.one_of(
    st.binary(max_size=300),
    st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=20,
    ).map(orjson.dumps),
    st.lists(st.just(make_event()), max_size=3).map(orjson.dumps),
    st.sampled_from(
        [b'{"id": 123456789012345678901234567890}', b"[" * 5000, rb'"\ud800"', b"\xef\xbb\xbf{}"]
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=bodies,
    content_type=st.sampled_from(
        ["application/json", "application/x-ndjson", "", "text/plain", "application/json; charset=utf-8"]
    ),
)
def test_no_body_makes_the_intake_fail(service: Service, body: bytes, content_type: str) -> None:
    """Arbitrary bytes, JSON of any shape and valid batches, under any media type: every answer
    is 202, or a problem (400, 413, 415, 422) with its fields; never a 5xx."""
    headers = AUTH | ({"Content-Type": content_type} if content_type else {})
    answer = httpx.post(service.url + "/v1/events", content=body, headers=headers, timeout=10)
    if answer.status_code == 202:
        assert isinstance(answer.json()["accepted"], list)
        return
    problem(answer, answer.status_code)
    assert answer.status_code in (400, 413, 415, 422), answer.text


def test_the_readmes_curl_example_works_as_written(redis_url: str, service: Service) -> None:
    """The curl command of README's HTTP intake section, run as written (against this test's
    service and token), gets the answer the README shows."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("curl -sS -X POST http://127.0.0.1:8080/v1/events")
    block = readme[start : readme.index("\n# ", start)]
    shown = readme[readme.index("\n# ", start) + 3 :].split("\n", 1)[0]
    command = block.replace("http://127.0.0.1:8080", service.url).replace("change-me", "new-token-8a2d7")
    done = subprocess.run(
        ["bash", "-c", command], cwd=Path(__file__).parent.parent, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == orjson.loads(shown)


FILTER_NAMES = [
    "recipient",
    "registration",
    "message",
    "event",
    "status",
    "kind",
    "since",
    "until",
    "limit",
    "cursor",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    params=st.dictionaries(st.sampled_from(FILTER_NAMES), st.text(max_size=40), max_size=5),
    path=st.text(max_size=40),
)
def test_no_query_or_id_makes_the_delivery_api_fail(
    service: Service, params: dict[str, str], path: str
) -> None:
    """Arbitrary filter values and ids: 200, or a problem (404, 422); never a 5xx."""
    for url, query in (
        ("/v1/deliveries", params),
        ("/v1/stats", {k: v for k, v in params.items() if k in ("event", "since")}),
        ("/v1/registrations/" + quote(path, safe=""), {}),
        ("/v1/messages/" + quote(path, safe="/"), {}),
    ):
        answer = httpx.get(service.url + url, params=query, headers=AUTH, timeout=10)
        if answer.status_code != 200:
            problem(answer, answer.status_code)
            assert answer.status_code in (404, 405, 422), (url, query, answer.text)


async def test_the_openapi_description_and_docs_are_served(service: Service) -> None:
    """/openapi.json describes the endpoints the README lists; /docs is the interactive page.
    Both hold no data and need no token, so a developer can read them before having one."""
    async with httpx.AsyncClient(base_url=service.url) as http:
        spec = (await http.get("/openapi.json")).json()
        docs = await http.get("/docs")
    assert {
        "/v1/events",
        "/v1/deliveries",
        "/v1/registrations/{registration_id}",
        "/v1/messages/{message_id}",
        "/v1/stats",
        "/healthz",
        "/readyz",
        "/readyz/intake",
    } <= set(spec["paths"])
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


async def test_metrics_need_no_token_and_count_what_happened(
    redis_url: str, service: Service, smtp_server: SmtpServer, worker_process: Any
) -> None:
    """After one mail sent and one refused token: /metrics (Prometheus text, no token) counts
    the sent confirmation, its latency, a live worker, and the intake answers; every name is
    prefixed mailer_ and no attendee is named."""
    from prometheus_client.parser import text_string_to_metric_families

    worker_process(redis_url, smtp_server, MAILER_WORKER_NAME="w-metrics")
    async with httpx.AsyncClient(base_url=service.url) as http:
        assert (await http.post("/v1/events", json=make_event(), headers=AUTH)).status_code == 202
        assert (await http.post("/v1/events", json=make_event())).status_code == 401
        await wait_for(lambda: len(smtp_server.handler.received) == 1, 20)
        deadline = time.monotonic() + 10
        while True:
            text = (await http.get("/metrics")).text
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            confirmation_sent = (("kind", "confirmation"), ("status", "sent"))
            sent = samples.get(("mailer_log_entries_total", confirmation_sent), 0)
            alive = samples.get(("mailer_workers_alive", ()), 0)
            if sent == 1 and alive >= 1:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.05)  # the sent entry and the first heartbeat, as scraped
    assert samples[("mailer_delivery_latency_seconds_count", ())] == 1
    assert samples[("mailer_intake_requests_total", (("status", "202"),))] >= 1
    assert samples[("mailer_intake_requests_total", (("status", "401"),))] >= 1
    assert samples[("mailer_dead_letters", ())] == 0
    assert ("mailer_worker_last_beat_timestamp_seconds", (("worker", "w-metrics"),)) in samples
    assert all(name.startswith("mailer_") for name, _ in samples)
    assert "maria" not in text.lower()
