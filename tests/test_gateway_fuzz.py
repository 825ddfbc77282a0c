"""The OpenAPI schema is the contract, and it is fuzzed: schemathesis sends requests generated from the
gateway's own `/openapi.json`, with a valid key so they get past auth; none may be a 500, carry a traceback, or
answer an error outside OpenAI's shape. The teacher's chat template raises on what real templates refuse (a
system turn, roles that do not alternate), so conversations reach a model that can refuse them. Real HTTP on
loopback, real SQLite."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from conftest import live_server, raising_template_teacher
from guard.gateway.app import create_app
from guard.gateway.store import SQLiteStore

EXAMPLES = 60  # per operation and mode: the whole run stays well under a minute
CHEAP_TOKENS = 4  # generation stays cheap: any valid max_tokens above this is sent as this
ADMIN_KEY = "fuzz-admin-key-0123456789abcdef0123456789"  # the admin API is fuzzed too, behind its own key
sent, refused_by_template = [], []


@pytest.fixture(scope="module")
def gateway(teacher_a, tmp_path_factory):
    store = SQLiteStore(tmp_path_factory.mktemp("fuzz") / "gateway.db")
    key = store.create_key("fuzzer")
    teacher = raising_template_teacher(teacher_a)
    with live_server(create_app(lambda: teacher, "teacher-a", store=store, admin_key=ADMIN_KEY,
                                public_docs=True)) as url:
        yield url, key
    print(f"\nschemathesis sent {len(sent)} requests: "
          f"{sorted({status: sent.count(status) for status in sent}.items())} (status, count)")


@pytest.mark.slow
def test_no_request_the_schema_allows_or_not_gets_a_500(gateway):
    url, key = gateway
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/admin/keys"}
    for operation in operations:
        bearer = ADMIN_KEY if operation.path.startswith("/admin") else key
        # requests that fit the schema, and (where there is a body to break) requests that do not
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[: 2 if operation.body else 1]:
            @given(case=operation.as_strategy(mode))
            @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def fuzz(case):
                if isinstance(case.body, dict):
                    if mode == GenerationMode.POSITIVE and "model" in case.body:
                        case.body["model"] = "teacher-a"  # the one served: past the model check, to generation
                    if isinstance(case.body.get("max_tokens"), int) and CHEAP_TOKENS < case.body["max_tokens"] <= 4096:
                        case.body["max_tokens"] = CHEAP_TOKENS
                response = case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {bearer}"},
                                                  checks=[not_a_server_error])
                sent.append(response.status_code)
                assert "Traceback" not in response.text
                if response.status_code >= 400:  # every error in OpenAI's shape, with a message to read
                    assert response.json()["error"]["message"], response.text
                    refused_by_template.append(response.json()["error"]["code"] == "invalid_conversation")

            fuzz()
    assert any(refused_by_template)  # the fuzz reached the template's refusals, not only the schema's
