"""The manager's chunks as Responses events and Chat chunks, on the data contract alone (no engine).

Every kind of chunk the text manager may send (text with logprobs, reasoning, a
call's start, its arguments) and calls that only the final reply holds, each
checked against OpenAI's grammar; then the turn's parameters and input items.
"""

from __future__ import annotations

import json

import pytest

from allm.gateway.chat.handlers import ChatDeltas
from allm.gateway.config import ModelConfig
from allm.gateway.responses import schema as api_schema
from allm.gateway.responses.events import Events
from allm.gateway.responses.items import input_items, item_messages, output_items
from allm.gateway.responses.turn import Turn
from tests.event_grammar import check_chat_chunks, check_response_events

MODEL = ModelConfig("m", "/m.gguf", defaults={"temperature": 0.2, "top_p": 0.9})
LOGPROB = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": []}
USAGE = {"prompt_tokens": 10, "completion_tokens": 7, "reasoning_tokens": 3}


def turn(**body) -> Turn:
    return Turn(api_schema.RESPONSES.check({"model": "m", "input": "hi", **body}, ""), MODEL, [])


def reply(text="", reasoning="", calls=(), finish="stop", **more) -> dict:
    return {
        "text": text,
        "reasoning": reasoning,
        "tool_calls": list(calls),
        "finish_reason": finish,
        "usage": USAGE,
        "model": "m",
        **more,
    }


def events_of(sse: str) -> list[dict]:
    return [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: ")]


def run(t: Turn, chunks: list[dict], data: dict) -> tuple[list[dict], dict]:
    events = Events(t)
    opening = t.response("in_progress")
    sse = events.event("response.created", response=opening) + events.event(
        "response.in_progress", response=opening
    )
    sse += "".join(events.feed(chunk) for chunk in chunks)
    tail, final = events.finish(data)
    return events_of(sse + tail), final


CALL = {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
CALL2 = {"id": "call_2", "name": "get_time", "arguments": "{}"}
STREAMS = {
    "text": ([{"text": "Hel"}, {"text": "lo"}], reply("Hello"), ["message"]),
    "reasoning then text": (
        [{"reasoning": "The user "}, {"reasoning": "greets."}, {"text": "Hello"}],
        reply("Hello", "The user greets."),
        ["reasoning", "message"],
    ),
    "reasoning then streamed calls": (
        [
            {"reasoning": "Weather: call."},
            {"call": {"index": 0, "id": "call_1", "name": "get_weather"}},
            {"arguments": '{"city": ', "index": 0},
            {"arguments": '"Paris"}', "index": 0},
            {"call": {"index": 1, "id": "call_2", "name": "get_time"}},
            {"arguments": "{}", "index": 1},
        ],
        reply("", "Weather: call.", [CALL, CALL2], "tool_calls"),
        ["reasoning", "function_call", "function_call"],
    ),
    "text then a streamed call": (
        [
            {"text": "Let me look."},
            {"call": {"index": 0, "id": "call_1", "name": "get_weather"}},
            {"arguments": CALL["arguments"], "index": 0},
        ],
        reply("Let me look.", "", [CALL], "tool_calls"),
        ["message", "function_call"],
    ),
    "calls only in the final reply": ([], reply("", "", [CALL, CALL2], "tool_calls"), ["function_call"] * 2),
    "text sent once, at the end": ([{"text": "Sunny."}], reply("Sunny."), ["message"]),
    "nothing at all": ([], reply(""), ["message"]),
    "cut at the token limit": ([{"text": "Once upon"}], reply("Once upon", finish="length"), ["message"]),
}


@pytest.mark.parametrize("case", STREAMS)
def test_every_chunk_sequence_follows_the_response_event_grammar(case):
    chunks, data, types = STREAMS[case]
    events, final = run(turn(), chunks, data)
    items = check_response_events(events)
    assert [item["type"] for item in items] == types
    assert final["output"] == items
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
    calls = [item for item in items if item["type"] == "function_call"]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in calls] == [
        (c["id"], c["name"], c["arguments"]) for c in data["tool_calls"]
    ]
    texts = [item["content"][0]["text"] for item in items if item["type"] != "function_call"]
    assert "".join(texts) == data["reasoning"] + data["text"]
    if data["finish_reason"] == "length":
        assert final["status"] == "incomplete"
        assert items[-1]["status"] == "incomplete"
        assert events[-1]["type"] == "response.incomplete"
    # the same reply without stream has the same items, but for their ids
    unstreamed = output_items(data)
    strip = lambda its: [{k: v for k, v in it.items() if k != "id"} for it in its]  # noqa: E731
    assert strip(unstreamed) == strip(items)


def test_logprobs_go_in_the_deltas_and_the_part_when_asked():
    asked = turn(include=["message.output_text.logprobs"], top_logprobs=2)
    assert (asked.params["logprobs"], asked.params["top_logprobs"]) == (True, 2)
    events, final = run(asked, [{"text": "Hi", "logprobs": [LOGPROB]}], reply("Hi", logprobs=[LOGPROB]))
    check_response_events(events)
    [delta] = [e for e in events if e["type"] == "response.output_text.delta"]
    assert delta["logprobs"] == [LOGPROB]
    assert final["output"][0]["content"][0]["logprobs"] == [LOGPROB]
    events, final = run(turn(), [{"text": "Hi"}], reply("Hi"))
    assert final["output"][0]["content"][0]["logprobs"] == []
    assert "logprobs" not in turn().params


def test_a_turn_sends_every_sampling_value_and_echoes_the_ones_used():
    t = turn()
    assert {k: t.params[k] for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")} == {
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repeat_penalty": 1.0,
    }
    assert (t.params["frequency_penalty"], t.params["presence_penalty"]) == (0.0, 0.0)
    response = t.response("completed")
    assert (response["temperature"], response["top_p"]) == (0.2, 0.9)
    assert response["reasoning"] == {"effort": None, "summary": None}
    asked = turn(
        temperature=0,
        top_k=5,
        logit_bias={"7": -100},
        parallel_tool_calls=False,
        reasoning={"effort": "high", "summary": "auto"},
    )
    assert (asked.params["temperature"], asked.params["top_p"], asked.params["top_k"]) == (0, 0.9, 5)
    assert asked.params["logit_bias"] == {"7": -100}
    assert (asked.params["parallel_tool_calls"], asked.params["reasoning_effort"]) == (False, "high")
    response = asked.response("completed")
    assert (response["temperature"], response["parallel_tool_calls"]) == (0, False)
    assert response["reasoning"] == {"effort": "high", "summary": "auto"}


def test_input_items_keep_every_role_and_continue_as_chat_messages():
    raw = api_schema.RESPONSES.check(
        {
            "model": "m",
            "input": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
                {"role": "user", "content": "Weather?"},
                {
                    "type": "reasoning",
                    "summary": [],
                    "content": [{"type": "reasoning_text", "text": "Call."}],
                },
                {"type": "message", "role": "assistant", "content": "Looking."},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
            ],
        },
        "",
    )["input"]
    items = input_items(raw)
    assert [item["type"] for item in items] == [
        "message",
        "message",
        "message",
        "reasoning",
        "message",
        "function_call",
        "function_call_output",
    ]
    assert len({item["id"] for item in items}) == len(items)
    assert items[1]["content"] == [{"type": "input_text", "text": "Use tools."}]
    assert items[4]["content"][0]["type"] == "output_text"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert item_messages(items) == [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": "Use tools."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Looking.", "reasoning_content": "Call.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
    ]
    # a follow-up keeps them all, system included; only instructions are the turn's own
    t = Turn(
        api_schema.RESPONSES.check({"model": "m", "input": "And now?", "instructions": "Hi."}, ""),
        MODEL,
        items,
    )
    roles = [m["role"] for m in t.params["messages"]]
    assert roles == ["system", "system", "developer", "user", "assistant", "tool", "user"]
    assert t.params["messages"][0]["content"] == "Hi."


CHAT_STREAMS = {
    "text": ([{"text": "Hel"}, {"text": "lo"}], reply("Hello")),
    "reasoning, then streamed calls": (
        [
            {"reasoning": "Think."},
            {"call": {"index": 0, "id": "call_1", "name": "get_weather"}},
            {"arguments": '{"city": ', "index": 0},
            {"arguments": '"Paris"}', "index": 0},
        ],
        reply("", "Think.", [CALL], "tool_calls"),
    ),
    "calls only in the final reply": ([], reply("", "", [CALL, CALL2], "tool_calls")),
}


@pytest.mark.parametrize("case", CHAT_STREAMS)
def test_every_chunk_sequence_follows_the_chat_chunk_grammar(case):
    chunks, data = CHAT_STREAMS[case]
    deltas = ChatDeltas(
        {"id": "chatcmpl-1", "object": "chat.completion.chunk"}, logprobs=False, include_usage=True
    )
    sse = deltas.chunk({"role": "assistant", "content": ""}) + "".join(deltas.feed(c) for c in chunks)
    sse += deltas.finish(data)
    assert sse.endswith("data: [DONE]\n\n")
    lines = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    built = check_chat_chunks(lines)
    assert (built["content"], built["reasoning"]) == (data["text"], data["reasoning"])
    assert built["calls"] == data["tool_calls"]
    assert lines[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_chat_logprobs_ride_on_their_text_delta():
    deltas = ChatDeltas({"id": "c"}, logprobs=True, include_usage=False)
    [line] = [json.loads(x[6:]) for x in deltas.feed({"text": "Hi", "logprobs": [LOGPROB]}).splitlines() if x]
    assert line["choices"][0]["logprobs"] == {"content": [LOGPROB], "refusal": None}
    plain = ChatDeltas({"id": "c"}, logprobs=False, include_usage=False)
    [line] = [json.loads(x[6:]) for x in plain.feed({"text": "Hi"}).splitlines() if x]
    assert line["choices"][0]["logprobs"] is None
