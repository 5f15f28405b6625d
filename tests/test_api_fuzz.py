"""The HTTP API fuzzed from its own OpenAPI description (schemathesis), against a real uvicorn
and the tests' real Redis: whatever the description lets a client send to any operation, with
a valid token or without one, the service answers without a 5xx and without a traceback."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.internal import lambda_sources

from mailer.settings import load_settings
from mailer.web.app import create_app
from tests.test_http import AUTH, Service, service  # noqa: F401 (the module's running service)


def _described_or_unknown(f: Any, *args: Any, **kwargs: Any) -> str:
    """Hypothesis names a lambda by parsing its source with `ast`; on CPython 3.11 that parse can
    raise "SystemError: AST constructor recursion depth mismatch" (gh-106905, the bug that
    tests/test_dependencies.py reads imports with tokenize for), seen once in `make test` when a
    schemathesis filter's lambda was named for a statistics event. The name is only a
    description: say it is unknown, as hypothesis does when the source cannot be read."""
    try:
        return _lambda_description(f, *args, **kwargs)
    except SystemError:
        return "lambda: <unknown>"


_lambda_description = lambda_sources._lambda_description
lambda_sources._lambda_description = _described_or_unknown

# The description `mailer serve` publishes at /openapi.json, built here from the same app (no
# connection is made); schemathesis' fixture loader does not run under pytest 9.2.
schema = schemathesis.openapi.from_dict(create_app(load_settings(), "redis://127.0.0.1:1/0").app.openapi())


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_the_description_allows_fails_the_service(case: Any, service: Service) -> None:  # noqa: F811
    for headers in (AUTH, {}):
        response = case.call(base_url=service.url, headers=headers)
        # /readyz answers 503 by design while no worker runs: that is its message, not a failure.
        failed = response.status_code >= 500 and not case.path.startswith("/readyz")
        assert not failed, (case.method, case.path, response.status_code, response.text[:300])
