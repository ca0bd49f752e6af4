"""Request parameters, stop sequences and the tool-call scheme of the text engines."""

from __future__ import annotations

import json

import pytest

from kernel.codes import AllmError, Code
from managers.text.generation import (
    Sampling,
    StopMatcher,
    check_messages,
    parse_tool_output,
    plan_tools,
    with_tool_prompt,
)


def feed_all(stops, pieces):
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_sequence_split_across_tokens_is_found_and_cut():
    assert feed_all(["END"], ["one E", "N", "D two"]) == ("one ", True)


def test_text_that_only_looks_like_a_stop_start_is_released():
    assert feed_all(["END"], ["one E", "NX"]) == ("one ENX", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["b", "a"], ["xxab"]) == ("xx", True)


def test_no_stops_passes_text_straight_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
    ],
)
def test_bad_parameters_are_refused_naming_the_field(params, param):
    with pytest.raises(AllmError) as info:
        Sampling.from_params(params)
    assert info.value.code is Code.UNSUPPORTED
    assert info.value.reason == "invalid_request"
    assert info.value.param == param


def test_good_parameters_are_read():
    s = Sampling.from_params(
        {
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 7,
            "stop": "x",
            "response_format": {"type": "json_object"},
        }
    )
    assert (s.max_tokens, s.temperature, s.top_p, s.seed, s.stop, s.json_object) == (
        5,
        0.0,
        0.5,
        7,
        ("x",),
        True,
    )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
    ],
)
def test_bad_messages_are_refused(messages, param):
    with pytest.raises(AllmError) as info:
        check_messages(messages)
    assert info.value.param == param


def test_developer_messages_are_system_messages_for_templates():
    assert check_messages([{"role": "developer", "content": "be brief"}]) == [
        {"role": "system", "content": "be brief"}
    ]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tools_with_auto_allow_a_call_or_a_reply():
    plan = plan_tools([WEATHER], "auto")
    assert plan is not None
    assert len(plan.schema["anyOf"]) == 2
    assert "get_weather" in plan.system_text


def test_required_or_named_tool_choice_forces_a_call():
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        plan = plan_tools([WEATHER], choice)
        assert plan is not None
        assert plan.schema["required"] == ["tool_calls"]


def test_tool_choice_none_or_no_tools_means_plain_generation():
    assert plan_tools([WEATHER], "none") is None
    assert plan_tools(None, "auto") is None


def test_tool_choice_naming_an_unknown_function_is_refused():
    with pytest.raises(AllmError) as info:
        plan_tools([WEATHER], {"type": "function", "function": {"name": "nope"}})
    assert info.value.param == "tool_choice"


def test_tool_output_parses_into_calls_or_text():
    text, calls = parse_tool_output(
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}'
    )
    assert text == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert calls[0]["id"].startswith("call_")
    assert parse_tool_output('{"response": "hello"}') == ("hello", [])
    assert parse_tool_output('{"tool_calls": [') == ('{"tool_calls": [', [])


def test_tool_traffic_is_rendered_for_templates_without_tool_support():
    plan = plan_tools([WEATHER], "auto")
    assert plan is not None
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ]
    out = with_tool_prompt(messages, plan)
    assert out[0]["role"] == "system"
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    assert out[3] == {"role": "user", "content": "Function result: sunny"}
