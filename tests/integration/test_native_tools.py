"""Tool calls in each model family's own syntax, reasoning apart from the answer (issue 8).

Random-weight models the fixtures write carry real families' chat templates
(Qwen2.5's hermes format, Llama 3.1's JSON format, an R1-style ``<think>``
prompt): their text is noise, so every call that comes back well-formed was
kept so by the grammar, and ``logit_bias`` stands in for a trained model's
choice to begin a call. SmolLM2 shows the generic scheme on a real model.
"""

from __future__ import annotations

import json

import pytest
import pytest_asyncio

from allm.kernel.codes import AllmError, Code
from tests.model_files import smollm2_path, token_id, write_tiny_llama_gguf

from .conftest import text_manager

pytestmark = pytest.mark.asyncio(loop_scope="module")

CITIES = ["Paris", "Rome", "Oslo"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": CITIES}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def text(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    paths = {
        name: write_tiny_llama_gguf(tmp / f"{name}.gguf", name)
        for name in ("qwen2.5", "llama3.1", "qwen-think")
    }
    settings = {
        "models": [
            {"id": "smollm2", "path": str(smollm2_path()), "options": {"n_ctx": 2048}},
            *({"id": name, "path": str(path), "options": {"n_ctx": 2048}} for name, path in paths.items()),
        ]
    }
    async with text_manager(settings) as (client, _supervisor):
        yield client, paths


async def chat(client, model, **params):
    params.setdefault("messages", ASK)
    params.setdefault("temperature", 0.7)
    params.setdefault("seed", 7)
    return (await client.call("text", "chat", model=model, params=params)).data


async def stream(client, model, **params):
    params.setdefault("messages", ASK)
    params.setdefault("seed", 7)
    async with client.stream("text", "chat", model=model, params=params) as s:
        chunks = [chunk.data async for chunk in s]
    assert s.result is not None
    return chunks, s.result.data


def check_calls(data, allowed=("get_weather",)):
    for call in data["tool_calls"]:
        assert call["name"] in allowed
        args = json.loads(call["arguments"])  # the grammar kept it valid JSON ...
        if call["name"] == "get_weather":
            assert args["city"] in CITIES  # ... and valid against the function's schema
    keys = [(c["name"], json.dumps(json.loads(c["arguments"]), sort_keys=True)) for c in data["tool_calls"]]
    assert len(keys) == len(set(keys)), f"a call repeated: {keys}"


@pytest.mark.parametrize("model", ["qwen2.5", "llama3.1", "smollm2"])
async def test_required_gives_valid_calls_in_the_family_syntax(text, model):
    client, _ = text
    data = await chat(client, model, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120)
    assert data["finish_reason"] == "tool_calls"
    assert data["text"] == ""
    assert len(data["tool_calls"]) >= 1
    check_calls(data, ("get_weather", "get_time"))


@pytest.mark.parametrize("model", ["qwen2.5", "llama3.1", "smollm2"])
async def test_a_named_function_is_the_only_call(text, model):
    client, _ = text
    choice = {"type": "function", "function": {"name": "get_time"}}
    data = await chat(client, model, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120)
    assert [c["name"] for c in data["tool_calls"]][:1] == ["get_time"]
    check_calls(data, ("get_time",))


@pytest.mark.parametrize("model", ["qwen2.5", "smollm2"])
async def test_parallel_tool_calls_false_allows_exactly_one_call(text, model):
    client, _ = text
    data = await chat(
        client,
        model,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=160,
    )
    assert len(data["tool_calls"]) == 1
    assert data["finish_reason"] == "tool_calls"


async def test_calls_are_bounded_and_never_repeated(text):
    """Pushed to call again and again, the reply stops at a repeat or at the bound."""
    client, paths = text
    bias = {str(token_id(paths["qwen2.5"], "<tool_call>")): 100}
    data = await chat(
        client, "qwen2.5", tools=[WEATHER], tool_choice="required", logit_bias=bias, max_tokens=400
    )
    check_calls(data)
    assert 1 <= len(data["tool_calls"]) <= len(CITIES)  # three distinct calls exist; a fourth repeats
    assert data["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(("model", "marker"), [("qwen2.5", "<tool_call>"), ("llama3.1", "<|python_tag|>")])
async def test_a_call_begun_in_free_text_continues_under_the_grammar(text, model, marker):
    """tool_choice auto: the model writes freely until it begins a call; the call comes out valid."""
    client, paths = text
    bias = {str(token_id(paths[model], marker)): 100}
    data = await chat(
        client,
        model,
        tools=[WEATHER],
        tool_choice="auto",
        parallel_tool_calls=False,
        logit_bias=bias,
        max_tokens=120,
    )
    assert len(data["tool_calls"]) == 1
    check_calls(data)
    assert data["finish_reason"] == "tool_calls"
    assert marker not in data["text"]


@pytest.mark.parametrize("model", ["qwen2.5", "llama3.1"])
async def test_without_a_marker_auto_answers_in_plain_text(text, model):
    client, paths = text
    marker = {"qwen2.5": "<tool_call>", "llama3.1": "<|python_tag|>"}[model]
    bias = {str(token_id(paths[model], marker)): -100}
    data = await chat(client, model, tools=[WEATHER], tool_choice="auto", logit_bias=bias, max_tokens=20)
    assert data["tool_calls"] == []
    assert data["finish_reason"] in ("stop", "length")


async def test_call_arguments_stream_as_they_are_generated(text):
    client, _ = text
    chunks, data = await stream(client, "qwen2.5", tools=[WEATHER], tool_choice="required", max_tokens=120)
    starts = [c["call"] for c in chunks if "call" in c]
    assert [s["name"] for s in starts] == [c["name"] for c in data["tool_calls"]]
    assert [s["id"] for s in starts] == [c["id"] for c in data["tool_calls"]]
    for index, call in enumerate(data["tool_calls"]):
        pieces = [c["arguments"] for c in chunks if "arguments" in c and c["index"] == index]
        assert "".join(pieces) == call["arguments"]
        assert len(pieces) > 1  # streamed piece by piece, not in one lump at the end
    first_call = next(i for i, c in enumerate(chunks) if "call" in c)
    assert all("text" not in c for c in chunks[first_call:])


async def test_reasoning_is_kept_apart_from_the_answer(text):
    """An R1-style template opens <think> in the prompt: what follows is reasoning until </think>."""
    client, paths = text
    chunks, data = await stream(client, "qwen-think", max_tokens=16, temperature=0.7)
    assert data["reasoning"]
    assert data["text"] == ""
    assert "".join(c["reasoning"] for c in chunks if "reasoning" in c) == data["reasoning"]
    assert data["usage"]["reasoning_tokens"] == data["usage"]["completion_tokens"] == 16
    # once </think> comes, the rest is the answer
    bias = {str(token_id(paths["qwen-think"], "</think>")): 100}
    data = await chat(client, "qwen-think", max_tokens=1, logit_bias=bias)
    assert data["reasoning"] == ""
    assert data["usage"]["reasoning_tokens"] == 1


async def test_the_generic_scheme_answers_after_a_tool_result_in_plain_text(text):
    client, _ = text
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees"},
    ]
    data = await chat(
        client,
        "smollm2",
        messages=messages,
        tools=[WEATHER],
        tool_choice="auto",
        temperature=0,
        max_tokens=40,
    )
    assert data["tool_calls"] == []
    assert data["text"].strip()
    assert not data["text"].lstrip().startswith("{")
    assert "tool_calls" not in data["text"]
    assert '"response"' not in data["text"]


async def test_a_template_that_refuses_the_messages_is_the_clients_error(text):
    """Llama 3.1's template raises on two calls in one message: UNSUPPORTED (400), naming why."""
    client, _ = text
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
        for i in (1, 2)
    ]
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": calls}]
    with pytest.raises(AllmError) as caught:
        await chat(client, "llama3.1", messages=messages, tools=[WEATHER], max_tokens=8)
    assert caught.value.code is Code.UNSUPPORTED
    assert caught.value.message == (
        "llama3.1's chat template refused the messages: This model only supports single tool-calls at once!"
    )
