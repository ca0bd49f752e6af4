"""Anthropic's Messages API against a real `allm serve`, in raw HTTP: answers, the event grammar, errors.

SmolLM2 answers and calls tools (the generic scheme); a tiny random model with an R1-style
template stands in for a reasoning model, so its thinking blocks and their signatures make
the round trip a client makes. The shapes checked are anthropic-sdk-python's
(``types/message.py``, ``raw_message_stream_event.py``).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
from typing import Any

import pytest

from tests.model_files import smollm2_path, write_tiny_llama_gguf

from .gateway_server import Server, running_server

KEY = "sk-anthropic-test"
MODEL = "smollm2-135m-instruct"
THINKER = "qwen-think"
N_CTX = 4096
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"],
    },
}
#: SmolLM2's end-of-turn and end-of-text tokens: banned, a reply goes on to max_tokens
NEVER_ENDS = {"2": -100, "0": -100}


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("anthropic")


@pytest.fixture(scope="module")
def server(tmp):
    thinker = write_tiny_llama_gguf(tmp / "qwen-think.gguf", "qwen-think")
    config = f"""
[server]
api_keys = ["{KEY}"]
data_dir = "{tmp / "data"}"

[text]
slots = 1   # one request runs at a time: the ping test makes one wait

[[models]]
id = "{MODEL}"
path = "{smollm2_path()}"
options = {{ n_ctx = {N_CTX} }}

[[models]]
id = "{THINKER}"
path = "{thinker}"
options = {{ n_ctx = 1024 }}
"""
    with running_server(config, tmp, api_key=KEY) as srv:
        yield srv


def ask(**fields: Any) -> dict[str, Any]:
    """A request body: the defaults, then ``fields``."""
    return {"model": MODEL, "max_tokens": 24, "temperature": 0, "messages": FRANCE, **fields}


def post(server: Server, body: Any, path: str = "/v1/messages", **kw: Any) -> tuple[int, Any]:
    return server.json("POST", path, body, **kw)


def parse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """A stream's events as (event name, data); each must be one ``event:`` line and one ``data:`` line."""
    out = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        name, data = frame.split("\n")
        assert name.startswith("event: "), frame
        assert data.startswith("data: "), frame
        payload = json.loads(data.removeprefix("data: "))
        assert payload["type"] == name.removeprefix("event: "), frame
        out.append((payload["type"], payload))
    return out


def stream(server: Server, body: dict[str, Any], path: str = "/v1/messages") -> list[dict[str, Any]]:
    status, headers, raw = server.request("POST", path, {**body, "stream": True})
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    return [payload for _name, payload in parse_events(raw)]


def check_grammar(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Anthropic's event grammar, event by event; returns the message the events build."""
    kinds = [e["type"] for e in events if e["type"] != "ping"]
    assert kinds[0] == "message_start", kinds
    assert kinds[-2:] == ["message_delta", "message_stop"], kinds
    start = events[0]["message"]
    assert start["id"].startswith("msg_")
    assert (start["type"], start["role"], start["content"], start["stop_reason"]) == (
        "message",
        "assistant",
        [],
        None,
    )
    assert isinstance(start["usage"]["input_tokens"], int)
    blocks: list[dict[str, Any]] = []
    open_index = None
    for e in events[1:-2]:
        if e["type"] == "ping":
            continue
        if e["type"] == "content_block_start":
            assert open_index is None, "a block began before the last one stopped"
            assert e["index"] == len(blocks)
            blocks.append(dict(e["content_block"]))
            open_index = e["index"]
            partial = ""
        elif e["type"] == "content_block_delta":
            assert e["index"] == open_index
            block, delta = blocks[open_index], e["delta"]
            kind = {"text": "text_delta", "tool_use": "input_json_delta", "thinking": "thinking_delta"}
            if delta["type"] == "signature_delta":
                assert (block["type"], block["signature"]) == ("thinking", "")
                block["signature"] = delta["signature"]
            else:
                assert delta["type"] == kind[block["type"]], (block, delta)
                assert not block.get("signature"), "a thinking delta after its signature"
                if delta["type"] == "text_delta":
                    block["text"] += delta["text"]
                elif delta["type"] == "thinking_delta":
                    block["thinking"] += delta["thinking"]
                else:
                    partial += delta["partial_json"]
        else:
            assert e["type"] == "content_block_stop", e
            assert e["index"] == open_index
            if blocks[open_index]["type"] == "tool_use":
                blocks[open_index]["input"] = json.loads(partial or "{}")
            if blocks[open_index]["type"] == "thinking":
                assert blocks[open_index]["signature"], "a thinking block stopped without its signature"
            open_index = None
    assert open_index is None
    delta = events[-2]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence", "tool_use")
    assert delta["usage"]["output_tokens"] >= 1
    return {
        **start,
        "content": blocks,
        "stop_reason": delta["delta"]["stop_reason"],
        "stop_sequence": delta["delta"]["stop_sequence"],
        "usage": delta["usage"],
    }


# -- answers ----------------------------------------------------------------------------


def test_a_message_answers_in_anthropics_shape(server):
    status, msg = post(server, ask(system="Answer in one short sentence."))
    assert status == 200, msg
    assert msg["id"].startswith("msg_")
    assert (msg["type"], msg["role"], msg["model"]) == ("message", "assistant", MODEL)
    [block] = msg["content"]
    assert block["type"] == "text"
    assert "Paris" in block["text"]
    assert msg["stop_reason"] in ("end_turn", "max_tokens")
    assert msg["stop_sequence"] is None
    usage = msg["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] > 10
    assert usage["cache_creation_input_tokens"] == 0
    assert 1 <= usage["output_tokens"] <= 24


def test_a_stream_follows_the_event_grammar_and_builds_the_same_message(server):
    body = ask(system=[{"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}}])
    events = stream(server, body)
    built = check_grammar(events)
    status, whole = post(server, body)
    assert status == 200
    assert [b["type"] for b in built["content"]] == ["text"]
    assert built["content"] == whole["content"]  # greedy: the deltas join to the same text
    assert built["stop_reason"] == whole["stop_reason"]
    assert built["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    prompt = whole["usage"]["input_tokens"] + whole["usage"]["cache_read_input_tokens"]
    opened = events[0]["message"]["usage"]
    assert opened["input_tokens"] + opened["cache_read_input_tokens"] == prompt
    assert built["usage"]["input_tokens"] + built["usage"]["cache_read_input_tokens"] == prompt
    # sent again, its prompt is in the cache, and message_start says so as the last event does
    again = stream(server, body)
    opened = again[0]["message"]["usage"]
    assert opened["cache_read_input_tokens"] > 0
    assert opened["cache_read_input_tokens"] == check_grammar(again)["usage"]["cache_read_input_tokens"]
    assert opened["input_tokens"] + opened["cache_read_input_tokens"] == prompt


def test_beta_true_is_the_same_endpoint(server):
    status, msg = post(server, ask(max_tokens=4), "/v1/messages?beta=true")
    assert status == 200, msg
    assert msg["type"] == "message"
    built = check_grammar(stream(server, ask(max_tokens=4), "/v1/messages?beta=true"))
    assert built["stop_reason"] == "max_tokens"


def test_max_tokens_ends_with_stop_reason_max_tokens(server):
    status, msg = post(server, ask(max_tokens=3))
    assert status == 200
    assert msg["stop_reason"] == "max_tokens"
    assert msg["usage"]["output_tokens"] == 3


def test_a_stop_sequence_ends_with_stop_reason_stop_sequence_naming_it(server):
    _status, free = post(server, ask())
    text = free["content"][0]["text"]
    word = text.split()[2]  # a word the greedy answer is known to hold
    status, msg = post(server, ask(stop_sequences=["no such text", word]))
    assert status == 200
    assert msg["stop_reason"] == "stop_sequence"
    assert msg["stop_sequence"] == word
    assert msg["content"][0]["text"] == text[: text.index(word)]
    built = check_grammar(stream(server, ask(stop_sequences=[word])))
    assert (built["stop_reason"], built["stop_sequence"]) == ("stop_sequence", word)


# -- tools -------------------------------------------------------------------------------


def test_a_forced_tool_use_then_its_result_answered_in_text(server):
    asked = ask(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=60,
    )
    status, msg = post(server, asked)
    assert status == 200, msg
    assert msg["stop_reason"] == "tool_use"
    calls = [b for b in msg["content"] if b["type"] == "tool_use"]
    assert len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("toolu_")
    assert call["name"] == "get_weather"
    assert call["input"]["city"] in ("Paris", "Rome", "Oslo")  # held to the input_schema

    # streamed, the call's input arrives as partial JSON that joins to the same object
    built = check_grammar(stream(server, asked))
    [streamed] = [b for b in built["content"] if b["type"] == "tool_use"]
    assert streamed["input"] == call["input"]
    assert streamed["id"].startswith("toolu_")
    assert built["stop_reason"] == "tool_use"

    result = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "Sunny, 24 degrees."}],
    }
    answered = ask(
        messages=[*asked["messages"], {"role": "assistant", "content": msg["content"]}, result],
        tools=[WEATHER],
        max_tokens=40,
    )
    status, reply = post(server, answered)
    assert status == 200, reply
    assert reply["stop_reason"] in ("end_turn", "max_tokens")
    assert [b["type"] for b in reply["content"]] == ["text"]
    assert reply["content"][0]["text"].strip()


def test_server_tools_are_ignored_never_shown_to_the_model(server):
    custom = ask(tools=[WEATHER])
    with_server_tools = ask(
        tools=[
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
            WEATHER,
            {"type": "bash_20250124", "name": "bash"},
        ]
    )
    counted = [
        post(
            server,
            {k: v for k, v in body.items() if k in ("model", "messages", "tools")},
            "/v1/messages/count_tokens",
        )
        for body in (custom, with_server_tools)
    ]
    assert counted[0][0] == 200
    assert counted[0] == counted[1]
    status, msg = post(server, with_server_tools)
    assert status == 200, msg


# -- count_tokens ------------------------------------------------------------------------


def test_count_tokens_is_the_prompt_a_real_call_reports(server):
    body = {
        "model": MODEL,
        "system": [{"type": "text", "text": "You are terse."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "document",
                        "title": "Notes",
                        "source": {"type": "text", "media_type": "text/plain", "data": "Paris is in France."},
                    },
                    {"type": "text", "text": "Where is Paris?"},
                ],
            }
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "auto"},
    }
    status, counted = post(server, body, "/v1/messages/count_tokens")
    assert status == 200, counted
    assert set(counted) == {"input_tokens"}
    status, msg = post(server, {**body, "max_tokens": 1})
    assert status == 200, msg
    assert counted["input_tokens"] == msg["usage"]["input_tokens"] + msg["usage"]["cache_read_input_tokens"]
    # the document is part of the prompt
    shorter = {**body, "messages": [{"role": "user", "content": "Where is Paris?"}]}
    assert post(server, shorter, "/v1/messages/count_tokens")[1]["input_tokens"] < counted["input_tokens"]


# -- thinking ----------------------------------------------------------------------------


def test_thinking_blocks_come_signed_and_go_back_verbatim_or_are_refused(server):
    body = {
        "model": THINKER,
        "max_tokens": 8,
        "temperature": 0,  # the random model's reasoning is the same each time
        "messages": [{"role": "user", "content": "Think."}],
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    }
    built = check_grammar(stream(server, body))
    # the template opens <think>: the first tokens are reasoning, a thinking block first
    assert built["content"][0]["type"] == "thinking"
    assert built["content"][0]["thinking"]
    status, msg = post(server, body)
    assert status == 200, msg
    thinking = msg["content"][0]
    assert thinking["type"] == "thinking"
    assert thinking["thinking"]
    assert thinking["signature"].startswith("allm1.")

    def follow_up(block: dict[str, Any]) -> dict[str, Any]:
        turns = [
            body["messages"][0],
            {"role": "assistant", "content": [block]},
            {"role": "user", "content": "Go on."},
        ]
        return {**body, "messages": turns}

    status, again = post(server, follow_up(thinking))
    assert status == 200, again
    status, error = post(server, follow_up({**thinking, "thinking": thinking["thinking"] + " (edited)"}))
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert "messages[1].content[0].thinking" in error["error"]["message"]
    forged = {**thinking, "signature": thinking["signature"][:-4] + "AAAA"}
    status, error = post(server, follow_up(forged))
    assert status == 400
    assert "messages[1].content[0].signature" in error["error"]["message"]
    status, _ = post(server, follow_up({"type": "redacted_thinking", "data": thinking["signature"]}))
    assert status == 200

    # display omitted: no thinking text, a signature that still carries it
    omitted = {**body, "thinking": {"type": "enabled", "budget_tokens": 2048, "display": "omitted"}}
    status, msg = post(server, omitted)
    assert status == 200
    assert msg["content"][0]["thinking"] == ""
    assert msg["content"][0]["signature"]
    assert post(server, follow_up(msg["content"][0]))[0] == 200
    built = check_grammar(stream(server, omitted))
    assert built["content"][0] == {
        "type": "thinking",
        "thinking": "",
        "signature": built["content"][0]["signature"],
    }

    # disabled: the model reasons all the same (it is counted), but no thinking block is shown
    status, msg = post(server, {**body, "thinking": {"type": "disabled"}})
    assert status == 200
    assert [b["type"] for b in msg["content"]] == ["text"]
    assert msg["usage"]["output_tokens"] == 8


def test_the_seal_key_is_made_once_private_in_the_data_directory(server, tmp):
    assert post(server, ask(max_tokens=1))[0] == 200  # every message request may seal
    key = tmp / "data" / "seal.key"
    assert len(key.read_bytes()) == 32
    assert key.stat().st_mode & 0o777 == 0o600


def test_a_model_that_does_not_reason_just_answers_when_asked_to_think(server):
    status, msg = post(server, ask(thinking={"type": "enabled", "budget_tokens": 1024}))
    assert status == 200, msg
    assert [b["type"] for b in msg["content"]] == ["text"]


# -- errors ------------------------------------------------------------------------------


def anthropic_error(body: Any, kind: str) -> str:
    assert body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    return str(body["error"]["message"])


def test_an_unknown_model_is_404_before_any_event(server):
    status, headers, raw = server.request("POST", "/v1/messages", ask(model="no-such-model", stream=True))
    assert status == 404
    assert headers["content-type"].startswith("application/json")
    anthropic_error(json.loads(raw), "not_found_error")


def test_a_prompt_longer_than_the_context_is_400_before_any_event(server):
    long = [{"role": "user", "content": "Paris is lovely. " * N_CTX}]
    status, headers, raw = server.request("POST", "/v1/messages", ask(messages=long, stream=True))
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    message = anthropic_error(json.loads(raw), "invalid_request_error")
    assert "context" in message


def test_an_image_block_is_refused_naming_it(server):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    status, body = post(
        server, ask(messages=[{"role": "user", "content": [{"type": "text", "text": "What?"}, image]}])
    )
    assert status == 400
    assert "messages[0].content[1]" in anthropic_error(body, "invalid_request_error")


def test_max_tokens_is_required(server):
    body = ask()
    del body["max_tokens"]
    status, error = post(server, body)
    assert status == 400
    assert "max_tokens" in anthropic_error(error, "invalid_request_error")


def test_a_forged_thinking_signature_is_refused(server):
    forged = {"type": "thinking", "thinking": "I reasoned.", "signature": "allm1.bm90LWEtc2VhbA"}
    turns = [*FRANCE, {"role": "assistant", "content": [forged, {"type": "text", "text": "Paris."}]}, *FRANCE]
    status, error = post(server, ask(messages=turns))
    assert status == 400
    assert "messages[1].content[0].signature" in anthropic_error(error, "invalid_request_error")


def test_an_api_key_in_x_api_key_is_accepted_and_a_wrong_one_refused(server):
    status, msg = post(server, ask(max_tokens=2), headers={"Authorization": "", "x-api-key": KEY})
    assert status == 200, msg
    status, error = post(server, ask(max_tokens=2), headers={"Authorization": "", "x-api-key": "sk-wrong"})
    assert status == 401
    anthropic_error(error, "authentication_error")


# -- waiting -----------------------------------------------------------------------------


def test_a_stream_waiting_for_its_first_token_is_kept_alive_with_pings(server):
    """With one slot busy, a stream waits in the queue: it opens with message_start, then pings."""
    blocker = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    waiting = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    try:
        long_answer = {
            "model": MODEL,
            "messages": FRANCE,
            "max_tokens": N_CTX - 64,
            "logit_bias": NEVER_ENDS,
            "stream": True,
        }
        blocker.request("POST", "/v1/chat/completions", json.dumps(long_answer), headers)
        running = blocker.getresponse()
        assert running.status == 200
        assert running.readline().startswith(b"data: ")  # it holds the slot, generating
        waiting.request("POST", "/v1/messages", json.dumps(ask(max_tokens=4, stream=True)), headers)
        answer = waiting.getresponse()
        assert answer.status == 200
        lines = [answer.readline() for _ in range(6)]
        names = [line.decode().strip().removeprefix("event: ") for line in lines if line.startswith(b"event")]
        assert names == ["message_start", "ping"], lines
        blocker.close()  # the slot frees: the waiting stream goes on to its answer
        rest = b"".join(lines) + answer.read()
    finally:
        blocker.close()
        waiting.close()
    events = [payload for _name, payload in parse_events(rest)]
    assert events[0]["message"]["usage"]["input_tokens"] == 0  # not known yet when it opened
    built = check_grammar(events)
    assert built["stop_reason"] == "max_tokens"
    assert built["usage"]["input_tokens"] + built["usage"]["cache_read_input_tokens"] > 10


def test_an_error_after_the_stream_began_is_one_error_event_then_service_resumes(server):
    [before] = server.managers()
    body = ask(
        messages=[{"role": "user", "content": "Write a very long essay."}], max_tokens=2000, stream=True
    )
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        conn.request("POST", "/v1/messages", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
        answer = conn.getresponse()
        assert answer.status == 200
        deltas = 0
        while deltas < 5:
            line = answer.readline()
            assert line, "the stream ended before the manager was killed"
            deltas += line == b"event: content_block_delta\n"
        os.kill(before["pid"], signal.SIGKILL)
        rest = answer.read()
    finally:
        conn.close()
    last = rest.decode().rstrip("\n").split("\n\n")[-1]
    assert last.startswith("event: error\ndata: ")
    error = json.loads(last.split("\n")[1].removeprefix("data: "))
    assert "SIGKILL" in anthropic_error(error, "api_error")
    assert b"message_stop" not in rest
    status, msg = post(server, ask())  # the restarted manager serves the next request
    assert status == 200, msg
    [after] = server.managers()
    assert after["restarts"] == before["restarts"] + 1
