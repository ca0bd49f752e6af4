"""Every endpoint's body as the edge checks it: OpenAI bodies pass; each hole fuzzing found is a 400."""

from __future__ import annotations

import pytest

from allm.gateway.chat import schema as chat
from allm.gateway.errors import ApiError
from allm.gateway.responses import schema as responses

M = "smollm2-135m-instruct"
USER = [{"role": "user", "content": "hi"}]
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
PART = {"type": "input_text", "text": ""}
RTOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def called(*calls):
    """A history whose assistant turn made these tool calls."""
    return {"messages": [*USER, {"role": "assistant", "tool_calls": list(calls)}]}


def fn(**function):
    return {**CALL, "function": function}


LONG = {"type": "string", "maxLength": 1e9}  # wedges llama.cpp's grammar compile as an integer


def json_schema(schema):
    return {
        "messages": USER,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }


def refused(node, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        node.check(body, "")
    assert (info.value.status, info.value.code) == (400, "invalid_value")
    return info.value


GOOD_CHAT = [
    {"model": M, "messages": USER},
    {
        "model": M,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        ],
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 2**31 - 1,
        "seed": -(2**63),
        "stop": ["a", "b", "c", "d"],
        "temperature": 2,
        "top_p": 0,
        "n": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
        "parallel_tool_calls": False,
        "user": "u",
        "frequency_penalty": -2,
        "presence_penalty": 1.5,
        "logit_bias": {"50256": -100, "13": 2.5},
        "logprobs": True,
        "top_logprobs": 20,
        "reasoning_effort": "low",
        # allm's extensions
        "top_k": 0,
        "min_p": 0.1,
        "repeat_penalty": 1.1,
        # what OpenAI's own clients send as a matter of course; nothing changes for them here
        "store": False,
        "metadata": {"k": "v"},
        "modalities": ["text"],
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
    },
]


@pytest.mark.parametrize("body", GOOD_CHAT)
def test_an_openai_chat_body_passes(body):
    chat.CHAT.check(body, "")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # an assistant tool_calls entry without function answered 500 (KeyError in the engine)
        (called({"id": "c", "type": "function"}), "messages[1].tool_calls[0].function"),
        (called(fn(name="f")), "messages[1].tool_calls[0].function.arguments"),
        (called(fn(name="f", arguments="{x")), "messages[1].tool_calls[0].function.arguments"),
        (called(fn(name="a b", arguments="")), "messages[1].tool_calls[0].function.name"),
        (called({**CALL, "type": "custom"}), "messages[1].tool_calls[0].type"),
        ({"messages": [*USER, {"role": "assistant", "tool_calls": "none"}]}, "messages[1].tool_calls"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
        ({"messages": []}, "messages"),
        ({"messages": USER * 2049}, "messages"),
        ({"messages": USER, "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": USER, "tool_choice": "required"}, "tool_choice"),
        ({"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"messages": USER, "tools": [TOOL, TOOL]}, "tools[1]"),
        ({"messages": USER, "tools": [TOOL] * 129}, "tools"),
        ({"messages": USER, "tools": [{"type": "custom", "custom": {}}]}, "tools[0]"),
        ({"messages": USER, "response_format": {"type": "xml"}}, "response_format"),
        ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        (json_schema({"enum": []}), "response_format.json_schema.schema.enum"),
        ({"messages": USER, "stop": ["a"] * 5}, "stop"),
        ({"messages": USER, "stop": "x" * 257}, "stop"),
        ({"messages": USER, "max_tokens": 2**31}, "max_tokens"),
        ({"messages": USER, "max_tokens": 2**64 + 1}, "max_tokens"),
        ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": USER, "seed": 2**63}, "seed"),
        ({"messages": USER, "temperature": 2.01}, "temperature"),
        ({"messages": USER, "n": 2}, "n"),
        ({"messages": USER, "logit_bias": {"hello": 1}}, "logit_bias"),
        ({"messages": USER, "logit_bias": {"1": 101}}, "logit_bias.1"),
        ({"messages": USER, "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        ({"messages": USER, "presence_penalty": 2.5}, "presence_penalty"),
        ({"messages": USER, "logprobs": 0}, "logprobs"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
        ({"messages": USER, "frequency_penalty": False}, "frequency_penalty"),
        ({"messages": USER, "top_k": -1}, "top_k"),
        ({"messages": USER, "top_k": 1.5}, "top_k"),
        ({"messages": USER, "min_p": 1.5}, "min_p"),
        ({"messages": USER, "repeat_penalty": 0}, "repeat_penalty"),
        ({"messages": USER, "reasoning_effort": "max"}, "reasoning_effort"),
        ({"messages": USER, "model": ""}, "model"),
    ],
)  # fmt: skip
def test_a_bad_chat_body_is_refused_naming_the_field(body, param):
    assert refused(chat.CHAT, {"model": M, **body}).param == param


@pytest.mark.parametrize(
    "body",
    [
        {"model": M, "input": "hi"},
        {
            "model": M,
            "input": [
                {"role": "user", "content": "Weather?"},
                {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
                 "content": [{"type": "output_text", "text": "x", "annotations": [], "logprobs": []}]},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "id": "fc_1"},
                {"type": "function_call_output", "call_id": "c", "output": "Sunny"},
                {"type": "function_call_output", "call_id": "c", "output": [PART]},
                {"type": "reasoning", "id": "rs_1", "summary": [],
                 "content": [{"type": "reasoning_text", "text": "Think."}]},
                {"role": "system", "content": "Be kind."},
                {"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
            ],
            "reasoning": {"effort": "medium", "summary": "auto"},
            "temperature": 0.2,
            "top_p": 0.9,
            "top_k": 20,
            "min_p": 0,
            "repeat_penalty": 1.05,
            "frequency_penalty": 0.5,
            "presence_penalty": 0.5,
            "logit_bias": {"42": 1},
            "instructions": "Be brief.",
            "tools": [RTOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "p", "schema": {}, "strict": True}},
            "metadata": {"k": "v"},
            "include": ["message.output_text.logprobs"],
            "truncation": "disabled",
            "store": False,
            "previous_response_id": "resp_abc",
            "max_output_tokens": 1,
            "top_logprobs": 5,
            "stream_options": {"include_obfuscation": False},
            "service_tier": "default",
            "prompt_cache_key": "k",
            "safety_identifier": "s",
        },
    ],
)  # fmt: skip
def test_an_openai_responses_body_passes(body):
    responses.RESPONSES.check(body, "")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # function_call items without name, arguments or call_id answered 500
        ({"input": [{"type": "function_call", "arguments": "{}", "call_id": "c"}]}, "input[0].name"),
        ({"input": [{"type": "function_call", "name": "f", "call_id": "c"}]}, "input[0].arguments"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{", "call_id": "c"}]},
         "input[0].arguments"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "reasoning"}]}, "input[0].summary"),
        ({"input": [{"type": "reasoning", "summary": [{"type": "summary_text"}]}]},
         "input[0].summary[0].text"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
        ({"input": "x", "include": ["everything"]}, "include[0]"),
        ({"input": "x", "truncation": "middle"}, "truncation"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "schema": LONG}}},
         "text.format.schema.maxLength"),
        ({"input": "x", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search_preview"}},
         "tool_choice"),  # a tool only OpenAI runs is ignored, and cannot be forced
        ({"input": "x", "tools": [{**RTOOL, "parameters": {"$defs": {}}}]}, "tools[0].parameters.$defs"),
        ({"input": "x", "tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice"),
        ({"input": "x", "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"input": "x", "previous_response_id": "../../etc/passwd"}, "previous_response_id"),
        ({"input": "x", "max_output_tokens": 2**64 + 1}, "max_output_tokens"),
        ({"input": []}, "input"),
        ({"input": 5}, "input"),
        ({"input": "x", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
        ({"input": "x", "top_k": -1}, "top_k"),
        ({"input": "x", "background": True}, "background"),
    ],
)  # fmt: skip
def test_a_bad_responses_body_is_refused_naming_the_field(body, param):
    assert refused(responses.RESPONSES, {"model": M, **body}).param == param


@pytest.mark.parametrize(
    ("node", "body", "param"),
    [
        (chat.COMPLETIONS, {"prompt": ""}, "prompt"),  # an assert in the engine: a 500 before
        (chat.COMPLETIONS, {"prompt": ["a", "b"]}, "prompt"),
        (chat.COMPLETIONS, {"prompt": [1, 2]}, "prompt"),
        (chat.COMPLETIONS, {"prompt": "x", "stop": [1]}, "stop[0]"),
        (chat.COMPLETIONS, {"prompt": "\x13\x13"}, "prompt"),  # no tokens at all: a 500, or worse
        (chat.EMBEDDINGS, {"input": ["ok", "\x04\x06"]}, "input[1]"),
        (chat.COMPLETIONS, {"prompt": "x", "echo": True}, "echo"),
        (chat.COMPLETIONS, {"prompt": "x", "best_of": 2}, "best_of"),
        (chat.EMBEDDINGS, {"input": "x", "encoding_format": "hex"}, "encoding_format"),
        (chat.EMBEDDINGS, {"input": ["x", ""]}, "input[1]"),
        (chat.EMBEDDINGS, {"input": ["x"] * 2049}, "input"),
        (chat.EMBEDDINGS, {"input": "x", "dimensions": 3}, "dimensions"),
    ],
)
def test_completions_and_embeddings_bodies(node, body, param):
    node.check({"model": M, "prompt": "x"} if node is chat.COMPLETIONS else {"model": M, "input": "x"}, "")
    assert refused(node, {"model": M, **body}).param == param


@pytest.mark.parametrize(
    "response_id", ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%00", "a b", "", "x" * 129]
)
def test_a_path_like_response_id_is_refused(response_id):
    with pytest.raises(ApiError) as info:
        responses.RESPONSE_ID.check(response_id, "response_id")
    assert info.value.param == "response_id"
    assert responses.RESPONSE_ID.check("resp_0123abc", "response_id") == "resp_0123abc"


@pytest.mark.parametrize("text", ["\n", " ", "\x13a", "\t\x13"])
def test_text_with_anything_but_invisible_controls_is_fine(text):
    chat.COMPLETIONS.check({"model": M, "prompt": text}, "")
    chat.EMBEDDINGS.check({"model": M, "input": text}, "")


def test_all_tools_parameters_share_one_grammar_budget():
    def tool(i):
        long = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 1000}}}
        return {"type": "function", "name": f"f{i}", "parameters": long}

    responses.RESPONSES.check({"model": M, "input": "x", "tools": [tool(i) for i in range(20)]}, "")
    error = refused(responses.RESPONSES, {"model": M, "input": "x", "tools": [tool(i) for i in range(21)]})
    assert error.param == "tools[20].parameters"
