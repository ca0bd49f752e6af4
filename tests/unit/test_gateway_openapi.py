"""GET /openapi.json: valid OpenAPI 3.1, every route in it, and its bodies exactly what the edge enforces."""

from __future__ import annotations

import itertools
import re

import jsonschema
import pytest
from openapi_spec_validator import validate

from allm.gateway import openapi
from allm.gateway.app import OPEN_PATHS, create_app
from allm.gateway.chat import schema as chat
from allm.gateway.config_read import load
from allm.gateway.errors import ApiError
from allm.gateway.responses import schema as responses

from .test_gateway_bodies import GOOD_CHAT, M

_names = itertools.count()


@pytest.fixture(scope="module")
def config():
    return load(environ={"ALLM_API_KEYS": "sk-a"})


def test_the_document_is_valid_openapi_3_1(config):
    doc = openapi.document(config)
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def test_every_route_the_app_registers_is_documented_and_nothing_else(config):
    app = create_app(config, name=f"allm-openapi-{next(_names)}")
    registered = {
        (method.lower(), "/" + re.sub(r"<(\w+):\w+>", r"{\1}", route.path))
        for route in app.router.routes
        for method in route.methods
        if method not in ("HEAD", "OPTIONS")
    }
    documented = {(method, path) for path, ops in openapi.document(config)["paths"].items() for method in ops}
    assert registered == documented


def test_open_paths_need_no_key_in_the_app_and_in_the_document(config):
    doc = openapi.document(config)
    assert doc["security"] == [{"bearer": []}]
    open_in_doc = {
        path for path, ops in doc["paths"].items() for op in ops.values() if op.get("security") == []
    }
    # the page holds nothing: the /status it reads asks for the key
    assert open_in_doc == {"/", "/health", "/ready", "/openapi.json"}
    assert open_in_doc <= OPEN_PATHS


def test_without_keys_the_document_asks_for_none():
    doc = openapi.document(load(environ={}))
    assert "security" not in doc
    assert "securitySchemes" not in doc["components"]


def test_the_catalog_models_are_examples_of_the_model_field(config):
    body = openapi.document(config)["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert schema["properties"]["model"]["examples"] == [M]


def _body_schema(config, path):
    doc = openapi.document(config)
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


CALL = {"type": "function_call", "call_id": "c", "arguments": "{}"}
SAMPLES = {
    "/v1/chat/completions": (
        chat.CHAT,
        [
            *GOOD_CHAT,
            {"model": M},
            {"model": M, "messages": [{"role": "wizard", "content": "x"}]},
            {"model": M, "messages": [{"role": "tool", "content": "x"}]},
            {"model": M, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            {"model": M, "messages": [{"role": "user", "content": "x"}], "seed": 2**63},
            {"model": M, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5},
            {"model": M, "messages": [{"role": "user", "content": "x"}], "pad": True},
            {"model": M, "messages": [{"role": "user", "content": "x"}], "presence_penalty": 1},
            {"model": M, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
            {"model": M, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            {"model": M, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
        ],
    ),
    "/v1/responses": (
        responses.RESPONSES,
        [
            {"model": M, "input": "x"},
            {"model": M, "input": [{"type": "message", "role": "user", "content": ""}]},
            {"model": M, "input": [{**CALL, "name": "f"}]},
            {"model": M, "input": [CALL]},
            {"model": M, "input": [{"type": "reasoning"}]},
            {"model": M, "input": "x", "include": ["everything"]},
            {"model": M, "input": "x", "metadata": {"k": "v" * 513}},
            {"model": M, "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}},
            {"model": M, "input": "x", "tools": [{"type": "web_search"}]},
        ],
    ),
    "/v1/completions": (chat.COMPLETIONS, [{"model": M, "prompt": "x"}, {"model": M, "prompt": ""}]),
    "/v1/embeddings": (
        chat.EMBEDDINGS,
        [{"model": M, "input": ["a", "b"]}, {"model": M, "input": []}, {"model": M, "input": ""}],
    ),
}  # fmt: skip


@pytest.mark.parametrize(("path", "sample"), [(p, s) for p, (_n, ss) in SAMPLES.items() for s in ss])
def test_the_published_body_schema_and_the_edge_agree(config, path, sample):
    node = SAMPLES[path][0]
    try:
        node.check(sample, "")
        accepted = True
    except ApiError:
        accepted = False
    assert jsonschema.Draft202012Validator(_body_schema(config, path)).is_valid(sample) == accepted
