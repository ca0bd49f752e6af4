"""Hand-written hostile requests against a real allm serve: each hole fuzzing found is a 400, never a 500."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .edge import (
    KEY,
    MAX_BODY_BYTES,
    MODEL,
    check_answer,
    content_type,
    fuzz_server,
    raw_exchange,
    untouched,
)

USER = [{"role": "user", "content": "hi"}]
HEAD = f"Host: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n".encode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with fuzz_server(tmp_path_factory.mktemp("hostile")) as srv:
        yield srv


def post(server, path, raw: bytes):
    status, headers, body = server.request("POST", path, raw=raw)
    data = check_answer(status, body, headers.get("content-type", ""))
    untouched(server)
    return status, data["error"] if status >= 400 else data


def refused(server, path, payload, *, code="invalid_value"):
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, error = post(server, path, raw)
    assert (status, error["code"]) == (400, code), error
    return error


def chat(**fields):
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


# -- the body as a whole ---------------------------------------------------------------------


def test_json_nested_ten_thousand_deep_is_400(server):
    error = refused(server, "/v1/chat/completions", b"[" * 10_000 + b"]" * 10_000, code="invalid_json")
    assert "nests deeper" in error["message"]


def test_a_five_thousand_digit_integer_is_400(server):
    body = b'{"model": "%s", "messages": %s, "max_tokens": %s}' % (
        MODEL.encode(),
        json.dumps(USER).encode(),
        b"9" * 5000,
    )
    refused(server, "/v1/chat/completions", body, code="invalid_json")


def test_a_lone_surrogate_is_400_naming_the_field(server):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "a\\ud800b"}]}' % MODEL.encode()
    assert refused(server, "/v1/chat/completions", body)["param"] == "messages[0].content"
    body = b'{"model": "%s", "input": "\\udc00"}' % MODEL.encode()
    assert refused(server, "/v1/responses", body)["param"] == "input"


def test_max_tokens_of_two_to_the_64_plus_one_is_400(server):
    assert refused(server, "/v1/chat/completions", chat(max_tokens=2**64 + 1))["param"] == "max_tokens"
    assert (
        refused(server, "/v1/completions", {"model": MODEL, "prompt": "x", "seed": -(2**70)})["param"]
        == "seed"
    )


@pytest.mark.parametrize(
    "raw", [b'{"model": "m", "temperature": NaN}', b'{"temperature": 1e999}', b"\xff\xfe\x00{", b"{\xc3\x28}"]
)
def test_non_json_numbers_and_invalid_utf8_are_400(server, raw):
    refused(server, "/v1/chat/completions", raw, code="invalid_json")


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1), ("temperature", 1e308), ("top_p", -0.5), ("max_tokens", -1), ("max_tokens", 2**31)],
)
def test_negative_and_enormous_numbers_are_400(server, field, value):
    assert refused(server, "/v1/chat/completions", chat(**{field: value}))["param"] == field


def test_huge_strings_and_arrays_are_bounded(server):
    status, _ = post(server, "/v1/chat/completions", json.dumps(chat(pad="x" * MAX_BODY_BYTES)).encode())
    assert status == 413
    assert refused(server, "/v1/chat/completions", chat(messages=USER * 2049))["param"] == "messages"
    assert refused(server, "/v1/chat/completions", chat(stop=["s"] * 5))["param"] == "stop"
    assert refused(server, "/v1/chat/completions", chat(stop="s" * 257))["param"] == "stop"
    assert refused(server, "/v1/embeddings", {"model": MODEL, "input": ["x"] * 2049})["param"] == "input"
    # within every bound, but more than the context holds: the engine's own 400
    long = chat(messages=[{"role": "user", "content": "word " * 400}])
    error = refused(server, "/v1/chat/completions", long, code="context_length_exceeded")
    assert "context holds 256 tokens" in error["message"]


# -- enums and shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        ("/v1/chat/completions", chat(tool_choice="sometimes"), "tool_choice"),
        ("/v1/chat/completions", chat(response_format={"type": "yaml"}), "response_format"),
        ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
         "messages[0].content[0]"),
        ("/v1/responses", {"model": MODEL, "input": "x", "include": ["everything"]}, "include[0]"),
        ("/v1/responses", {"model": MODEL, "input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
        ("/v1/responses", {"model": MODEL, "input": [{"role": "wizard", "content": "x"}]}, "input[0].role"),
        ("/v1/responses", {"model": MODEL, "input": "x", "truncation": "middle"}, "truncation"),
        ("/v1/embeddings", {"model": MODEL, "input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),  # an assert in the engine: a 500
    ],
)  # fmt: skip
def test_an_unknown_enum_value_is_400_naming_it(server, path, payload, param):
    assert refused(server, path, payload)["param"] == param


@pytest.mark.parametrize(
    ("path", "payload", "param"),
    [
        # SmolLM2 tokenizes these control characters to nothing: the engine asserted (a 500) on the
        # empty prompt, and an empty embedding batch corrupted the manager's heap.
        ("/v1/completions", {"model": MODEL, "prompt": "\x13\x13", "max_tokens": 2}, "prompt"),
        ("/v1/embeddings", {"model": MODEL, "input": ["fine", "\x04\x06"]}, "input[1]"),
    ],
)
def test_text_that_tokenizes_to_nothing_is_400(server, path, payload, param):
    assert refused(server, path, payload)["param"] == param


def test_an_assistant_tool_call_without_function_is_400(server):
    # This answered 500 (a KeyError in the engine's prompt building).
    history = [*USER, {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function"}]}]
    assert refused(server, "/v1/chat/completions", chat(messages=history))["param"] == (
        "messages[1].tool_calls[0].function"
    )
    bad_args = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
    history = [*USER, {"role": "assistant", "tool_calls": [bad_args]}]
    assert refused(server, "/v1/chat/completions", chat(messages=history))["param"] == (
        "messages[1].tool_calls[0].function.arguments"
    )


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"name": None}, "input[0].name"),
        ({"arguments": None}, "input[0].arguments"),
        ({"call_id": None}, "input[0].call_id"),
        ({"arguments": "{oops"}, "input[0].arguments"),  # a 500: the engine parses it to show the model
        ({"arguments": {"city": "Paris"}}, "input[0].arguments"),
        ({"name": "not a name"}, "input[0].name"),
    ],
)
def test_a_malformed_function_call_item_is_400(server, change, param):
    item = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"} | change
    payload = {"model": MODEL, "input": [item], "max_output_tokens": 2}
    assert refused(server, "/v1/responses", payload)["param"] == param


# -- schemas that kill llama.cpp ----------------------------------------------------------------------


def json_schema(schema):
    return chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"enum": []}, "enum"),  # segfaulted the text manager
        ({"type": "object", "properties": {"name": {"type": "string", "maxLength": 10**9}}},
         "properties.name.maxLength"),  # wedged the grammar compile
        ({"type": "string", "maxLength": 1e9}, "maxLength"),
        ({"type": "string", "maxLength": 1001}, "maxLength"),
        ({"type": "string", "pattern": "^\\d+$"}, "pattern"),
        ({"type": "string", "pattern": "^a]$"}, "pattern"),  # the converter loops forever
        ({"type": "string", "pattern": "abc"}, "pattern"),  # the converter asserts
        ({"type": "object", "properties": {'a"b': {"type": "string"}}}, 'properties.a"b'),
        ({"type": "object", "properties": {"x": {"description": "any"}}}, "properties.x"),
        ({"type": "object", "properties": {"r": {"$ref": "#/$defs/a"}},
          "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}}, "$defs.a"),
    ],
)  # fmt: skip
def test_a_killer_schema_is_400_naming_its_keyword(server, schema, param):
    error = refused(server, "/v1/chat/completions", json_schema(schema))
    assert error["param"] == f"response_format.json_schema.schema.{param}"


def test_killer_schemas_in_responses_and_tools_are_400_too(server):
    payload = {
        "model": MODEL,
        "input": "x",
        "text": {"format": {"type": "json_schema", "schema": {"enum": []}}},
    }
    assert refused(server, "/v1/responses", payload)["param"] == "text.format.schema.enum"
    tool = {
        "type": "function",
        "name": "f",
        "parameters": {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
    }
    payload = {"model": MODEL, "input": "x", "tools": [tool]}
    assert refused(server, "/v1/responses", payload)["param"] == "tools[0].parameters.properties.a.$ref"


def test_a_good_schema_still_constrains_the_output(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"}}}
    status, reply = post(
        server, "/v1/chat/completions", json.dumps(json_schema(schema) | {"max_tokens": 40}).encode()
    )
    assert status == 200
    assert reply["choices"][0]["message"]["content"].startswith("{")


# -- paths and raw request lines -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response_id", "status"),
    [
        ("..%2F..%2Fetc%2Fpasswd", 400),
        ("%00", 400),
        ("a%20b", 400),
        ("x" * 129, 400),
        ("../../etc/passwd", 404),
    ],
)
def test_a_path_like_response_id_is_refused(server, response_id, status):
    for method in ("GET", "DELETE"):
        got, headers, body = server.request(method, f"/v1/responses/{response_id}")
        assert got == status
        check_answer(got, body, headers["content-type"])


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /%00 HTTP/1.1",
        b"GET /\x00 HTTP/1.1",  # httptools refuses it; Sanic dropped the connection unanswered
        b"GET /v1/responses/\x00 HTTP/1.1",
        b"GET /health?\x01=\x7f HTTP/1.1",
        b"GET /\xff\xfe HTTP/1.1",  # not UTF-8, not ASCII
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1",
        b"GET / / HTTP/1.1",
        b"GET / HTTP/9.9",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello on the plain port
    ],
)
def test_a_hostile_request_line_gets_an_openai_shaped_answer(server, request_line):
    reply = raw_exchange(server.port, request_line + b"\r\n" + HEAD + b"\r\n")
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 4"), reply[:200]
    body = rest.partition(b"\r\n\r\n")[2]
    check_answer(int(status_line.split()[1]), body)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"X: " + b"a" * 100_000 + b"\r\n" + HEAD, b"413"),
        (b"Content-Length: abc\r\n" + HEAD, b"400"),
        (b"No colon here\r\n" + HEAD, b"400"),
        (b"Host: x\r\nAuthorization: Bearer \xff\xfe\r\n", b"401"),  # not UTF-8: this was a 500
        (b"Host: x\r\nAuthorization: \xc3\x28\r\n", b"401"),
    ],
)
def test_hostile_headers_get_an_openai_shaped_answer(server, headers, status):
    reply = raw_exchange(server.port, b"POST /v1/chat/completions HTTP/1.1\r\n" + headers + b"\r\n")
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.split()[1] == status, reply[:200]
    head, _, body = rest.partition(b"\r\n\r\n")
    check_answer(int(status), body, content_type(head))


def _one_line(data: bytes) -> bytes:
    return data.replace(b"\r", b"").replace(b"\n", b"")


REQUEST_LINES = st.one_of(
    st.builds(
        lambda method, path, version: b" ".join(part for part in (method, path, version) if part),
        st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"OPTIONS", b"G\xffT", b"\x00", b""]),
        st.sampled_from([b"/", b"/v1/responses/", b"/health?", b"/v1/chat/completions"]).flatmap(
            lambda prefix: st.binary(max_size=40).map(lambda tail: prefix + _one_line(tail))
        ),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 x", b""]),
    ),
    st.binary(max_size=60).map(_one_line),
)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(line=REQUEST_LINES)
def test_any_request_line_gets_an_http_answer(server, line):
    reply = raw_exchange(server.port, line + b"\r\n" + HEAD + b"\r\n")
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), (line, reply[:200])
    head, _, body = rest.partition(b"\r\n\r\n")
    check_answer(int(status_line.split()[1]), body, content_type(head))


HEADER_LINES = st.lists(
    st.tuples(
        st.sampled_from(
            [b"Authorization", b"Origin", b"Content-Type", b"Content-Length", b"X-\xff", b"Expect"]
        )
        | st.binary(max_size=12).map(_one_line),
        st.binary(max_size=40).map(_one_line),
    ).map(lambda pair: pair[0] + b": " + pair[1]),
    max_size=4,
)


@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(lines=HEADER_LINES, path=st.sampled_from([b"/v1/models", b"/health", b"/v1/chat/completions"]))
def test_any_header_gets_an_http_answer(server, lines, path):
    head = b"".join(line + b"\r\n" for line in lines)
    reply = raw_exchange(
        server.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + head + b"Connection: close\r\n\r\n"
    )
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 "), (lines, reply[:200])
    head, _, body = rest.partition(b"\r\n\r\n")
    check_answer(int(status_line.split()[1]), body, content_type(head))
