"""The HTTP API driven by the official openai SDK against a real `allm serve`."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading

import openai
import pytest

from tests.model_files import smollm2_path, truncated_copy
from tests.waits import wait_for

from .gateway_server import running_server

KEY = "sk-test-allm"
MODEL = "smollm2-135m-instruct"
BRIEF = "Answer in one short sentence."
FRANCE = [{"role": "system", "content": BRIEF}, {"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    broken = truncated_copy(smollm2_path(), tmp / "broken.gguf", 20 * 1024 * 1024)
    config = f"""
[server]
api_keys = ["{KEY}"]
cors_origins = ["http://app.example"]
max_body_bytes = 65536
data_dir = "{tmp / "data"}"

[text]
slots = 1       # one request runs, one waits: the queue test fills both
queue_size = 1

[[models]]
id = "{MODEL}"
path = "{smollm2_path()}"

[[models]]
id = "tiny-context"
path = "{smollm2_path()}"
options = {{ n_ctx = 64 }}

[[models]]
id = "broken"
path = "{broken}"
"""
    with running_server(config, tmp, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


# -- discovery and operations ------------------------------------------------------


def test_models_lists_each_catalog_model_with_modality_and_state(sdk):
    models = {m.id: m for m in sdk.models.list()}
    assert set(models) == {MODEL, "tiny-context", "broken"}
    assert models[MODEL].modality == "text"
    assert models[MODEL].state == "loaded"  # /ready loaded the default model


def test_health_and_ready_need_no_key_and_status_describes_managers(server):
    assert server.request("GET", "/health", headers={"Authorization": ""})[0] == 200
    assert server.request("GET", "/ready", headers={"Authorization": ""})[0] == 200
    [text] = server.managers()
    assert text["name"] == "text#0"
    assert text["state"] == "running"
    assert text["pid"] > 0
    assert text["memory_bytes"] > 0
    assert MODEL in text["models"]


def test_a_missing_or_wrong_key_is_401(server):
    for auth in ("", "Bearer nope"):
        status, body = server.json("GET", "/v1/models", headers={"Authorization": auth})
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
    # Anthropic's clients send the key as x-api-key: it opens the same doors, a wrong one none
    assert server.json("GET", "/v1/models", headers={"Authorization": "", "x-api-key": KEY})[0] == 200
    assert server.json("GET", "/v1/models", headers={"Authorization": "", "x-api-key": "nope"})[0] == 401


def test_cors_allows_the_configured_origin_only(server):
    _s, headers, _b = server.request("GET", "/v1/models", headers={"Origin": "http://app.example"})
    assert headers["access-control-allow-origin"] == "http://app.example"
    _s, headers, _b = server.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers
    # A browser's preflight needs no key and is answered with the allowed methods.
    status, headers, _b = server.request(
        "OPTIONS",
        "/v1/chat/completions",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Authorization": "",
        },
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in headers["access-control-allow-methods"]


# -- chat completions ------------------------------------------------------------------


def test_chat_completion_answers_with_paris(sdk):
    reply = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_sends_role_then_content_then_finish_then_usage(sdk):
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL, messages=FRANCE, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert len(content) > 3
    assert "Paris" in "".join(content)
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(content)


def test_chat_stream_ends_with_done_on_the_wire(server):
    status, headers, data = server.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "stream": True, "max_tokens": 3}
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    lines = [line for line in data.decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


def test_chat_max_completion_tokens_and_stop(sdk):
    reply = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_completion_tokens=2)
    assert reply.usage.completion_tokens == 2
    assert reply.choices[0].finish_reason == "length"
    reply = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, stop=["Paris"])
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" not in reply.choices[0].message.content


def test_chat_structured_output_parses_against_its_schema(sdk):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        temperature=0,
        max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert isinstance(json.loads(reply.choices[0].message.content)["city"], str)


def test_chat_tool_call_round_trip(sdk):
    tool = {
        "type": "function",
        "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
    }
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = sdk.chat.completions.create(
        model=MODEL, messages=messages, tools=[tool], tool_choice="required", temperature=0
    )
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."},
    ]
    second = sdk.chat.completions.create(
        model=MODEL, messages=messages, tools=[tool], tool_choice="none", max_tokens=30
    )
    assert second.choices[0].message.content


def test_completions_and_embeddings(sdk):
    done = sdk.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in done.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
        )
    )
    assert streamed == done.choices[0].text
    emb = sdk.embeddings.create(model=MODEL, input=["a cat", "a dog"])  # the SDK asks for base64
    assert [len(d.embedding) for d in emb.data] == [576, 576]
    floats = sdk.embeddings.create(model=MODEL, input="a cat", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(emb.data[0].embedding, rel=1e-5)


# -- responses -----------------------------------------------------------------------------


def test_response_answers_and_counts_usage(sdk):
    resp = sdk.responses.create(
        model=MODEL, instructions=BRIEF, input="What is the capital of France?", temperature=0
    )
    assert resp.status == "completed"
    assert "Paris" in resp.output_text
    assert resp.usage.input_tokens > 10
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens


def test_response_stream_sends_exactly_the_documented_events(sdk):
    events = list(
        sdk.responses.create(
            model=MODEL,
            instructions=BRIEF,
            input="What is the capital of France?",
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert len(deltas) > 3
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(d.delta for d in deltas)
    final = events[-1].response
    assert final.output_text == text
    assert "Paris" in text
    assert {d.item_id for d in deltas} == {final.output[0].id} == {events[2].item.id}
    assert final.id == events[0].response.id


def test_response_stream_at_the_token_limit_is_incomplete(sdk):
    events = list(
        sdk.responses.create(model=MODEL, input="Tell me a story.", max_output_tokens=4, stream=True)
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage.output_tokens == 4


def test_response_json_schema_output_parses(sdk):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    resp = sdk.responses.create(
        model=MODEL,
        input="Name a city and its country.",
        max_output_tokens=60,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
    )
    data = json.loads(resp.output_text)
    assert set(data) == {"city", "country"}


def test_response_tool_call_round_trip_with_previous_response_id(sdk):
    first = sdk.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",
        temperature=0,
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather"
    assert "city" in json.loads(call.arguments)
    second = sdk.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees."}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_output_tokens=30,
    )
    assert second.status in ("completed", "incomplete")
    assert second.output_text
    assert second.previous_response_id == first.id
    # The earlier turn (question and call) is part of the prompt: without it, fewer tokens.
    alone = sdk.responses.create(
        model=MODEL,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees."}],
        max_output_tokens=1,
    )
    assert second.usage.input_tokens > alone.usage.input_tokens + 5


def test_stored_responses_can_be_read_continued_and_deleted(sdk):
    first = sdk.responses.create(
        model=MODEL, input="My name is Ada.", max_output_tokens=8, metadata={"k": "v"}
    )
    got = sdk.responses.retrieve(first.id)
    assert got.id == first.id
    assert got.output_text == first.output_text
    assert got.metadata == {"k": "v"}
    follow = sdk.responses.create(
        model=MODEL, previous_response_id=first.id, input="What is my name?", max_output_tokens=8
    )
    assert follow.usage.input_tokens > first.usage.input_tokens
    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(first.id)
    unstored = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)


# -- errors ----------------------------------------------------------------------------------


def test_unknown_model_is_404_model_not_found_never_a_fallback(sdk):
    with pytest.raises(openai.NotFoundError) as info:
        sdk.chat.completions.create(model="gpt-17", messages=FRANCE)
    assert info.value.body["code"] == "model_not_found"
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="gpt-17", input="hi")


def test_malformed_json_is_400(server):
    status, body = server.json("POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400
    assert body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": MODEL, "messages": FRANCE, "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": FRANCE, "max_tokens": 0}, "max_tokens"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": FRANCE}, "model"),
        ({"model": MODEL, "messages": FRANCE, "response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_a_bad_field_is_400_naming_it(server, payload, param):
    status, body = server.json("POST", "/v1/chat/completions", payload)
    assert status == 400
    assert body["error"]["param"] == param


def test_a_prompt_too_long_for_the_context_is_400(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model="tiny-context", messages=[{"role": "user", "content": "word " * 100}]
        )
    assert info.value.body["code"] == "context_length_exceeded"
    assert "context holds 64 tokens" in info.value.body["message"]


def test_truncation_auto_drops_the_oldest_exchanges_until_the_prompt_fits(sdk):
    conversation = [
        {"role": "user", "content": "word " * 40},
        {"role": "assistant", "content": "noted " * 10},
        {"role": "user", "content": "Hi"},
    ]
    with pytest.raises(openai.BadRequestError) as info:  # disabled, the default
        sdk.responses.create(model="tiny-context", input=conversation, max_output_tokens=2)
    assert info.value.body["code"] == "context_length_exceeded"
    reply = sdk.responses.create(
        model="tiny-context", input=conversation, max_output_tokens=2, truncation="auto"
    )
    assert reply.status in ("completed", "incomplete")
    assert reply.truncation == "auto"
    assert reply.usage is not None
    assert reply.usage.input_tokens < 64  # the first exchange went
    # streamed: the same, and no event before it fits
    events = list(
        sdk.responses.create(
            model="tiny-context", input=conversation, max_output_tokens=2, truncation="auto", stream=True
        )
    )
    assert events[0].type == "response.created"
    final = events[-1].response  # completed, or incomplete at the token limit
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert final.usage is not None
    assert final.usage.input_tokens == reply.usage.input_tokens
    # the last user turn alone too long: nothing left to drop, the same 400
    with pytest.raises(openai.BadRequestError) as info:
        sdk.responses.create(
            model="tiny-context", input="word " * 100, max_output_tokens=2, truncation="auto"
        )
    assert info.value.body["code"] == "context_length_exceeded"


def test_a_corrupt_model_is_500_model_corrupt_and_the_server_keeps_serving(sdk):
    with pytest.raises(openai.InternalServerError) as info:
        sdk.chat.completions.create(model="broken", messages=FRANCE)
    assert info.value.body["code"] == "model_corrupt"
    assert "truncated" in info.value.body["message"]
    assert (
        sdk.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2).usage.completion_tokens == 2
    )


def test_a_body_over_the_limit_is_413(server):
    status, body = server.json(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": FRANCE, "pad": "x" * 70000}
    )
    assert status == 413
    assert body["error"]["code"] == "request_too_large"


def test_a_full_queue_is_429_with_retry_after(server):
    # Greedy decoding of this prompt runs to the token limit: the holders stay busy.
    long = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long essay."}],
        "max_tokens": 400,
        "temperature": 0,
    }
    results = []

    def occupy():
        results.append(server.request("POST", "/v1/chat/completions", long)[0])

    holders = [threading.Thread(target=occupy) for _ in range(2)]  # one running, one queued
    for t in holders:
        t.start()
    wait_for(
        lambda: sum(m["active"] + m["queued"] for m in server.managers()) == 2, 30, "one running, one queued"
    )
    status, headers, data = server.request("POST", "/v1/chat/completions", long)
    for t in holders:
        t.join()
    assert status == 429
    assert headers["retry-after"] == "1"
    assert json.loads(data)["error"]["code"] == "queue_full"
    assert results == [200, 200]


# -- cancel and faults, end to end -----------------------------------------------------------------


def _idle(server) -> bool:
    [text] = server.managers()
    return text["active"] == 0 and text["queued"] == 0


def test_client_disconnect_mid_stream_stops_the_engine(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long essay."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")
    # Heartbeats report the manager's state twice a second: wait to see it busy (2000 tokens
    # take far longer than this test).
    wait_for(lambda: server.managers()[0]["active"] == 1, 30, "the engine to be busy")
    resp.close()
    conn.close()
    wait_for(lambda: _idle(server), 30, "the engine to stop")


def test_sigkill_of_the_text_manager_mid_stream_is_a_coded_error_then_service_resumes(sdk, server):
    [before] = server.managers()
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long essay."}],
        max_tokens=2000,
        temperature=0,
        stream=True,
    )
    received = 0
    with pytest.raises(openai.APIError) as info:
        for _chunk in stream:
            received += 1
            if received == 5:
                os.kill(before["pid"], signal.SIGKILL)
    assert "SIGKILL" in str(info.value.message)
    reply = sdk.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    [after] = server.managers()
    assert after["pid"] != before["pid"]
    assert after["restarts"] == before["restarts"] + 1
    assert after["last_code"] == "INTERNAL"


def test_sigkill_mid_response_stream_is_response_failed(sdk, server):
    [before] = server.managers()
    events = []
    for event in sdk.responses.create(
        model=MODEL, input="Write a very long essay.", max_output_tokens=2000, temperature=0, stream=True
    ):
        events.append(event)
        if len(events) == 8:
            os.kill(before["pid"], signal.SIGKILL)
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error.code == "internal"
    assert "SIGKILL" in events[-1].response.error.message
    assert sdk.responses.create(model=MODEL, input="hi", max_output_tokens=2).usage.output_tokens == 2


def test_chat_stream_with_a_required_tool_sends_the_call_then_tool_calls_finish(sdk):
    tool = {
        "type": "function",
        "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")},
    }
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[tool],
            tool_choice="required",
            temperature=0,
            stream=True,
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    # a call's first delta names it; the rest (if it is streamed as generated) carry arguments
    firsts = [d for d in deltas if d.id is not None]
    assert [d.function.name for d in firsts] == ["get_weather"]
    assert {d.index for d in deltas} == {0}
    assert "city" in json.loads("".join(d.function.arguments or "" for d in deltas))
    assert firsts[0].id.startswith("call_")
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]


def test_response_stream_with_a_required_tool_sends_function_call_items(sdk):
    events = list(
        sdk.responses.create(
            model=MODEL,
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice="required",
            temperature=0,
            stream=True,
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert "response.output_text.delta" not in kinds
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.type for item in done] == ["function_call"]
    args = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert args.arguments == done[0].arguments
    assert events[-1].response.output[0].name == "get_weather"
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_json_object_output_is_a_json_object(sdk):
    reply = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=80,
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert reply.choices[0].message.content.lstrip().startswith("{")
