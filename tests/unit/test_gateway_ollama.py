"""Ollama's messages in the manager's shape: a history keeps its calls, each result finds its call."""

from __future__ import annotations

from allm.gateway.ollama.turn import messages_of


def test_an_answered_call_stays_in_the_history_and_its_result_names_it():
    call = {"function": {"name": "get_weather", "arguments": {"city": "London"}}}
    out = messages_of(
        [
            {"role": "user", "content": "Weather in London?"},
            {"role": "assistant", "content": "", "tool_calls": [call, call]},
            {"role": "tool", "content": "12 C", "tool_name": "get_weather"},
            {"role": "tool", "content": "13 C", "tool_name": "get_weather"},
        ]
    )
    calls = out[1]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_weather"]
    assert calls[0]["function"]["arguments"] == '{"city": "London"}'
    # each result answers the next unanswered call of its function, once
    assert [m["tool_call_id"] for m in out[2:]] == [calls[0]["id"], calls[1]["id"]]
    assert calls[0]["id"] != calls[1]["id"]
