"""A real Redis Sentinel set-up for tests: one master, one replica and three Sentinels, each its
own redis-server process on a free loopback port, with passwords on the data servers and on the
Sentinels (so mailer's Sentinel auth is exercised, which arq's own Sentinel support lacks)."""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from mailer.ops.embedded import find_redis_server, redis_server_command
from mailer.state.connection import RedisTarget
from tests.conftest import free_port

MASTER_NAME = "mailer"
DATA_PASSWORD = "data-secret"  # noqa: S105 - a test server's password
SENTINEL_PASSWORD = "sentinel-secret"  # noqa: S105 - a test server's password
# Sentinel's timings, short so a failover takes seconds: the master is subjectively down after
# 1 s without a reply, and a failover that stalls is retried after twice the timeout.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


def sentinel_client(port: int) -> redis.Redis:
    """A plain (sync) client of one Sentinel, for the test's own look at what it knows."""
    return redis.Redis(host="127.0.0.1", port=port, password=SENTINEL_PASSWORD, socket_timeout=2)


@dataclass
class Node:
    """A redis-server process: a data server, or (with `sentinel_conf`) a Sentinel."""

    directory: Path
    args: list[str]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.args,
            stdout=(self.directory / "out.log").open("ab"),
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, as when a machine dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class SentinelSet:
    """One master, one replica, three Sentinels (quorum 2), all on loopback."""

    directory: Path
    master: Node = field(init=False)
    replica: Node = field(init=False)
    sentinels: list[Node] = field(init=False)

    def __post_init__(self) -> None:
        self.master = self._data_node("master", replicaof=None)
        self.replica = self._data_node("replica", replicaof=self.master.port)
        self.sentinels = [self._sentinel(f"sentinel-{n}") for n in range(3)]

    def _data_node(self, name: str, *, replicaof: int | None) -> Node:
        port = free_port()
        directory = self.directory / name
        args = redis_server_command(
            directory=directory,
            listen=["--port", str(port), "--bind", "127.0.0.1"],
            appendfsync="everysec",
        )
        args += ["--requirepass", DATA_PASSWORD, "--masterauth", DATA_PASSWORD]
        if replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(replicaof)]
        return Node(directory, args, port)

    def _sentinel(self, name: str) -> Node:
        port = free_port()
        directory = self.directory / name
        directory.mkdir(parents=True)
        conf = directory / "sentinel.conf"  # Sentinel rewrites its file: one of its own each
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
            f"requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
            f"sentinel auth-pass {MASTER_NAME} {DATA_PASSWORD}\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        return Node(directory, [find_redis_server(), str(conf), "--sentinel"], port)

    def start(self, within: float = 20.0) -> None:
        """Start everything and wait until each Sentinel sees the replica and both other Sentinels
        (a failover needs the quorum to know each other)."""
        for node in [self.master, self.replica, *self.sentinels]:
            node.start()
        deadline = time.monotonic() + within
        while not all(self._sentinel_ready(s.port) for s in self.sentinels):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Sentinel set-up not ready in {within} s; see {self.directory}")
            time.sleep(0.1)

    def _sentinel_ready(self, port: int) -> bool:
        try:
            with sentinel_client(port) as client:
                state = client.sentinel_master(MASTER_NAME)
        except redis.RedisError:
            return False
        return int(state["num-slaves"]) >= 1 and int(state["num-other-sentinels"]) >= 2

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers reports it."""
        for sentinel in self.sentinels:
            try:
                with sentinel_client(sentinel.port) as client:
                    address = client.sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if address:
                return int(address[1])
        return None

    def env(self, *, min_replicas: int = 1) -> dict[str, str]:
        """The MAILER_ variables that point mailer at this set-up."""
        return {
            "MAILER_REDIS_URL": f"redis://:{DATA_PASSWORD}@/0",
            "MAILER_REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
            "MAILER_REDIS_SENTINEL_MASTER": MASTER_NAME,
            "MAILER_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
            "MAILER_REDIS_MIN_REPLICAS": str(min_replicas),
        }

    def target(self, *, min_replicas: int = 1) -> RedisTarget:
        return RedisTarget(
            url=f"redis://:{DATA_PASSWORD}@/0",
            sentinels=[("127.0.0.1", s.port) for s in self.sentinels],
            master=MASTER_NAME,
            sentinel_password=SENTINEL_PASSWORD,
            min_replicas=min_replicas,
        )

    def replicas_in_sync(self, master_port: int) -> int:
        """How many replicas the master at `master_port` has online."""
        try:
            with redis.Redis(
                host="127.0.0.1", port=master_port, password=DATA_PASSWORD, socket_timeout=2
            ) as client:
                info = client.info("replication")
        except redis.RedisError:
            return 0
        return sum(
            1 for key, value in info.items() if key.startswith("slave") and value.get("state") == "online"
        )

    def stop(self) -> None:
        for node in [*self.sentinels, self.replica, self.master]:
            node.stop()
