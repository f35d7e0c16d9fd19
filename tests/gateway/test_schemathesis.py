"""schemathesis against the gateway's own OpenAPI: no 5xx, and every response matches the documented
status codes, content types, headers and schemas. Bounded: a few dozen examples per operation."""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.gateway.conftest import Gateway

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, ignored_auth]


@pytest.fixture
def gateway_schema(parked_gateway: Gateway) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(parked_gateway.url + "/openapi.json")


@pytest.fixture
def token(keys) -> str:  # type: ignore[no-untyped-def]
    return str(keys.create("schemathesis", "fuzz", 0)[1])


def operations(schema: schemathesis.BaseSchema) -> list[schemathesis.APIOperation]:
    return [result.ok() for result in schema.get_all_operations()]


# Driven through hypothesis directly (schemathesis' own pytest plugin does not load under pytest 9).
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_gateway_conforms_to_its_openapi(gateway_schema: schemathesis.BaseSchema, token: str,
                                         mode: GenerationMode) -> None:
    started = time.monotonic()
    for operation in operations(gateway_schema):
        if mode == GenerationMode.NEGATIVE and not list(operation.iter_parameters()):
            continue  # nothing to get wrong in GET /healthz or /metrics

        # /readyz and a valid chat or Responses request answer a documented 503 here: no worker reads the
        # parked gateway's queues.
        checks = [c for c in CHECKS if c is not not_a_server_error or operation.path not in (
            "/readyz", "/v1/chat/completions", "/v1/responses")]

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def conforms(case: schemathesis.Case) -> None:
            if mode == GenerationMode.NEGATIVE and "" in (case.query or {}):
                return  # an empty-named query key with no value is never sent: not a negative case at all
            case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=checks, timeout=30)

        conforms()
    assert time.monotonic() - started < 60


def test_schema_is_complete(gateway_schema: schemathesis.BaseSchema) -> None:
    assert {(op.method.upper(), op.path) for op in operations(gateway_schema)} == {
        ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("DELETE", "/v1/jobs/{job_id}"),
        ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
        ("POST", "/v1/chat/completions"), ("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"),
        ("DELETE", "/v1/responses/{response_id}"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
        ("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/{file_id}"),
        ("GET", "/v1/files/{file_id}/content"), ("DELETE", "/v1/files/{file_id}"), ("POST", "/v1/batches"),
        ("GET", "/v1/batches"), ("GET", "/v1/batches/{batch_id}"), ("POST", "/v1/batches/{batch_id}/cancel"),
        ("POST", "/v1/audio/transcriptions")}
