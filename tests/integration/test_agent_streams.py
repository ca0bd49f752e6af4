"""What agent frameworks need of the text APIs, driven by the openai SDK's own helpers against `allm serve`.

Streams in OpenAI's grammar under every tool_choice and text format, sampling
values echoed as used (catalog defaults included), the new sampling options
accepted, conversation state (input items, system messages carried on) and a
response store that expires and stays bounded.
"""

from __future__ import annotations

import http.client
import json
import threading

import openai
import pytest

from tests.event_grammar import check_chat_chunks, check_response_events, plain
from tests.model_files import smollm2_path, write_tiny_llama_gguf
from tests.waits import wait_for

from .gateway_server import running_server

MODEL = "smollm2"  # with catalog defaults
PLAIN = "smollm2-plain"  # without: allm's own defaults
CATALOG = {"temperature": 0.3, "top_p": 0.85}
QUESTION = "What is the weather in Paris?"
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
}
CHAT_TOOL = {
    "type": "function",
    "function": {**{k: TOOL[k] for k in ("name", "description", "parameters")}, "strict": True},
}
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
CHOICES = ("auto", "none", "required", "named")
FORMATS = ("text", "json_object", "json_schema")
# A reasoning model: random weights under an R1-style template (Qwen2.5's tools, a prompt that
# opens <think>), so every reply begins with a reasoning item and the grammar checker follows it.
THINKER = "thinker"
STREAM_MODELS = (MODEL, THINKER)


def _config(tmp, extra: str = "") -> str:
    thinker = write_tiny_llama_gguf(tmp / "thinker.gguf", "qwen-think")
    return f"""
[server]
data_dir = "{tmp / "data"}"
{extra}

[[models]]
id = "{MODEL}"
path = "{smollm2_path()}"
defaults = {{ temperature = {CATALOG["temperature"]}, top_p = {CATALOG["top_p"]} }}

[[models]]
id = "{PLAIN}"
path = "{smollm2_path()}"

[[models]]
id = "{THINKER}"
path = "{thinker}"
options = {{ n_ctx = 2048 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("agents")
    with running_server(_config(tmp), tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


def _responses_choice(choice: str) -> object:
    return {"type": "function", "name": "get_weather"} if choice == "named" else choice


def _chat_choice(choice: str) -> object:
    return {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice


# -- streams in order, whatever the request ----------------------------------------------------


@pytest.mark.parametrize("model", STREAM_MODELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("choice", CHOICES)
def test_responses_stream_helper_follows_the_event_grammar(sdk, model, choice, fmt):
    text = {"format": {"type": fmt}}
    if fmt == "json_schema":
        text = {"format": {"type": "json_schema", "name": "place", "schema": SCHEMA}}
    with sdk.responses.stream(
        model=model,
        input=QUESTION,
        tools=[TOOL],
        tool_choice=_responses_choice(choice),
        text=text,
        max_output_tokens=48,
        temperature=0,
    ) as stream:
        events = list(stream)
    items = check_response_events(events)
    final = events[-1].response
    if model == THINKER:  # its prompt opened <think>: the reply begins with reasoning
        assert items[0]["type"] == "reasoning"
        assert final.usage.output_tokens_details.reasoning_tokens > 0
    calls = [item for item in items if item["type"] == "function_call"]
    if choice == "none":
        assert not calls
    if final.status != "completed":
        return
    if choice in ("required", "named"):
        assert [call["name"] for call in calls] == ["get_weather"]
        assert "city" in json.loads(calls[0]["arguments"])
    assert plain(stream.get_final_response().output) == items
    if not calls and fmt != "text":
        assert isinstance(json.loads(final.output_text), dict)


@pytest.mark.parametrize("model", STREAM_MODELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("choice", CHOICES)
def test_chat_stream_helper_follows_the_chunk_grammar(sdk, model, choice, fmt):
    response_format: dict[str, object] = {"type": fmt}
    if fmt == "json_schema":
        response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}}
    chunks = []
    try:
        with sdk.chat.completions.stream(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            tools=[CHAT_TOOL],
            tool_choice=_chat_choice(choice),
            response_format=response_format,
            max_tokens=48,
            temperature=0,
            stream_options={"include_usage": True},
        ) as stream:
            for event in stream:
                if event.type == "chunk":
                    chunks.append(event.chunk)
            final = stream.get_final_completion()
    except openai.LengthFinishReasonError as exc:
        # the helper refuses a cut-off answer when tools could be parsed: its snapshot so far
        built = check_chat_chunks(chunks, ended=False)
        message = exc.completion.choices[0].message
        assert (message.content or "") == built["content"]
        assert [c.function.name for c in message.tool_calls or []] == [c["name"] for c in built["calls"]]
        return
    built = check_chat_chunks(chunks)
    message = final.choices[0].message
    assert final.choices[0].finish_reason == built["finish"]
    assert (message.content or "") == built["content"]
    calls = [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]
    assert calls == built["calls"]
    if choice == "none":
        assert not calls
    if built["finish"] == "length":
        return
    if choice in ("required", "named"):
        assert [call["name"] for call in calls] == ["get_weather"]
    if not calls and fmt != "text":
        assert isinstance(json.loads(message.content), dict)
    assert final.usage.completion_tokens_details.reasoning_tokens == 0


def test_response_created_is_sent_before_the_first_token(server):
    """The stream opens with the request's first token, while the engine still works on another
    request: not once the reply is whole (nor before the manager has taken the request)."""
    busy = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long essay."}]}
    holder = threading.Thread(
        target=server.request,
        args=("POST", "/v1/chat/completions", {**busy, "max_tokens": 300, "temperature": 0}),
    )
    holder.start()
    try:
        wait_for(lambda: server.managers()[0]["active"] == 1, 30, "the engine to be busy")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, "stream": True}
        conn.request("POST", "/v1/responses", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        head = [resp.readline() for _ in range(4)]
        assert holder.is_alive()  # the engine is still busy with the other request
        assert head[0] == b"event: response.created\n"
        assert head[3] == b"event: response.in_progress\n"
        resp.close()
        conn.close()
    finally:
        holder.join()


# -- sampling that is what it says -------------------------------------------------------------


def test_a_response_echoes_the_sampling_values_used(sdk):
    catalog = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    assert (catalog.temperature, catalog.top_p) == (CATALOG["temperature"], CATALOG["top_p"])
    allm = sdk.responses.create(model=PLAIN, input="hi", max_output_tokens=2)
    assert (allm.temperature, allm.top_p) == (0.8, 0.95)
    asked = sdk.responses.create(model=MODEL, input="hi", max_output_tokens=2, temperature=0.5, top_p=0.7)
    assert (asked.temperature, asked.top_p) == (0.5, 0.7)
    reasoned = sdk.responses.create(
        model=MODEL,
        input="hi",
        max_output_tokens=2,
        parallel_tool_calls=False,
        reasoning={"effort": "low", "summary": "auto"},
        top_logprobs=3,
    )
    assert reasoned.parallel_tool_calls is False
    assert (reasoned.reasoning.effort, reasoned.reasoning.summary) == ("low", "auto")
    assert reasoned.top_logprobs == 3
    assert sdk.responses.retrieve(catalog.id).temperature == CATALOG["temperature"]


def test_the_new_sampling_options_are_accepted_on_every_text_api(sdk, server):
    sampling = {
        "top_k": 20,
        "min_p": 0.1,
        "repeat_penalty": 1.1,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.5,
        "logit_bias": {"42": -100},
    }
    chat = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        reasoning_effort="low",
        parallel_tool_calls=False,
        extra_body=sampling,
    )
    assert chat.usage.completion_tokens >= 1
    assert chat.choices[0].logprobs is not None
    assert chat.usage.completion_tokens_details.reasoning_tokens == 0
    status, body = server.json(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "Once upon", "max_tokens": 3, **sampling}
    )
    assert status == 200, body
    resp = sdk.responses.create(
        model=MODEL,
        input="hi",
        max_output_tokens=3,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        extra_body=sampling,
    )
    assert resp.status in ("completed", "incomplete")
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body={"top_k": -1}
        )
    assert info.value.body["param"] == "top_k"


def test_openapi_publishes_the_sampling_options(server):
    status, doc = server.json("GET", "/openapi.json")
    assert status == 200
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/completions"):
        props = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"][
            "properties"
        ]
        assert {
            "top_k",
            "min_p",
            "repeat_penalty",
            "frequency_penalty",
            "presence_penalty",
            "logit_bias",
        } <= set(props)
    assert "input_items" in " ".join(doc["paths"])


# -- conversation state ----------------------------------------------------------------------


def test_previous_response_id_carries_system_and_developer_messages(sdk):
    system = {"role": "system", "content": "You are a pirate. " * 40}
    first = sdk.responses.create(
        model=MODEL, input=[system, {"role": "user", "content": "Hello."}], max_output_tokens=4
    )
    follow = sdk.responses.create(
        model=MODEL, previous_response_id=first.id, input="And now?", max_output_tokens=1
    )
    without = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Hello."},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And now?"},
        ],
        max_output_tokens=1,
    )
    # the system message (200 tokens) is still part of the prompt
    assert follow.usage.input_tokens >= without.usage.input_tokens + 100
    # ... while an earlier response's instructions are not (OpenAI's rule)
    told = sdk.responses.create(model=MODEL, instructions="Be brief. " * 40, input="Hi.", max_output_tokens=2)
    after = sdk.responses.create(model=MODEL, previous_response_id=told.id, input="Hi.", max_output_tokens=1)
    assert after.usage.input_tokens < told.usage.input_tokens + 30


def test_input_items_lists_every_item_of_the_conversation(sdk, server):
    first = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Answer in English."},
            {"role": "user", "content": "Hello."},
        ],
        max_output_tokens=3,
    )
    second = sdk.responses.create(
        model=MODEL, previous_response_id=first.id, input="Thanks.", max_output_tokens=2
    )
    page = sdk.responses.input_items.list(second.id, order="asc")
    roles = [(item.type, item.role) for item in page.data]
    assert roles == [
        ("message", "system"),
        ("message", "developer"),
        ("message", "user"),
        ("message", "assistant"),  # the first response's output
        ("message", "user"),
    ]
    assert page.data[0].content[0].type == "input_text"
    assert page.data[0].content[0].text == "Be brief."
    assert page.data[3].id == first.output[0].id
    assert page.data[3].content[0].type == "output_text"
    assert (page.first_id, page.last_id, page.has_more) == (page.data[0].id, page.data[-1].id, False)
    newest = sdk.responses.input_items.list(second.id, limit=2)  # desc by default
    assert [item.id for item in newest.data] == [page.data[4].id, page.data[3].id]
    assert newest.has_more
    rest = sdk.responses.input_items.list(second.id, limit=10, after=newest.last_id)
    assert [item.id for item in rest.data] == [item.id for item in page.data[:3]][::-1]
    assert not rest.has_more
    for query, param in (
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("order=up", "order"),
    ):
        status, body = server.json("GET", f"/v1/responses/{second.id}/input_items?{query}")
        assert (status, body["error"]["param"]) == (400, param)
    # a parameter allm does not know is ignored, as a body's unknown field is
    status, body = server.json("GET", f"/v1/responses/{second.id}/input_items?page=2")
    assert status == 200
    assert body["object"] == "list"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.input_items.list("resp_unknown")


def test_the_store_stays_bounded_and_a_response_it_let_go_is_not_found_everywhere(tmp_path):
    """Past ``max_stored`` the oldest goes; gone, it is 404 on every route, as an expired one is
    (expiry itself is the store's, on a hand-set clock: tests/unit/test_gateway_store.py)."""
    with running_server(_config(tmp_path, "\n[responses]\nmax_stored = 2\n"), tmp_path) as srv:
        sdk = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="none", max_retries=0, timeout=120)
        made = [sdk.responses.create(model=MODEL, input="hi", max_output_tokens=1) for _ in range(3)]
        assert sdk.responses.retrieve(made[2].id).id == made[2].id
        assert sdk.responses.retrieve(made[1].id).id == made[1].id
        for call in (  # the oldest of three went first
            lambda: sdk.responses.retrieve(made[0].id),
            lambda: sdk.responses.input_items.list(made[0].id),
            lambda: sdk.responses.delete(made[0].id),
            lambda: sdk.responses.create(model=MODEL, previous_response_id=made[0].id, input="hi"),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
