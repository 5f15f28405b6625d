"""Settings: every value is checked at start-up, and a bad one is one line naming the variable."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.errors import ConfigError
from mailer.settings import Settings, load_settings

# (field, lowest, highest) as the operator documentation promises them.
NUMERIC: dict[str, tuple[float, float]] = {
    "smtp_port": (1, 65535),
    "smtp_timeout": (0, 600),
    "smtp_max_connections": (1, 100),
    "smtp_idle_seconds": (0, 3600),
    "relay_probe_base_seconds": (0, 3600),
    "relay_probe_max_seconds": (0, 86400),
    "max_attempts": (1, 100),
    "retry_base_seconds": (0, 86400),
    "retry_max_seconds": (0, 86400),
    "message_ttl": (0, 30 * 86400),
    "rate_limit": (1, 1_000_000),
    "batch_size": (1, 1000),
    "worker_max_jobs": (1, 1000),
    "poll_delay": (0, 5),
    "job_timeout": (5, 600),
    "log_max_entries": (1000, 100_000_000),
    "api_max_body_bytes": (10_000, 100_000_000),
    "retention_days": (1, 3650),
    "alert_dead_letters": (1, 100_000_000),
    "alert_circuit_minutes": (0, 1440),
    "alert_stall_minutes": (0, 1440),
}
HOSTILE = ["-1", "0", "-0.5", "inf", "-inf", "nan", "1e30", "1e400", "abc", "1" * 23, "-PT1H", "P9999999999D"]


@pytest.fixture
def no_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAILER_ variable and no .env from the developer's checkout."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MAILER_"):
            monkeypatch.delenv(name)


@contextmanager
def env(**values: str) -> Iterator[None]:
    """Set MAILER_ variables for one hypothesis example (monkeypatch is per test, not per example)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def env_name(field: str) -> str:
    return f"MAILER_{field.upper()}"


def as_number(value: object) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)  # type: ignore[arg-type]


def test_every_numeric_setting_is_bounded_here() -> None:
    """A numeric setting added later must be added to NUMERIC, so the tests below cover it."""
    numeric = {
        name
        for name, field in Settings.model_fields.items()
        if any(t in str(field.annotation) for t in ("int", "float", "timedelta"))
    }
    # host:port pairs, and a count whose 0 is valid: each with a table of its own below
    assert numeric - {"redis_sentinels", "redis_min_replicas"} == set(NUMERIC)


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("field", sorted(NUMERIC))
def test_every_numeric_setting_refuses_hostile_values(no_env: None, field: str, value: str) -> None:
    """Negative, zero, infinite, NaN, huge and non-numeric values are one ConfigError naming the variable."""
    with env(**{env_name(field): value}), pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == env_name(field)
    assert str(caught.value).startswith(env_name(field) + ":")
    assert "\n" not in str(caught.value)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(
    field=st.sampled_from(sorted(NUMERIC)),
    text=st.one_of(
        st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30),
        st.floats().map(str),
        st.integers().map(str),
        st.integers(min_value=0, max_value=10**6).map(lambda n: f"PT{n}S"),
    ),
)
def test_a_numeric_setting_either_loads_in_bounds_or_is_refused_by_name(
    no_env: None, field: str, text: str
) -> None:
    """Whatever text an operator writes, the result is a finite value within bounds or a ConfigError
    that names that variable: never a traceback, never an unbounded value."""
    try:
        with env(**{env_name(field): text}):
            loaded = load_settings()
    except ConfigError as exc:
        refusal = str(exc)
        assert env_name(field) in refusal, refusal
        assert "\n" not in refusal
        return
    if getattr(loaded, field) is None:
        assert field in ("smtp_port", "rate_limit")  # optional: unset means the default
        return
    value = as_number(getattr(loaded, field))
    lowest, highest = NUMERIC[field]
    assert math.isfinite(value)
    assert lowest <= value <= highest
    if lowest == 0:
        assert value > 0


def test_typical_values_load(no_env: None) -> None:
    """The values of deploy/mailer.env.example load as written."""
    with env(
        MAILER_SMTP_PORT="587",
        MAILER_SMTP_TIMEOUT="30",
        MAILER_MESSAGE_TTL="PT48H",
        MAILER_RETRY_BASE_SECONDS="30",
        MAILER_RETRY_MAX_SECONDS="3600",
        MAILER_LOG_MAX_ENTRIES="1000000",
        MAILER_RATE_LIMIT="30",
    ):
        loaded = load_settings()
    assert loaded.message_ttl == timedelta(hours=48)
    assert loaded.smtp_port == 587


def test_an_empty_variable_means_unset(no_env: None) -> None:
    """`MAILER_SMTP_PORT=` in a .env file is the default, not an error; so is `MAILER_REDIS_URL=`."""
    with env(MAILER_SMTP_PORT="", MAILER_RATE_LIMIT="", MAILER_REDIS_URL=""):
        loaded = load_settings()
    assert loaded.smtp_port is None
    assert loaded.rate_limit is None
    assert loaded.redis_url is None


@pytest.mark.parametrize(
    "url",
    [
        "nonsense",
        "http://127.0.0.1:6379/0",
        "redis://",
        "redis://127.0.0.1:notaport/0",
        "redis://127.0.0.1:99999/0",
        "redis://127.0.0.1:6379/abc",
        "unix://",
        "redis://127.0.0.1:6379/0\n",
    ],
)
def test_a_malformed_redis_url_is_a_config_error(no_env: None, url: str) -> None:
    """MAILER_REDIS_URL must be redis://, rediss:// or unix:// with a host or path it can use."""
    with env(MAILER_REDIS_URL=url), pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == "MAILER_REDIS_URL"
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "rediss://:secret@redis.example.org:6380/2", "unix:///run/redis/redis.sock"],
)
def test_well_formed_redis_urls_load(no_env: None, url: str) -> None:
    """The three schemes redis-py speaks are accepted."""
    with env(MAILER_REDIS_URL=url):
        assert load_settings().redis_url == url


def test_a_redis_url_error_does_not_echo_the_password(no_env: None) -> None:
    """A URL with a password in it is refused without printing the password."""
    with env(MAILER_REDIS_URL="redis://:hunter2@host:port/0"), pytest.raises(ConfigError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)


def test_a_missing_template_dir_is_a_config_error(no_env: None, tmp_path: Path) -> None:
    """MAILER_TEMPLATE_DIR must be an existing directory."""
    with env(MAILER_TEMPLATE_DIR=str(tmp_path / "nope")), pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == "MAILER_TEMPLATE_DIR"
    (tmp_path / "file").write_text("x")
    with env(MAILER_TEMPLATE_DIR=str(tmp_path / "file")), pytest.raises(ConfigError):
        load_settings()
    (tmp_path / "tpl").mkdir()
    with env(MAILER_TEMPLATE_DIR=str(tmp_path / "tpl")):
        assert load_settings().template_dir == tmp_path / "tpl"


def test_combination_errors_name_every_setting_involved(no_env: None) -> None:
    """When two settings contradict each other, the message names both."""
    with (
        env(MAILER_RETRY_BASE_SECONDS="600", MAILER_RETRY_MAX_SECONDS="60"),
        pytest.raises(ConfigError) as c1,
    ):
        load_settings()
    assert "MAILER_RETRY_BASE_SECONDS" in str(c1.value)
    assert "MAILER_RETRY_MAX_SECONDS" in str(c1.value)
    assert c1.value.setting == "MAILER_RETRY_MAX_SECONDS"
    with (
        env(MAILER_RELAY_PROBE_BASE_SECONDS="600", MAILER_RELAY_PROBE_MAX_SECONDS="60"),
        pytest.raises(ConfigError) as c3,
    ):
        load_settings()
    assert "MAILER_RELAY_PROBE_BASE_SECONDS" in str(c3.value)
    assert "MAILER_RELAY_PROBE_MAX_SECONDS" in str(c3.value)
    with env(MAILER_SMTP_PASSWORD="pw"), pytest.raises(ConfigError) as c2:  # noqa: S106 - a test value
        load_settings()
    assert "MAILER_SMTP_PASSWORD" in str(c2.value)
    assert "MAILER_SMTP_USERNAME" in str(c2.value)


PLAINTEXT = {
    "MAILER_SMTP_SECURITY": "none",
    "MAILER_SMTP_USERNAME": "mailer",
    "MAILER_SMTP_PASSWORD": "secret",
}


def test_credentials_over_plaintext_to_a_remote_host_are_refused(no_env: None) -> None:
    """AUTH without TLS to a host off this machine would send the password in clear: refused,
    naming the settings that decide it."""
    with env(**PLAINTEXT, MAILER_SMTP_HOST="smtp.example.org"), pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    for name in ("MAILER_SMTP_SECURITY", "MAILER_SMTP_USERNAME", "MAILER_SMTP_ALLOW_PLAINTEXT_AUTH"):
        assert name in message
    assert "secret" not in message


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.8.9.10", "::1", "[::1]"])
def test_credentials_over_plaintext_to_loopback_are_allowed(no_env: None, host: str) -> None:
    """A relay on this machine (a local Postfix, a test server) sees no network in between."""
    with env(**PLAINTEXT, MAILER_SMTP_HOST=host):
        assert load_settings().smtp_username == "mailer"


def test_plaintext_auth_can_be_allowed_explicitly(no_env: None) -> None:
    """MAILER_SMTP_ALLOW_PLAINTEXT_AUTH=true is the operator's explicit choice (a private network)."""
    with env(**PLAINTEXT, MAILER_SMTP_HOST="10.0.0.5", MAILER_SMTP_ALLOW_PLAINTEXT_AUTH="true"):
        loaded: Settings = load_settings()
    assert loaded.smtp_allow_plaintext_auth is True
    with env(MAILER_SMTP_HOST="smtp.example.org", MAILER_SMTP_SECURITY="none"):
        assert load_settings().smtp_username is None  # no credentials: nothing to leak


def run_worker(tmp_path: Path, **values: str) -> subprocess.CompletedProcess[bytes]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return subprocess.run(
        [sys.executable, "-m", "mailer", "worker"],
        cwd=tmp_path,
        env={**clean, **values},
        capture_output=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "values",
    [
        {"MAILER_MESSAGE_TTL": "-PT1H"},
        {"MAILER_RETRY_BASE_SECONDS": "inf"},
        {"MAILER_LOG_MAX_ENTRIES": "1" * 23},
        {"MAILER_REDIS_URL": "nonsense"},
        {"MAILER_TEMPLATE_DIR": "/nonexistent/templates"},
        {**PLAINTEXT, "MAILER_SMTP_HOST": "smtp.example.org"},
    ],
    ids=["ttl", "retry", "log", "url", "templates", "plaintext"],
)
def test_the_worker_exits_2_with_one_line_on_a_bad_setting(tmp_path: Path, values: dict[str, str]) -> None:
    """`mailer worker` with a bad setting: exit status 2, one line on stderr, no traceback."""
    result = run_worker(tmp_path, **values)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("mailer: configuration error: MAILER_")
    assert "Traceback" not in err


def test_the_example_env_file_loads(no_env: None, tmp_path: Path) -> None:
    """deploy/mailer.env.example, copied to .env as its first line says, is a valid configuration."""
    example = Path(__file__).resolve().parent.parent / "deploy" / "mailer.env.example"
    (tmp_path / ".env").write_text(example.read_text())
    loaded = load_settings()
    assert loaded.smtp_host == "smtp.example.org"
    assert loaded.smtp_security == "starttls"
    assert loaded.smtp_allow_plaintext_auth is False


@pytest.mark.parametrize(
    "value",
    [
        "ops",
        "ops@",
        "ops@example.org,ops@EXAMPLE.org",
        "ops@example.org;dev@example.org",
        "Ops <ops@example.org>",
        "ops@example.org\r\nBcc: x@evil.example",
        ",".join(f"ops{i}@example.org" for i in range(21)),
    ],
    ids=["no-at", "no-domain", "twice", "semicolon", "display-name", "header-injection", "21"],
)
def test_a_bad_alert_address_is_one_line_naming_the_setting(no_env: None, value: str) -> None:
    with env(MAILER_ALERT_EMAIL=value), pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == "MAILER_ALERT_EMAIL"
    assert "\n" not in str(caught.value)


def test_alert_addresses_load_as_a_list_in_ascii(no_env: None) -> None:
    with env(MAILER_ALERT_EMAIL=" ops@example.org , leitstelle@bücher.example ,"):
        assert load_settings().alert_email == ("ops@example.org", "leitstelle@xn--bcher-kva.example")
    with env(MAILER_ALERT_LOCALE="fr"), pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == "MAILER_ALERT_LOCALE"


# --- Redis Sentinel and TLS -------------------------------------------------------------------

SENTINEL = {
    "MAILER_REDIS_SENTINELS": "10.0.0.5:26379,10.0.0.6:26379",
    "MAILER_REDIS_SENTINEL_MASTER": "mymaster",
}


@pytest.mark.parametrize(
    ("sentinels", "says"),
    [
        ("10.0.0.5:26379,,10.0.0.6:26379", "entry 2 is empty"),
        ("10.0.0.5:26379,", "entry 2 is empty"),
        (",", "entry 1 is empty"),
        (":26379", "has no usable host"),
        ("10.0.0.5", "needs a port"),
        ("10.0.0.5:", "the port must be a number"),
        ("10.0.0.5:0", "the port must be a number"),
        ("10.0.0.5:65536", "the port must be a number"),
        ("10.0.0.5:-1", "the port must be a number"),
        ("10.0.0.5:2637９", "the port must be a number"),  # a full-width digit
        ("10.0.0.5:abc", "the port must be a number"),
        ("::1:26379", "IPv6 address in brackets"),
        ("[]:26379", "has no usable host"),
        ("redis://10.0.0.5:26379", "without scheme or user"),
        ("10.0.0.5 :26379", "has no usable host"),
        ("user@10.0.0.5:26379", "without scheme or user"),
        ("10.0.0.5:26379,10.0.0.5:26379", "listed twice"),
        ("Sentinel-A:26379,sentinel-a:26379", "listed twice"),
    ],
)
def test_malformed_sentinel_lists_are_one_line_naming_the_setting(
    no_env: None, sentinels: str, says: str
) -> None:
    """Empty entries, missing or bad ports, hosts that are not hosts and duplicates: one line
    naming MAILER_REDIS_SENTINELS and saying which entry is wrong."""
    with (
        env(MAILER_REDIS_SENTINELS=sentinels, MAILER_REDIS_SENTINEL_MASTER="m"),
        pytest.raises(ConfigError) as caught,
    ):
        load_settings()
    assert caught.value.setting == "MAILER_REDIS_SENTINELS"
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_sentinels_load_with_ipv6_and_names(no_env: None) -> None:
    """host:port pairs in order; IPv6 in brackets; spaces around commas are forgiven."""
    with env(
        MAILER_REDIS_SENTINELS=" [::1]:26379 , sentinel-b.internal:26380,10.0.0.7:1",
        MAILER_REDIS_SENTINEL_MASTER="m",
    ):
        loaded = load_settings()
    assert loaded.redis_sentinels == (("::1", 26379), ("sentinel-b.internal", 26380), ("10.0.0.7", 1))


@pytest.mark.parametrize(
    ("values", "setting", "says"),
    [
        ({"MAILER_REDIS_SENTINELS": "10.0.0.5:26379"}, "MAILER_REDIS_SENTINEL_MASTER", "not the name"),
        (
            {**SENTINEL, "MAILER_REDIS_SENTINEL_MASTER": "my master"},
            "MAILER_REDIS_SENTINEL_MASTER",
            "one word",
        ),
        ({**SENTINEL, "MAILER_REDIS_SENTINEL_MASTER": "m\tx"}, "MAILER_REDIS_SENTINEL_MASTER", "one word"),
        ({"MAILER_REDIS_SENTINEL_MASTER": "mymaster"}, "MAILER_REDIS_SENTINELS", "no Sentinels"),
        ({"MAILER_REDIS_SENTINEL_PASSWORD": "pw"}, "MAILER_REDIS_SENTINELS", "no Sentinels"),
        ({**SENTINEL, "MAILER_REDIS_URL": "redis://10.0.0.9:6379/0"}, "MAILER_REDIS_URL", "names no server"),
        ({**SENTINEL, "MAILER_REDIS_URL": "redis://:6379/0"}, "MAILER_REDIS_URL", "names no server"),
        ({**SENTINEL, "MAILER_REDIS_URL": "unix:///run/redis.sock"}, "MAILER_REDIS_URL", "names no server"),
        ({**SENTINEL, "MAILER_REDIS_URL": "rediss://:pw@/x"}, "MAILER_REDIS_URL", "must be a number"),
        ({"MAILER_REDIS_URL": "redis://:pw@/0"}, "MAILER_REDIS_URL", "names no host"),
    ],
)
def test_sentinel_settings_that_contradict_are_refused(
    no_env: None, values: dict[str, str], setting: str, says: str
) -> None:
    """A master name without Sentinels (or the reverse), and a URL that names a server the
    Sentinels would override: one line naming the setting to fix, never the password."""
    with env(**values), pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == setting
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "pw@" not in str(caught.value)


@pytest.mark.parametrize("url", [None, "redis://:secret@/2", "rediss://", "rediss://user:secret@/0"])
def test_sentinels_take_scheme_credentials_and_db_from_the_url(no_env: None, url: str | None) -> None:
    """With Sentinels the URL is optional and names no server; no embedded Redis is started."""
    from mailer.state.connection import RedisTarget

    values = {
        **SENTINEL,
        "MAILER_REDIS_SENTINEL_PASSWORD": "s3",
        **({"MAILER_REDIS_URL": url} if url else {}),
    }
    with env(**values):
        target = RedisTarget.from_settings(load_settings())
    assert target is not None
    assert target.sentinels == (("10.0.0.5", 26379), ("10.0.0.6", 26379))
    assert target.sentinel_password == "s3"  # noqa: S105 - the test's own value
    described = target.describe()
    assert "secret" not in described
    assert "s3" not in described
    assert described.startswith("Sentinel master mymaster via 10.0.0.5:26379,10.0.0.6:26379")


def pem_pair(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate and its key, made by openssl."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_files_are_checked_at_start_up(no_env: None, tmp_path: Path) -> None:
    """A CA file that is missing, a directory or not PEM; TLS files with TLS off; a certificate
    without its key or with the wrong key: each one line naming the setting, exit 2 at start-up
    rather than a handshake error at the first connection."""
    cert, key = pem_pair(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_key = pem_pair(other)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    tls = {"MAILER_REDIS_URL": "rediss://redis.example.org:6380/0"}
    cases: list[tuple[dict[str, str], str, str]] = [
        (
            {**tls, "MAILER_REDIS_CA_FILE": str(tmp_path / "missing.pem")},
            "MAILER_REDIS_CA_FILE",
            "is not a file",
        ),
        ({**tls, "MAILER_REDIS_CA_FILE": str(tmp_path)}, "MAILER_REDIS_CA_FILE", "is not a file"),
        ({**tls, "MAILER_REDIS_CA_FILE": str(junk)}, "MAILER_REDIS_CA_FILE", "no usable PEM"),
        ({**tls, "MAILER_REDIS_CA_FILE": str(key)}, "MAILER_REDIS_CA_FILE", "no usable PEM"),
        (
            {"MAILER_REDIS_URL": "redis://h:6379/0", "MAILER_REDIS_CA_FILE": str(cert)},
            "MAILER_REDIS_CA_FILE",
            "TLS is off",
        ),
        ({**SENTINEL, "MAILER_REDIS_CA_FILE": str(cert)}, "MAILER_REDIS_CA_FILE", "TLS is off"),
        ({**tls, "MAILER_REDIS_CERT_FILE": str(cert)}, "MAILER_REDIS_KEY_FILE", "needs both"),
        ({**tls, "MAILER_REDIS_KEY_FILE": str(key)}, "MAILER_REDIS_CERT_FILE", "needs both"),
        (
            {**tls, "MAILER_REDIS_CERT_FILE": str(cert), "MAILER_REDIS_KEY_FILE": str(wrong_key)},
            "MAILER_REDIS_CERT_FILE",
            "not a PEM certificate and its key",
        ),
    ]
    for values, setting, says in cases:
        with env(**values), pytest.raises(ConfigError) as caught:
            load_settings()
        assert caught.value.setting == setting, values
        assert says in str(caught.value), (values, str(caught.value))
        assert "\n" not in str(caught.value)
    with env(
        **tls,
        MAILER_REDIS_CA_FILE=str(cert),
        MAILER_REDIS_CERT_FILE=str(cert),
        MAILER_REDIS_KEY_FILE=str(key),
    ):
        assert load_settings().redis_ca_file == cert
    with env(**tls):  # rediss:// without a CA file: the system's CAs
        assert load_settings().redis_ca_file is None


def test_a_bad_sentinel_setting_stops_the_worker_with_exit_2(no_env: None, tmp_path: Path) -> None:
    """Start-up refuses it in one line on stderr, exit status 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "mailer", "worker"],
        env={
            "PATH": os.environ["PATH"],
            "MAILER_REDIS_SENTINELS": "127.0.0.1:26379,:1",
            "MAILER_REDIS_SENTINEL_MASTER": "m",
        },
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.decode().strip().count("\n") == 0, result.stderr
    assert "MAILER_REDIS_SENTINELS" in result.stderr.decode()


@pytest.mark.parametrize("value", ["-1", "17", "1.5", "inf", "nan", "one", "1e3"])
def test_min_replicas_refuses_what_is_not_a_small_count(no_env: None, value: str) -> None:
    """MAILER_REDIS_MIN_REPLICAS is 0 (the default: no WAIT) to 16."""
    with env(MAILER_REDIS_MIN_REPLICAS=value), pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == "MAILER_REDIS_MIN_REPLICAS"
    with env(MAILER_REDIS_MIN_REPLICAS="2"):
        assert load_settings().redis_min_replicas == 2
