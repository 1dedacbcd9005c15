"""Requests generated from the server's own OpenAPI schema never get a 500."""

import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.server.conftest import MODEL_NAME


def test_no_generated_request_gets_a_server_error(start_server):
    server = start_server("--max-model-len", "48")
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health",
    }
    seen = set()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # Half the bodies name the served model, so generation itself is fuzzed, not only routing.
            if isinstance(case.body, dict) and "model" in case.body and len(str(case.body)) % 2:
                case.body["model"] = MODEL_NAME
            response = case.call(base_url=server.url, timeout=30)
            seen.add(response.status_code)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
            if response.status_code >= 400:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        check()
    assert 200 in seen and 400 in seen
