"""Configuration: every MAILER_ environment variable (or .env line), validated once at start-up."""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from email_validator import EmailNotValidError, validate_email
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mailer.durations import Offset, parse_offsets
from mailer.errors import ConfigError

SmtpSecurity = Literal["none", "starttls", "tls"]
_DEFAULT_PORTS = {"none": 25, "starttls": 587, "tls": 465}


class Settings(BaseSettings):
    """mailer's settings; see deploy/mailer.env.example for a commented list."""

    model_config = SettingsConfigDict(
        env_prefix="MAILER_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # `MAILER_SMTP_PORT=` in a .env file means "the default", as it does for a shell.
        env_ignore_empty=True,
    )

    # Where Redis is. Unset: a private redis-server under data_dir (started by `mailer worker`),
    # unless Sentinels are set.
    redis_url: str | None = None
    # Redis Sentinel, "host:port,host:port": the Sentinels say which server is the master, and
    # MAILER_REDIS_URL (optional then) gives only the scheme, password and db: rediss://:pw@/0.
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = ()
    # The name the Sentinels monitor the master under (`sentinel monitor NAME ...`).
    redis_sentinel_master: str | None = Field(default=None, min_length=1, max_length=200)
    # The Sentinels' own password (their `requirepass`), which is not the data servers'.
    redis_sentinel_password: SecretStr | None = None
    # TLS (rediss://, for the Sentinels too): the CA that signed the servers' certificates
    # (default: the system's), and a client certificate for tls-auth-clients (Redis's default).
    redis_ca_file: Path | None = None
    redis_cert_file: Path | None = None
    redis_key_file: Path | None = None
    # Replicas that must hold a write before mailer acts on it (sends the mail it marked
    # `sending`, acknowledges an event): WAIT, so a failover loses nothing mailer acted on.
    # 0: Redis's asynchronous replication alone (see deploy/README.md, Redis Sentinel).
    redis_min_replicas: int = Field(default=0, ge=0, le=16)
    data_dir: Path = Path("var")
    # Maildir used when no SMTP host is set; default data_dir/outbox.
    outbox_dir: Path | None = None

    smtp_host: str | None = None
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = "starttls"
    smtp_timeout: float = Field(default=30.0, gt=0, le=600, allow_inf_nan=False)
    smtp_max_connections: int = Field(default=3, ge=1, le=100)
    # Name sent in EHLO; set it to skip a getfqdn() lookup on every connect.
    smtp_local_hostname: str | None = None
    # AUTH over an unencrypted connection to a host that is not this machine (a private
    # network, say); without it, MAILER_SMTP_SECURITY=none with credentials is refused.
    smtp_allow_plaintext_auth: bool = False
    # Kept-open connections idle this long are closed with QUIT, before the relay's own
    # timeout (Postfix: smtpd_timeout 300 s) closes them with a "timeout" in its log.
    smtp_idle_seconds: float = Field(default=60.0, gt=0, le=3600, allow_inf_nan=False)
    # The relay circuit (mailer.state.circuit): a relay fault holds all sends; the probe that
    # tries again waits twice as long after each failure, from base up to max.
    relay_probe_base_seconds: float = Field(default=5.0, gt=0, le=3600, allow_inf_nan=False)
    relay_probe_max_seconds: float = Field(default=300.0, gt=0, le=86400, allow_inf_nan=False)

    # The envelope and From address; with no display name, each mail shows its event's
    # organiser ("Stadt Kaiserslautern <noreply@…>").
    sender: str = Field(default="noreply@example.org", alias="MAILER_FROM")
    template_dir: Path | None = None

    reminder_offsets: Annotated[tuple[Offset, ...], NoDecode] = Field(
        default_factory=lambda: parse_offsets("P1D,PT1H")
    )

    max_attempts: int = Field(default=10, ge=1, le=100)
    # Bounded by a day: arq drops a job key a day after it was due, retries included.
    retry_base_seconds: float = Field(default=30.0, gt=0, le=86400, allow_inf_nan=False)
    retry_max_seconds: float = Field(default=3600.0, gt=0, le=86400, allow_inf_nan=False)
    message_ttl: timedelta = Field(default=timedelta(hours=48), gt=timedelta(0), le=timedelta(days=30))
    # Messages per minute across all workers; unset means no limit.
    rate_limit: int | None = Field(default=None, ge=1, le=1_000_000)

    # Messages one send job carries: amortises arq's per-job cost (~330 µs).
    batch_size: int = Field(default=50, ge=1, le=1000)
    worker_max_jobs: int = Field(default=20, ge=1, le=1000)
    # How often an idle worker looks for jobs; bounds the pick-up latency.
    poll_delay: float = Field(default=0.01, gt=0, le=5, allow_inf_nan=False)
    # A job killed with its worker runs again after job_timeout + 10 s (arq's lease).
    job_timeout: int = Field(default=40, ge=5, le=600)
    # A log entry is about 300 bytes of Redis memory: the upper bound is some 30 GB.
    log_max_entries: int = Field(default=1_000_000, ge=1000, le=100_000_000)
    # Log entries older than this, and the registrations (names, addresses, message states)
    # of events that ended longer ago than this, are removed (mailer.state.retention).
    # 90 like django-post_office; at least a day, at most ten years.
    retention_days: int = Field(default=90, ge=1, le=3650)
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # The operator footer under every mail; unset parts leave no line. The legal sender's
    # postal address, one line with ";" between its lines ("Stadtverwaltung; Platz 1; 67657 Ort").
    footer_address: str | None = Field(default=None, max_length=500)
    privacy_url: str | None = Field(default=None, max_length=2000)
    imprint_url: str | None = Field(default=None, max_length=2000)
    # Print one JSON line per outcome on stdout (the log stream keeps them either way).
    print_outcomes: bool = True
    # `mailer serve`: the bearer tokens its API accepts, comma-separated so a new one can be
    # added before the old one is removed (rotation without downtime). Unset: intake is off.
    api_token: SecretStr | None = None
    # The largest request body `POST /v1/events` reads (a batch of 1 000 full events is ~2 MB).
    api_max_body_bytes: int = Field(default=5_000_000, ge=10_000, le=100_000_000)
    # Ops alert mails, for sites without Prometheus (mailer.ops.alerts): where to (addresses,
    # comma-separated; unset: no alert mail), and when. A mail when the dead letters reach
    # alert_dead_letters (and again when they grow further), a relay circuit stays open
    # alert_circuit_minutes, or a due message waits alert_stall_minutes; at most one an hour
    # per cause.
    alert_email: Annotated[tuple[str, ...], NoDecode] = ()
    alert_dead_letters: int = Field(default=10, ge=1, le=100_000_000)
    alert_circuit_minutes: float = Field(default=5.0, gt=0, le=1440, allow_inf_nan=False)
    alert_stall_minutes: float = Field(default=15.0, gt=0, le=1440, allow_inf_nan=False)
    alert_locale: Literal["de", "en"] = "de"

    @property
    def api_tokens(self) -> list[bytes]:
        """The accepted tokens (empty: none configured)."""
        if self.api_token is None:
            return []
        return [t.strip().encode() for t in self.api_token.get_secret_value().split(",") if t.strip()]

    @field_validator("reminder_offsets", mode="before")
    @classmethod
    def _parse_offsets(cls, value: object) -> object:
        if isinstance(value, str | list | tuple) and all(isinstance(v, str) for v in value):
            return parse_offsets(value)
        return value

    @field_validator("alert_email", mode="before")
    @classmethod
    def _check_alert_email(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        addresses: list[str] = []
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                checked = validate_email(part.strip(), check_deliverability=False)
            except EmailNotValidError as exc:
                raise ValueError(f"{part.strip()!r} is not an address: {exc}") from None
            address = checked.ascii_email or checked.normalized
            if address.lower() in (a.lower() for a in addresses):
                raise ValueError(f"{address} is given twice")
            addresses.append(address)
        if len(addresses) > 20:
            raise ValueError(f"{len(addresses)} addresses; at most 20 (use a list address for more)")
        return tuple(addresses)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value)
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _parse_sentinels(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_sentinels(value)
        return value

    @field_validator("redis_sentinel_master")
    @classmethod
    def _check_master_name(cls, value: str | None) -> str | None:
        if value is not None and any(ord(ch) <= 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must be one word without spaces or control characters, e.g. mymaster")
        return value

    @field_validator("redis_ca_file", "redis_cert_file", "redis_key_file")
    @classmethod
    def _check_tls_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a file")
        return value

    @field_validator("footer_address")
    @classmethod
    def _check_footer_address(cls, value: str | None) -> str | None:
        if value is not None and any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
            raise ValueError('must be one line without control characters (separate lines with ";")')
        return value

    @field_validator("privacy_url", "imprint_url")
    @classmethod
    def _check_footer_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or any(ord(ch) <= 32 or 127 <= ord(ch) < 160 for ch in value)
            ):
                raise ValueError(
                    "must be an http(s) URL without spaces, e.g. https://www.example.org/datenschutz"
                )
        return value

    @field_validator("template_dir")
    @classmethod
    def _check_template_dir(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a directory")
        return value

    @field_validator("sender")
    @classmethod
    def _check_sender(cls, value: str) -> str:
        from email.utils import parseaddr

        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError("must not contain control characters")
        _, address = parseaddr(value)
        try:
            validate_email(address, check_deliverability=False)
        except EmailNotValidError as exc:
            raise ValueError(f"{value!r} has no valid address: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        # Each message starts with the settings involved: load_settings reads the first as
        # the one to fix.
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError(
                "MAILER_RETRY_MAX_SECONDS, MAILER_RETRY_BASE_SECONDS: "
                f"the maximum ({self.retry_max_seconds:g}) is less than the base "
                f"({self.retry_base_seconds:g})"
            )
        if self.relay_probe_max_seconds < self.relay_probe_base_seconds:
            raise ValueError(
                "MAILER_RELAY_PROBE_MAX_SECONDS, MAILER_RELAY_PROBE_BASE_SECONDS: "
                f"the maximum ({self.relay_probe_max_seconds:g}) is less than the base "
                f"({self.relay_probe_base_seconds:g})"
            )
        if timedelta(days=self.retention_days) < self.message_ttl:
            raise ValueError(
                "MAILER_RETENTION_DAYS, MAILER_MESSAGE_TTL: "
                f"retention ({self.retention_days} d) is shorter than a message's lifetime "
                f"({self.message_ttl.total_seconds() / 3600:g} h): the log of a message still "
                "being retried would be trimmed"
            )
        _check_redis_combinations(self)
        if self.smtp_password is not None and not self.smtp_username:
            raise ValueError("MAILER_SMTP_USERNAME, MAILER_SMTP_PASSWORD: a password is set but no username")
        if (
            self.smtp_host
            and self.smtp_security == "none"
            and (self.smtp_username or self.smtp_password is not None)
            and not self.smtp_allow_plaintext_auth
            and not is_loopback(self.smtp_host)
        ):
            raise ValueError(
                "MAILER_SMTP_SECURITY, MAILER_SMTP_USERNAME, MAILER_SMTP_ALLOW_PLAINTEXT_AUTH: "
                f"MAILER_SMTP_SECURITY=none would send the password unencrypted to {self.smtp_host}; "
                "use starttls or tls, or set MAILER_SMTP_ALLOW_PLAINTEXT_AUTH=true if the network "
                "to the relay is private"
            )
        return self

    @property
    def effective_smtp_port(self) -> int:
        return self.smtp_port or _DEFAULT_PORTS[self.smtp_security]

    @property
    def effective_outbox_dir(self) -> Path:
        return self.outbox_dir or self.data_dir / "outbox"

    @property
    def sender_domain(self) -> str:
        """The domain of MAILER_FROM: used for Message-IDs and calendar UIDs."""
        return self.sender.rsplit("@", 1)[-1].strip("> ").lower()


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1: a connection that never leaves this machine."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_redis_url(url: str) -> None:
    """Refuse a URL redis-py would choke on later; the message never repeats a password."""
    if any(ord(ch) < 33 or ord(ch) == 127 for ch in url):
        raise ValueError("contains spaces or control characters")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must start with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("unix:// needs the socket's path, e.g. unix:///run/redis/redis.sock")
        return
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"the database {db!r} after the host must be a number, e.g. /0")


def parse_sentinels(text: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (IPv6 as [::1]:26379) as (host, port) pairs; empty text: none."""
    if not text.strip():
        return ()
    found: list[tuple[str, int]] = []
    for number, entry in enumerate(text.split(","), start=1):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"entry {number} is empty (a stray comma?); write host:port,host:port")
        if "/" in entry or "@" in entry:
            raise ValueError(f"entry {number} ({entry!r}): write host:port, without scheme or user")
        host, colon, port = entry.rpartition(":")
        if not colon:
            raise ValueError(f"entry {number} ({entry!r}) needs a port, e.g. 10.0.0.5:26379")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(
                f"entry {number} ({entry!r}): write an IPv6 address in brackets, e.g. [::1]:26379"
            )
        if not host or any(ord(ch) <= 32 or ord(ch) == 127 or ch in "/@[]," for ch in host):
            raise ValueError(f"entry {number} ({entry!r}) has no usable host")
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"entry {number} ({entry!r}): the port must be a number from 1 to 65535")
        if (host.lower(), int(port)) in {(h.lower(), p) for h, p in found}:
            raise ValueError(f"{entry!r} is listed twice")
        found.append((host, int(port)))
    return tuple(found)


def _check_redis_combinations(settings: Settings) -> None:
    """Sentinel and TLS settings that contradict each other or the URL (first name: the one to fix)."""
    url = urlsplit(settings.redis_url or "")
    server = url.netloc.rpartition("@")[2]  # what the URL says about where: host and port
    if url.scheme in ("redis", "rediss") and not server and not settings.redis_sentinels:
        raise ValueError("MAILER_REDIS_URL: names no host, e.g. redis://127.0.0.1:6379/0")
    if settings.redis_sentinels:
        if not settings.redis_sentinel_master:
            raise ValueError(
                "MAILER_REDIS_SENTINEL_MASTER, MAILER_REDIS_SENTINELS: Sentinels are set but not the "
                "name they monitor the master under (`sentinel monitor NAME ...` in sentinel.conf)"
            )
        if url.scheme == "unix" or server:
            raise ValueError(
                "MAILER_REDIS_URL, MAILER_REDIS_SENTINELS: with Sentinels the URL names no server (the "
                "Sentinels say which is the master); keep only scheme, password and db, e.g. rediss://:PASSWORD@/0"
            )
    elif settings.redis_sentinel_master or settings.redis_sentinel_password is not None:
        which = "MASTER" if settings.redis_sentinel_master else "PASSWORD"
        raise ValueError(
            f"MAILER_REDIS_SENTINELS, MAILER_REDIS_SENTINEL_{which}: a Sentinel setting is set but no "
            "Sentinels (host:port,host:port)"
        )
    tls_files = {
        "MAILER_REDIS_CA_FILE": settings.redis_ca_file,
        "MAILER_REDIS_CERT_FILE": settings.redis_cert_file,
        "MAILER_REDIS_KEY_FILE": settings.redis_key_file,
    }
    given = [name for name, path in tls_files.items() if path is not None]
    if given and url.scheme != "rediss":
        raise ValueError(
            f"{given[0]}, MAILER_REDIS_URL: a TLS file is set but TLS is off; "
            "use a rediss:// URL (with Sentinels, rediss:// alone will do)"
        )
    if (settings.redis_cert_file is None) != (settings.redis_key_file is None):
        missing = "MAILER_REDIS_KEY_FILE" if settings.redis_key_file is None else "MAILER_REDIS_CERT_FILE"
        raise ValueError(
            f"{missing}: a client certificate needs both MAILER_REDIS_CERT_FILE and MAILER_REDIS_KEY_FILE"
        )
    _check_tls_material(settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)


def _check_tls_material(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> None:
    """Load the files as the connections will, so a wrong file fails at start-up, not at connect."""
    import ssl

    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(
                f"MAILER_REDIS_CA_FILE: {ca_file} holds no usable PEM certificate ({exc})"
            ) from None
    if cert_file is not None and key_file is not None:
        try:
            context.load_cert_chain(certfile=cert_file, keyfile=key_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(
                f"MAILER_REDIS_CERT_FILE, MAILER_REDIS_KEY_FILE: {cert_file} and {key_file} are not a "
                f"PEM certificate and its key ({exc})"
            ) from None


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; any problem becomes one ConfigError (one line) naming the variable.

    `overrides` are field values (tests, the bench); pydantic validates them like the rest.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = " ".join(str(error["msg"]).removeprefix("Value error, ").split())
        location = ".".join(str(part) for part in error["loc"])
        if location:
            name = location if location.startswith("MAILER_") else f"MAILER_{location.upper()}"
            raise ConfigError(f"{name}: {message}", setting=name) from None
        # A check across settings names them all at the start of its message.
        name = message.split(",", 1)[0].split(":", 1)[0]
        raise ConfigError(message, setting=name) from None
