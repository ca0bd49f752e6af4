"""The manager's chunks as Responses events and Chat chunks, on the data contract alone (no engine).

Every kind of chunk the text manager may send (text with logprobs, reasoning, a
call's start, its arguments) and calls that only the final reply holds, each
checked against OpenAI's grammar; then the turn's parameters and input items;
then tools as Codex sends them (custom tools with a grammar, namespaces, the tools
OpenAI runs) and reasoning sealed into encrypted_content and opened again.
"""

from __future__ import annotations

import json

import pytest

from allm.gateway.chat.handlers import ChatDeltas
from allm.gateway.config import ModelConfig
from allm.gateway.errors import ApiError
from allm.gateway.responses import schema as api_schema
from allm.gateway.responses.events import Events
from allm.gateway.responses.items import input_items, item_messages, output_items
from allm.gateway.responses.turn import Turn
from allm.gateway.seal import Sealer
from allm.gateway.spec import IGNORED
from allm.kernel.client import Homes
from tests.codex_tools import APPLY_PATCH
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
    unstreamed = output_items(data, {})
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


# -- tools: custom (free-form input), namespaces, the ones OpenAI runs ------------------------

PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files.",
    "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH},
}
SHELL_TOOL = {
    "type": "function",
    "name": "shell",
    "strict": False,
    "defer_loading": True,
    "output_schema": {"type": "string"},
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
}
CRM = {
    "type": "namespace",
    "name": "crm",
    "description": "The customer database.",
    "tools": [
        {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}},
        {"type": "custom", "name": "query"},
    ],
}
TOOLS = [SHELL_TOOL, CRM, PATCH_TOOL, {"type": "web_search", "external_web_access": False}]


def patch_tool(syntax: str, definition: str) -> dict:
    return {**PATCH_TOOL, "format": {"type": "grammar", "syntax": syntax, "definition": definition}}


def sealer() -> Sealer:
    return Sealer(bytes(range(32)))


def test_tools_reach_the_manager_by_the_names_the_model_sees_and_hosted_ones_are_left_out():
    noted: list[str] = []
    token = IGNORED.set(noted)
    try:
        t = turn(tools=[*TOOLS, {"type": "code_interpreter", "container": "auto"}], tool_choice="auto")
    finally:
        IGNORED.reset(token)
    assert noted == ["tools[3]", "tools[4]"]  # logged and counted like fields allm does not know
    tools = t.params["tools"]
    assert [tool.get("function", tool.get("custom"))["name"] for tool in tools] == [
        "shell",
        "crm.lookup",
        "crm.query",
        "apply_patch",
    ]
    assert [tool["type"] for tool in tools] == ["function", "function", "custom", "custom"]
    assert "The customer database." in tools[1]["function"]["description"]
    grammar = tools[3]["custom"]["format"]["grammar"]
    assert grammar["syntax"] == "lark"
    assert grammar["parsed"]["start"] == "start"
    # the response echoes the tools as sent, without what allm made of them
    echoed = t.response("completed")["tools"]
    assert echoed[2]["format"] == PATCH_TOOL["format"]
    assert echoed[3] == {"type": "web_search"}


@pytest.mark.parametrize(
    ("choice", "shown"),
    [
        ({"type": "custom", "name": "apply_patch"}, "apply_patch"),
        ({"type": "function", "name": "lookup"}, "crm.lookup"),  # the one namespaced tool so named
        ({"type": "custom", "name": "query"}, "crm.query"),
    ],
)
def test_a_forced_tool_is_named_as_the_model_sees_it(choice, shown):
    assert turn(tools=TOOLS, tool_choice=choice).params["tool_choice"] == {
        "type": "function",
        "function": {"name": shown},
    }


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "only OpenAI runs"),
        ({"tools": TOOLS, "tool_choice": {"type": "mcp", "server_label": "x"}}, "tool_choice", "only OpenAI"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "apply_patch"}}, "tool_choice",
         "not among"),
        ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice", "requires tools"),
        (
            {"tools": [SHELL_TOOL, patch_tool("lark", "start: a\na: a")]},
            "tools[1].format.definition",
            "left-recursive",
        ),
        (
            {"tools": [patch_tool("lark", 'start: "x"\n%ignore " "')]},
            "tools[0].format.definition",
            "%ignore",
        ),
        (
            {"tools": [patch_tool("regex", r"\bword\b")]},
            "tools[0].format.definition",
            "anchor",
        ),
        ({"tools": [SHELL_TOOL, {**SHELL_TOOL, "type": "custom"}]}, "tools[1]", "two tools"),
        ({"tools": [CRM, {**CRM, "tools": [CRM["tools"][0]]}]}, "tools[1].tools[0]", "two tools"),
        ({"truncation": "sometimes"}, "truncation", "one of"),
        ({"input": [{"type": "custom_tool_call", "call_id": "c", "name": "p"}]}, "input[0].input",
         "required"),
    ],
)  # fmt: skip
def test_tools_allm_cannot_honour_are_refused_naming_the_field(body, param, words):
    with pytest.raises(ApiError) as info:
        api_schema.RESPONSES.check({"model": "m", "input": "hi", **body}, "")
    assert info.value.param == param
    assert words in info.value.message


def test_custom_and_namespaced_calls_go_back_to_the_model_by_their_shown_names():
    raw = api_schema.RESPONSES.check(
        {
            "model": "m",
            "tools": TOOLS,
            "input": [
                {"role": "user", "content": "Patch it."},
                {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": 'a "b"\n'},
                {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done."},
                {
                    "type": "function_call",
                    "call_id": "c2",
                    "name": "lookup",
                    "namespace": "crm",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "c2", "output": "Ada"},
            ],
        },
        "",
    )
    t = Turn(raw, MODEL, [])
    assert [item["type"] for item in t.items][1:] == [
        "custom_tool_call",
        "custom_tool_call_output",
        "function_call",
        "function_call_output",
    ]
    assert t.items[3]["namespace"] == "crm"
    messages = t.params["messages"]
    assert messages[1]["tool_calls"] == [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "apply_patch", "arguments": '{"input": "a \\"b\\"\\n"}'},
        }
    ]
    assert messages[2] == {"role": "tool", "tool_call_id": "c1", "content": "Done."}
    assert messages[3]["tool_calls"][0]["function"]["name"] == "crm.lookup"
    assert messages[4] == {"role": "tool", "tool_call_id": "c2", "content": "Ada"}


PATCH = '*** Begin Patch\n*** Add File: a.txt\n+say "hi"\t😀\n*** End Patch\n'
PATCH_ARGS = json.dumps({"input": PATCH})


def test_a_custom_call_streams_its_decoded_input_in_the_custom_tool_call_events():
    t = turn(tools=TOOLS)
    call = {"id": "call_1", "name": "apply_patch", "arguments": PATCH_ARGS}
    lookup = {"id": "call_2", "name": "crm.lookup", "arguments": "{}"}
    pieces = [PATCH_ARGS[i : i + 3] for i in range(0, len(PATCH_ARGS), 3)]  # escapes cut in two
    chunks = [
        {"call": {"index": 0, "id": "call_1", "name": "apply_patch"}},
        *({"arguments": piece, "index": 0} for piece in pieces),
        {"call": {"index": 1, "id": "call_2", "name": "crm.lookup"}},
        {"arguments": "{}", "index": 1},
    ]
    events, final = run(t, chunks, reply("", "", [call, lookup], "tool_calls"))
    items = check_response_events(events)
    assert [item["type"] for item in items] == ["custom_tool_call", "function_call"]
    assert items[0]["input"] == PATCH
    assert items[0]["name"] == "apply_patch"
    assert "namespace" not in items[0]
    assert (items[1]["name"], items[1]["namespace"]) == ("lookup", "crm")
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    assert len(deltas) > 10
    assert "".join(deltas) == PATCH
    done = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert [e["input"] for e in done] == [PATCH]
    # without stream: the same items, but for their ids
    unstreamed = output_items(reply("", "", [call, lookup], "tool_calls"), t.shown)
    assert [{**i, "id": ""} for i in unstreamed] == [{**i, "id": ""} for i in final["output"]]


def test_a_custom_call_known_only_from_the_final_reply_still_gets_its_events():
    t = turn(tools=TOOLS)
    call = {"id": "call_1", "name": "crm.query", "arguments": json.dumps({"input": "SELECT 1"})}
    events, final = run(t, [], reply("", "", [call], "tool_calls"))
    items = check_response_events(events)
    assert items == final["output"]
    assert (items[0]["type"], items[0]["input"], items[0]["namespace"]) == (
        "custom_tool_call",
        "SELECT 1",
        "crm",
    )


def test_reasoning_comes_back_sealed_when_asked_and_a_later_request_continues_from_it():
    t = Turn(
        api_schema.RESPONSES.check(
            {"model": "m", "input": "hi", "store": False, "include": ["reasoning.encrypted_content"]}, ""
        ),
        MODEL,
        [],
        sealer(),
    )
    events, final = run(
        t, [{"reasoning": "Think "}, {"reasoning": "twice."}, {"text": "Hi"}], reply("Hi", "Think twice.")
    )
    check_response_events(events)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    sealed = done[0]["encrypted_content"]
    assert sealed.startswith("allm1.")
    assert "Think" not in sealed
    assert final["output"][0]["encrypted_content"] == sealed
    unstreamed = output_items(reply("Hi", "Think twice."), {}, t.sealing())
    assert sealer().unseal(unstreamed[0]["encrypted_content"], "x")["text"] == "Think twice."

    # Codex sends the item back as it came, without the text: the model gets the text again
    back = {"type": "reasoning", "id": done[0]["id"], "summary": [], "encrypted_content": sealed}
    later = api_schema.RESPONSES.check(
        {"model": "m", "store": False, "input": [back, {"role": "assistant", "content": "Hi"}]}, ""
    )
    t2 = Turn(later, MODEL, [], sealer())
    assert t2.params["messages"] == [
        {"role": "assistant", "content": "Hi", "reasoning_content": "Think twice."}
    ]

    # a token changed by one character, or sealed by another key, is refused naming the item
    for forged, key in (
        (sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1], sealer()),
        (sealed, Sealer(bytes(32))),
    ):
        bad = {**back, "encrypted_content": forged}
        with pytest.raises(ApiError) as info:
            Turn(api_schema.RESPONSES.check({"model": "m", "input": [bad]}, ""), MODEL, [], key)
        assert (info.value.status, info.value.param) == (400, "input[0].encrypted_content")
    # and so is a token sealed for something else
    other = sealer().seal({"use": "anthropic.thinking", "text": "x"})
    with pytest.raises(ApiError) as info:
        Turn(
            api_schema.RESPONSES.check({"model": "m", "input": [{**back, "encrypted_content": other}]}, ""),
            MODEL,
            [],
            sealer(),
        )
    assert info.value.param == "input[0].encrypted_content"


def test_codex_fields_are_accepted_and_echoed():
    t = turn(
        tools=TOOLS,
        store=False,
        include=["reasoning.encrypted_content"],
        reasoning={"effort": "xhigh", "summary": "auto"},
        prompt_cache_key="019d27fa",
        client_metadata={"x-codex-turn-metadata": json.dumps({"turn_id": "t"})},
        safety_identifier="s",
        service_tier="auto",
        user="u",
        truncation="disabled",
        text={"verbosity": "low"},
        parallel_tool_calls=True,
    )
    assert t.params["reasoning_effort"] == "high"
    response = t.response("in_progress")
    assert (response["prompt_cache_key"], response["truncation"], response["store"]) == (
        "019d27fa",
        "disabled",
        False,
    )
    assert response["reasoning"] == {"effort": "xhigh", "summary": "auto"}


def test_an_affinity_key_remembers_the_instance_that_took_it_last_and_forgets_the_oldest():
    homes = Homes(size=2)
    homes.put("a", "ipc://text-0")
    homes.put("b", "ipc://text-1")
    homes.put("a", "ipc://text-1")  # served elsewhere since: the newest instance counts
    homes.put("c", "ipc://text-0")  # b is now the oldest key, and goes
    homes.put(None, "ipc://text-0")
    homes.put("d", None)
    assert [homes.get(key) for key in ("a", "b", "c", "d", None)] == [
        "ipc://text-1",
        None,
        "ipc://text-0",
        None,
        None,
    ]


def test_truncation_auto_drops_the_oldest_exchange_at_a_time_and_keeps_the_instructions():
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "c1", "output": "ok"}
    conversation = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "one"},
        call,
        result,
        {"role": "assistant", "content": "done one"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "done two"},
        {"role": "user", "content": "three"},
    ]
    t = turn(input=conversation, instructions="You are terse.", truncation="auto")

    def said() -> list[str]:
        return [m["content"] or m["role"] for m in t.params["messages"]]

    before = said()
    assert t.truncate()
    # the first exchange went whole: its call and that call's result with it
    assert said() == ["You are terse.", "Be brief.", "two", "done two", "three"]
    assert not any(m.get("tool_calls") or m["role"] == "tool" for m in t.params["messages"])
    assert t.truncate()
    assert said() == ["You are terse.", "Be brief.", "three"]
    assert not t.truncate()  # the last user turn is all that is left
    assert t.response("completed")["truncation"] == "auto"
    assert len(t.items) == len(conversation)  # what is stored keeps every item
    disabled = turn(input=conversation)
    assert not disabled.truncate()
    assert [m["content"] or m["role"] for m in disabled.params["messages"]] == before[1:]
