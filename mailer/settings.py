"""Configuration: every MAILER_ environment variable (or .env line), validated once at start-up."""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

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
        env_prefix="MAILER_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # Where Redis is. Unset: a private redis-server under data_dir (started by `mailer worker`).
    redis_url: str | None = None
    data_dir: Path = Path("var")
    # Maildir used when no SMTP host is set; default data_dir/outbox.
    outbox_dir: Path | None = None

    smtp_host: str | None = None
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = "starttls"
    smtp_timeout: float = Field(default=30.0, gt=0, le=600)
    smtp_max_connections: int = Field(default=3, ge=1, le=100)
    # Name sent in EHLO; set it to skip a getfqdn() lookup on every connect.
    smtp_local_hostname: str | None = None

    sender: str = Field(default="mailer <noreply@example.org>", alias="MAILER_FROM")
    template_dir: Path | None = None

    reminder_offsets: Annotated[tuple[Offset, ...], NoDecode] = Field(
        default_factory=lambda: parse_offsets("P1D,PT1H")
    )

    max_attempts: int = Field(default=10, ge=1, le=100)
    retry_base_seconds: float = Field(default=30.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    message_ttl: timedelta = timedelta(hours=48)
    # Messages per minute across all workers; unset means no limit.
    rate_limit: int | None = Field(default=None, ge=1)

    # Messages one send job carries: amortises arq's per-job cost (~330 µs).
    batch_size: int = Field(default=50, ge=1, le=1000)
    worker_max_jobs: int = Field(default=20, ge=1, le=1000)
    # How often an idle worker looks for jobs; bounds the pick-up latency.
    poll_delay: float = Field(default=0.01, gt=0, le=5)
    # A job killed with its worker runs again after job_timeout + 10 s (arq's lease).
    job_timeout: int = Field(default=40, ge=5, le=600)
    log_max_entries: int = Field(default=1_000_000, ge=1000)
    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    # Print one JSON line per outcome on stdout (the log stream keeps them either way).
    print_outcomes: bool = True

    @field_validator("reminder_offsets", mode="before")
    @classmethod
    def _parse_offsets(cls, value: object) -> object:
        if isinstance(value, str | list | tuple) and all(isinstance(v, str) for v in value):
            return parse_offsets(value)
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
    def _check_smtp(self) -> Settings:
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("MAILER_RETRY_MAX_SECONDS must be at least MAILER_RETRY_BASE_SECONDS")
        if self.smtp_password is not None and not self.smtp_username:
            raise ValueError("MAILER_SMTP_PASSWORD is set but MAILER_SMTP_USERNAME is not")
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


def load_settings(**overrides: object) -> Settings:
    """Read the settings; any problem becomes one ConfigError naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        location = ".".join(str(part) for part in error["loc"]) or "settings"
        name = location if location.startswith("MAILER_") else f"MAILER_{location.upper()}"
        message = str(error["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"{name}: {message}", setting=name) from None
