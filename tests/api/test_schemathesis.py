"""Schemathesis over every operation of the OpenAPI document, in-process (WSGI) on real Postgres and
Redis, with a valid key: generated requests, valid and not, must never get a 5xx, and every answer must
conform to the document (status code documented, content type, schema).

One check is left out: "a schema-valid request is accepted". The document states each body's fields and
their types, not every rule between them (exactly one of `messages` or `prompt`; `cache` only at
temperature 0; no NUL in text), so some requests it allows are refused with a 4xx saying why; that is
the API doing its job, and every such answer is still checked against the document."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tasks.jobs import tenants
from tests.support import auth

EXAMPLES = 25  # per operation


def test_no_operation_answers_5xx_or_off_the_document(app, db, api_redis):
    key = tenants.create_tenant(db, "schemathesis")[1]
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    failures = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/readyz":  # a probe: its 503 means "not ready", which it is here (no worker)
            continue

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def run(case):
            case.headers = {**(case.headers or {}), **auth(key)}
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - hypothesis raises a group; collected, reported together
            if isinstance(exc, KeyboardInterrupt):
                raise
            failures[f"{operation.method.upper()} {operation.path}"] = str(exc)[:600]
    assert not failures, "\n\n".join(f"{op}: {why}" for op, why in failures.items())
