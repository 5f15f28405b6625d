"""Where mailer's Redis is and how to reach it: one server by URL, or the master Redis Sentinel
names, with TLS for both; every connection pool mailer opens is built here.

arq's own Sentinel support (RedisSettings(sentinel=True)) cannot authenticate to the Sentinels
nor speak TLS to them, so mailer builds redis-py's SentinelConnectionPool itself and arq's
client on top of it (mailer.state.queue.connect).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from mailer.errors import ConfigError

if TYPE_CHECKING:
    from mailer.settings import Settings

# Fail fast on a dead server; the worker's own loop does the patient retrying.
CONNECT_TIMEOUT_S = 2.0
# A Sentinel that accepts the connection and then hangs (a stopped process, a partition) must
# not hold a discovery forever: the next Sentinel in the list is asked instead.
SENTINEL_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where Redis is: a URL (redis://, rediss://, unix://), or Sentinels and the name they
    monitor the master under, the URL then giving only scheme, credentials and db
    (``rediss://:PASSWORD@/0``). TLS files apply to the data servers and the Sentinels alike.
    """

    url: str = "redis://"
    sentinels: Sequence[tuple[str, int]] = ()
    master: str = ""
    sentinel_password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # Replicas that must confirm an event's write before a producer is told it was taken
    # (MAILER_REDIS_MIN_REPLICAS; mailer.state.replication).
    min_replicas: int = 0

    @classmethod
    def of(cls, where: RedisTarget | str) -> RedisTarget:
        """A target from a URL (the form mailer's API took first), or the target itself."""
        return where if isinstance(where, RedisTarget) else cls(url=where)

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisTarget | None:
        """The configured Redis; None if neither MAILER_REDIS_URL nor Sentinels are set."""
        if settings.redis_url is None and not settings.redis_sentinels:
            return None
        password = settings.redis_sentinel_password
        return cls(
            url=settings.redis_url or "redis://",
            sentinels=tuple(settings.redis_sentinels),
            master=settings.redis_sentinel_master or "",
            sentinel_password=password.get_secret_value() if password is not None else None,
            ca_file=str(settings.redis_ca_file) if settings.redis_ca_file else None,
            cert_file=str(settings.redis_cert_file) if settings.redis_cert_file else None,
            key_file=str(settings.redis_key_file) if settings.redis_key_file else None,
            min_replicas=settings.redis_min_replicas,
        )

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    def describe(self, master_at: tuple[str, int] | None = None) -> str:
        """For logs and messages, passwords masked: the URL, or the master's name, the
        Sentinels asked and (once known) the address they gave."""
        if not self.sentinels:
            return masked_url(self.url)
        asked = ",".join(_host_port(host, port) for host, port in self.sentinels)
        at = f" at {_host_port(*master_at)}" if master_at else ""
        db = urlsplit(self.url).path.strip("/") or "0"
        scheme = "rediss" if self.tls else "redis"
        return f"Sentinel master {self.master}{at} via {asked} ({scheme}, db {db})"

    def tls_options(self) -> dict[str, Any]:
        """redis-py's SSL arguments: the CA and client certificate, and the server's name (or
        IP address) checked against its certificate."""
        return {
            "ssl_ca_certs": self.ca_file,
            "ssl_certfile": self.cert_file,
            "ssl_keyfile": self.key_file,
            "ssl_cert_reqs": "required",
            # redis-py 5 leaves this off; without it any certificate the CA signed would do.
            "ssl_check_hostname": True,
        }


def masked_url(url: str) -> str:
    """A Redis URL with any password masked, for logs and messages."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def where_connected(pool: ConnectionPool, target: RedisTarget) -> str:
    """`target.describe()` with the master's address the Sentinels last gave, if any."""
    master_at = getattr(pool, "master_address", None)
    return target.describe(tuple(master_at) if master_at else None)


def open_pool(target: RedisTarget) -> ConnectionPool:
    """A connection pool for `target` (nothing is connected yet); a URL redis-py cannot read
    is a ConfigError naming MAILER_REDIS_URL."""
    try:
        options: dict[str, Any] = dict(parse_url(target.url))
    except ValueError as exc:
        raise ConfigError(f"MAILER_REDIS_URL: {exc}", setting="MAILER_REDIS_URL") from None
    base = options.pop("connection_class", Connection)
    options["socket_connect_timeout"] = CONNECT_TIMEOUT_S
    if target.tls:
        options |= target.tls_options()
    if not target.sentinels:
        return ConnectionPool(connection_class=_HIREDIS_PACKING.get(base, base), **options)
    options.pop("host", None)
    options.pop("port", None)
    managed = SentinelManagedSSLConnection if target.tls else SentinelManagedConnection
    sentinel_options: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": SENTINEL_TIMEOUT_S,
        "password": target.sentinel_password,
    }
    if target.tls:
        sentinel_options |= {"ssl": True, **target.tls_options()}
    sentinels = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    return _SentinelPool(  # type: ignore[no-untyped-call]
        target.master,
        sentinels,
        connection_class=_HIREDIS_PACKING.get(managed, managed),
        **options,
    )


class _SentinelPool(SentinelConnectionPool):
    """The master's connections; closing them all closes the Sentinel connections too (redis-py
    leaves those open, one per Sentinel, for as long as the process runs)."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.aclose()


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _HiredisPacking:
    """Commands packed by hiredis (C), as redis-py's sync connections do when it is installed.

    redis-py 5's asyncio connections pack every command in Python, re-joining the buffer
    per argument: with a few hundred commands per batch that was ~8 % of a worker's CPU
    (py-spy); hiredis packs a 15-argument HSET in 1.5 us instead of 13.6 us.
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)
        return packed

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self._packer.pack(*command)[0] for command in commands)]


class _HiredisConnection(_HiredisPacking, Connection):
    pass


class _HiredisUnixConnection(_HiredisPacking, UnixDomainSocketConnection):
    pass


class _HiredisSSLConnection(_HiredisPacking, SSLConnection):
    pass


class _HiredisSentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class _HiredisSentinelSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    pass


_HIREDIS_PACKING: dict[type[Any], type[Any]] = (
    {
        Connection: _HiredisConnection,
        UnixDomainSocketConnection: _HiredisUnixConnection,
        SSLConnection: _HiredisSSLConnection,
        SentinelManagedConnection: _HiredisSentinelConnection,
        SentinelManagedSSLConnection: _HiredisSentinelSSLConnection,
    }
    if HIREDIS_AVAILABLE
    else {}
)
