"""Property-based fuzzing of every operation in the server's own GET /openapi.json, with Schemathesis.

Schemathesis generates requests that fit the published document (positive)
and that break it (negative). Each answer must keep the edge's promises: no
5xx but an engine condition, every error in OpenAI's shape, a refused
negative request, a status, content type and body the document declares;
and the text manager must never restart. ALLM_FUZZ_EXAMPLES sets the
examples per operation (scripts/fuzz runs many more).
"""

from __future__ import annotations

import collections
import os
import time

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from allm.gateway.openapi import ROUTES
from tests.unit.test_schema_compile import SUBSET, mutated

from .edge import AUDIO_MODEL, IMAGE_MODEL, KEY, MODEL, check_answer, fuzz_server

EXAMPLES = int(os.environ.get("ALLM_FUZZ_EXAMPLES", "30"))
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
TOKEN_FIELDS = {
    "/v1/responses": "max_output_tokens",
    "/v1/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens",
    "/v1/messages": "max_tokens",
}
#: Ollama's token limit is an option
OLLAMA_GENERATING = frozenset({"/api/chat", "/api/generate"})
CASES: collections.Counter[str] = collections.Counter()
SPENT_S = collections.Counter[str]()


def summary() -> str:
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(CASES.items()))
    return f"{sum(CASES.values())} generated requests ({kinds}) in {sum(SPENT_S.values()):.0f} s"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with fuzz_server(tmp_path_factory.mktemp("fuzz")) as srv:
        yield srv


@pytest.fixture(scope="module")
def schema(server):
    document = requests.get(f"{server.base_url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(document)


def _quick(case) -> None:
    """A request that fits the document gets the served model and a few tokens: the engine's work stays short.

    Only positive cases are changed: in a negative one, the model or the token
    count may be the very part that breaks the document.
    """
    if case.meta.generation.mode is not GenerationMode.POSITIVE or not isinstance(case.body, dict):
        return
    if case.path.startswith("/v1/images/"):
        # a few small images in a step: a generated request may ask for ten 1024x1024 at 150 steps
        case.body.update(model=IMAGE_MODEL, size="64x64", n=1)
        case.body.pop("steps", None)
        return
    case.body["model"] = AUDIO_MODEL if case.path.startswith("/v1/audio/") else MODEL
    if case.path in OLLAMA_GENERATING:
        options = case.body.get("options")
        case.body["options"] = {**(options if isinstance(options, dict) else {}), "num_predict": 3}
        case.body.pop("keep_alive", None)  # an unload after each answer: a load before the next
        return
    field = TOKEN_FIELDS.get(case.path)
    if field is not None:
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            case.body.pop(key, None)
        case.body[field] = 3


@pytest.mark.parametrize("route", ROUTES, ids=[f"{r.method.upper()} {r.path}" for r in ROUTES])
def test_every_answer_to_generated_requests_keeps_the_edges_promises(server, schema, route):
    operation = schema[route.path][route.method.upper()]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def run(case) -> None:
        _quick(case)
        started = time.monotonic()
        response = case.call(base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=90)
        CASES[case.meta.generation.mode.value] += 1
        SPENT_S["requests"] += time.monotonic() - started
        content_type = (response.headers.get("content-type") or [""])[0]  # Schemathesis keeps lists
        check_answer(response.status_code, response.content, content_type, route.path)
        case.validate_response(response, checks=CHECKS)

    run()


@settings(max_examples=EXAMPLES * 2, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(schema=st.one_of(SUBSET, mutated()))
def test_generated_json_schemas_are_refused_or_compiled_never_fatal(server, schema):
    """Structured output with schemas in and around the supported subset: a 400, or a constrained answer."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Answer in JSON."}],
        "max_tokens": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    started = time.monotonic()
    status, headers, data = server.request("POST", "/v1/chat/completions", body)
    SPENT_S["requests"] += time.monotonic() - started
    CASES["schema"] += 1
    answer = check_answer(status, data, headers.get("content-type", ""))
    if status != 200:
        assert status == 400, answer
        assert answer["error"]["param"].startswith("response_format.json_schema.schema"), answer
