"""Request parameters, stop sequences and the tool-call scheme of the text engines."""

from __future__ import annotations

import json

import pytest

from allm.kernel.codes import AllmError, Code
from allm.managers.text.chat_format import Family, template_messages
from allm.managers.text.request import check_messages, tool_spec
from allm.managers.text.sampling import Sampling
from allm.managers.text.stops import StopMatcher


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


def test_developer_messages_are_system_messages_for_templates_without_that_role():
    messages = check_messages([{"role": "developer", "content": "be brief"}])
    assert messages == [{"role": "developer", "content": "be brief"}]
    assert template_messages(messages, Family.GENERIC, None) == [{"role": "system", "content": "be brief"}]
    assert template_messages(messages, Family.HERMES, None)[0]["role"] == "system"
    assert template_messages(messages, Family.HARMONY, None)[0]["role"] == "developer"


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_auto_allows_calls_and_text_required_and_named_force_calls():
    auto = tool_spec([WEATHER], "auto")
    assert auto is not None
    assert not auto.required
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        spec = tool_spec([WEATHER], choice)
        assert spec is not None
        assert spec.required


def test_parallel_tool_calls_false_bounds_a_reply_to_one_call():
    spec = tool_spec([WEATHER], "auto", False)
    assert spec is not None
    assert spec.max_calls == 1
    assert tool_spec([WEATHER], "auto").max_calls > 1


def test_tool_choice_none_or_no_tools_means_plain_generation():
    assert tool_spec([WEATHER], "none") is None
    assert tool_spec(None, "auto") is None


def test_tool_choice_naming_an_unknown_function_is_refused():
    with pytest.raises(AllmError) as info:
        tool_spec([WEATHER], {"type": "function", "function": {"name": "nope"}})
    assert info.value.param == "tool_choice"


CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TRAFFIC = [
    {"role": "user", "content": "weather?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
]


def test_tool_traffic_is_rendered_as_text_for_templates_without_tool_support():
    out = template_messages(check_messages(TRAFFIC), Family.GENERIC, tool_spec([WEATHER], "auto"))
    assert out[0]["role"] == "system"
    assert "get_weather" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]
    }
    assert out[3] == {"role": "user", "content": "Result of get_weather (call c1): sunny"}


def test_tool_traffic_keeps_its_roles_ids_and_names_for_templates_with_tools():
    out = template_messages(check_messages(TRAFFIC), Family.HERMES, tool_spec([WEATHER], "auto"))
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # an object, for tojson
    assert out[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "get_weather"}
