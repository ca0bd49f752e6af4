"""The official `anthropic` and `ollama` Python libraries against `allm serve`, as their users call them.

The libraries parse what allm sends into their own types and raise their own exceptions, so a field
in the wrong place, an event out of order or a wrong status fails here as a user would meet it.
SmolLM2-135M is tiny: every request is greedy (temperature 0) and short, and its words are not
judged. Anthropic's tool use is forced with `tool_choice`; Ollama has no such field, so its history
shows one call and answer first, which leads SmolLM2 to call the tool again for the next city.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import anthropic
import ollama
import pytest
from anthropic.types import Message, MessageTokensCount, TextBlock, ToolUseBlock

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 48
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "the city's name"}},
    "required": ["city"],
}
#: a chain of calls (the call, then the answer that reads its result) runs several generations
CHAIN_TIMEOUT_S = 600


def weather_report(city: str) -> str:
    return f"Sunny and 22 degrees Celsius in {city}."


# -- anthropic ---------------------------------------------------------------------

RAW_EVENTS = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    }
)
DELTAS = {
    "text": {"text_delta"},
    "tool_use": {"input_json_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
}
ANTHROPIC_WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": WEATHER_SCHEMA,
}
FORCED = {"type": "tool", "name": "get_weather"}
#: anthropic 2.x's methods take no sampling arguments any more (newer Claude models fix them); the
#: Messages API still has `temperature`, and a user of this SDK sends it as the SDK says, in extra_body
SAMPLE_GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def claude(server) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(
        base_url=server.base_url, api_key="unused", max_retries=0, timeout=120
    ) as client:
        yield client


def closed(block: dict[str, Any], deltas: list[Any]) -> dict[str, Any]:
    """A content block as its deltas completed it."""
    if block["type"] == "text":
        return {**block, "text": "".join(d.text for d in deltas)}
    if block["type"] == "tool_use":
        return {**block, "input": json.loads("".join(d.partial_json for d in deltas) or "{}")}
    thinking = "".join(d.thinking for d in deltas if d.type == "thinking_delta")
    signatures = [d.signature for d in deltas if d.type == "signature_delta"]
    return {
        **block,
        "thinking": thinking,
        "signature": signatures[-1] if signatures else block.get("signature"),
    }


def check_message_events(events: list[Any]) -> list[dict[str, Any]]:
    """Assert Anthropic's stream grammar over the SDK's events; the content blocks they built.

    message_start, then each block whole (start, its own kind of deltas, stop, indices in order,
    never two open at once), then message_delta (the stop reason, usage) and message_stop. The
    helper's own events (text, input_json, thinking, signature) ride between them and are skipped.
    """
    raw = [e for e in events if e.type in RAW_EVENTS]
    kinds = [e.type for e in raw]
    assert kinds[0] == "message_start", kinds[:3]
    assert kinds[-2:] == ["message_delta", "message_stop"], kinds[-3:]
    start = raw[0].message
    assert (start.type, start.role, start.model) == ("message", "assistant", MODEL), start
    assert (start.content, start.stop_reason) == ([], None), start
    blocks: list[dict[str, Any]] = []
    open_block: dict[str, Any] | None = None
    deltas: list[Any] = []
    for e in raw[1:-2]:
        if e.type == "content_block_start":
            assert open_block is None, f"block {e.index} began before block {len(blocks) - 1} stopped"
            assert e.index == len(blocks), e
            open_block, deltas = e.content_block.model_dump(), []
            if open_block["type"] == "text":
                assert open_block["text"] == "", e
            elif open_block["type"] == "tool_use":
                assert open_block["input"] == {}, e
                assert open_block["id"], e
                assert open_block["name"], e
        elif e.type == "content_block_delta":
            assert open_block is not None, f"a delta outside any block: {e}"
            assert e.index == len(blocks), f"a delta outside its block: {e}"
            assert e.delta.type in DELTAS[open_block["type"]], e
            deltas.append(e.delta)
        else:
            assert e.type == "content_block_stop", f"{e.type} between message_start and message_delta"
            assert open_block is not None, f"a stop outside any block: {e}"
            assert e.index == len(blocks), e
            blocks.append(closed(open_block, deltas))
            open_block = None
    assert open_block is None, "the message ended inside a block"
    end = raw[-2]
    assert end.delta.stop_reason is not None, end
    assert end.usage.output_tokens > 0, end
    return blocks


def same_content(built: list[dict[str, Any]], message: Message) -> None:
    def essence(block: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(block.get(k) for k in ("type", "text", "id", "name", "input", "thinking"))

    assert [essence(b) for b in built] == [essence(b.model_dump()) for b in message.content], (built, message)


def test_anthropic_create_answers_a_message_whose_usage_count_tokens_agrees_with(claude):
    msg = claude.messages.create(
        model=MODEL,
        max_tokens=MAX_TOKENS,
        extra_body=SAMPLE_GREEDY,
        system="You are brief.",
        messages=QUESTION,
    )
    assert isinstance(msg, Message), msg
    assert (msg.type, msg.role, msg.model) == ("message", "assistant", MODEL), msg
    [block] = msg.content
    assert isinstance(block, TextBlock), msg
    assert block.text.strip(), msg
    assert msg.stop_reason in ("end_turn", "max_tokens"), msg
    assert msg.usage.input_tokens > 0, msg.usage
    assert 0 < msg.usage.output_tokens <= MAX_TOKENS, msg.usage
    counted = claude.messages.count_tokens(model=MODEL, system="You are brief.", messages=QUESTION)
    assert isinstance(counted, MessageTokensCount), counted
    assert counted.input_tokens == msg.usage.input_tokens, (counted, msg.usage)


def test_anthropic_stream_helper_sees_the_event_grammar_and_builds_the_final_message(claude):
    with claude.messages.stream(
        model=MODEL, max_tokens=MAX_TOKENS, extra_body=SAMPLE_GREEDY, messages=QUESTION
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    built = check_message_events(events)
    same_content(built, final)
    assert [b["type"] for b in built] == ["text"], built
    assert "".join(e.text for e in events if e.type == "text") == final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens"), final
    assert final.usage.input_tokens > 0, final.usage
    assert final.usage.output_tokens > 0, final.usage


@pytest.mark.timeout(CHAIN_TIMEOUT_S)
def test_anthropic_forced_tool_use_then_its_result_answered_in_text(claude):
    asked: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 100,
        "extra_body": SAMPLE_GREEDY,
        "messages": WEATHER_QUESTION,
        "tools": [ANTHROPIC_WEATHER],
    }
    msg = claude.messages.create(**asked, tool_choice=FORCED)
    assert msg.stop_reason == "tool_use", msg
    [call] = [b for b in msg.content if isinstance(b, ToolUseBlock)]
    assert call.name == "get_weather", call
    assert call.id, call
    assert isinstance(call.input, dict), call.input
    assert set(call.input) == {"city"}, call.input
    city = call.input["city"]
    assert isinstance(city, str), call.input
    assert city.strip(), call.input

    # streamed, raw (`create(stream=True)`): the input comes as partial JSON that joins to the object
    events = list(claude.messages.create(**asked, tool_choice=FORCED, stream=True))
    built = check_message_events(events)
    [streamed] = [b for b in built if b["type"] == "tool_use"]
    assert (streamed["name"], streamed["input"]) == ("get_weather", call.input), streamed
    assert events[-2].delta.stop_reason == "tool_use", events[-2]

    result = {"type": "tool_result", "tool_use_id": call.id, "content": weather_report(city)}
    turns = [
        *WEATHER_QUESTION,
        {"role": "assistant", "content": msg.content},
        {"role": "user", "content": [result]},
    ]
    reply = claude.messages.create(**{**asked, "messages": turns, "max_tokens": MAX_TOKENS})
    assert reply.stop_reason in ("end_turn", "max_tokens"), reply
    assert [b.type for b in reply.content] == ["text"], reply.content
    assert reply.content[0].text.strip(), reply


def test_anthropic_unknown_model_is_its_not_found_error_streamed_or_not(claude):
    with pytest.raises(anthropic.NotFoundError) as caught:
        claude.messages.create(model="no-such-model", max_tokens=8, messages=QUESTION)
    assert caught.value.status_code == 404
    assert caught.value.body["type"] == "error", caught.value.body
    assert caught.value.body["error"]["type"] == "not_found_error", caught.value.body
    # streamed, the error comes before any event, so the helper raises it on opening the stream
    with (
        pytest.raises(anthropic.NotFoundError),
        claude.messages.stream(model="no-such-model", max_tokens=8, messages=QUESTION) as stream,
    ):
        stream.get_final_message()


def test_anthropic_a_bad_request_is_its_bad_request_error(claude):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=8, messages=[])
    assert caught.value.status_code == 400
    assert caught.value.body["error"]["type"] == "invalid_request_error", caught.value.body
    assert "messages" in caught.value.body["error"]["message"], caught.value.body


# -- ollama ------------------------------------------------------------------------

GREEDY = {"temperature": 0, "seed": 0, "num_predict": MAX_TOKENS}
OLLAMA_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": WEATHER_SCHEMA,
    },
}
#: a call and its answer, in Ollama's own shapes (arguments an object, the tool named, no ids)
SHOWN_HOW = [
    {"role": "system", "content": "You answer questions about the weather. Use the get_weather tool."},
    {"role": "user", "content": "What is the weather in London?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "London"}}}],
    },
    {"role": "tool", "tool_name": "get_weather", "content": "Rain and 12 degrees Celsius in London."},
    {"role": "assistant", "content": "It is raining in London, at 12 degrees Celsius."},
    *WEATHER_QUESTION,
]


@pytest.fixture(scope="module")
def olla(server) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.base_url, timeout=120) as client:
        yield client


def check_parts(parts: list[Any], text: str) -> str:
    """Ollama's NDJSON stream as the library parsed it: pieces, then one last part with the counts.

    `text` names where the pieces are (`response` for generate, `message` for chat); their join.
    """
    *pieces, last = parts
    for part in parts:
        assert part.model == MODEL, part
        assert part.created_at, part
    for part in pieces:
        assert (part.done, part.done_reason) == (False, None), part
        if text == "message":
            assert part.message.role == "assistant", part
    assert last.done is True, last
    assert last.done_reason in ("stop", "length"), last
    assert last.prompt_eval_count > 0, last
    assert last.eval_count > 0, last
    assert last.total_duration > 0, last
    assert last.eval_duration > 0, last
    return "".join((p.message.content or "") if text == "message" else p.response for p in parts)


def check_done(reply: ollama.ChatResponse | ollama.GenerateResponse) -> None:
    assert reply.model == MODEL, reply
    assert reply.created_at, reply
    assert reply.done is True, reply
    assert reply.done_reason in ("stop", "length"), reply
    assert reply.prompt_eval_count > 0, reply
    assert 0 < reply.eval_count <= MAX_TOKENS, reply
    assert reply.total_duration > 0, reply


def test_ollama_chat_answers_whole_and_streamed(olla):
    reply = olla.chat(model=MODEL, messages=QUESTION, options=GREEDY)
    assert isinstance(reply, ollama.ChatResponse), reply
    check_done(reply)
    assert reply.message.role == "assistant", reply
    assert reply.message.content.strip(), reply
    assert not reply.message.tool_calls, reply

    parts = list(olla.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=True))
    assert all(isinstance(p, ollama.ChatResponse) for p in parts), parts
    assert len(parts) > 2, parts
    assert check_parts(parts, "message").strip(), parts


def test_ollama_generate_answers_whole_and_streamed(olla):
    prompt = QUESTION[0]["content"]
    reply = olla.generate(model=MODEL, prompt=prompt, options=GREEDY)
    assert isinstance(reply, ollama.GenerateResponse), reply
    check_done(reply)
    assert reply.response.strip(), reply

    parts = list(olla.generate(model=MODEL, prompt=prompt, options=GREEDY, stream=True))
    assert all(isinstance(p, ollama.GenerateResponse) for p in parts), parts
    assert len(parts) > 2, parts
    assert check_parts(parts, "response").strip(), parts


def test_ollama_list_show_and_ps_describe_the_model(olla):
    listed = olla.list()
    assert isinstance(listed, ollama.ListResponse), listed
    [entry] = [m for m in listed.models if m.model == f"{MODEL}:latest"]
    assert entry.size, entry
    assert entry.details.format == "gguf", entry

    shown = olla.show(MODEL)
    assert isinstance(shown, ollama.ShowResponse), shown
    assert shown.details.format == "gguf", shown.details
    assert "completion" in shown.capabilities, shown.capabilities
    assert shown.modelinfo, shown

    olla.generate(model=MODEL, prompt="Hi", options={**GREEDY, "num_predict": 1})
    running = olla.ps()
    assert isinstance(running, ollama.ProcessResponse), running
    [loaded] = [m for m in running.models if m.model == f"{MODEL}:latest"]
    assert loaded.size, loaded
    assert loaded.expires_at, loaded


def test_ollama_embed_gives_one_vector_per_input(olla):
    reply = olla.embed(model=MODEL, input=["Paris is in France.", "Rome is in Italy."])
    assert isinstance(reply, ollama.EmbedResponse), reply
    assert len(reply.embeddings) == 2, reply
    first, second = reply.embeddings
    assert len(first) == len(second) > 0, (len(first), len(second))
    assert first != second


@pytest.mark.timeout(CHAIN_TIMEOUT_S)
def test_ollama_tool_call_then_its_result_answered_in_text(olla):
    first = olla.chat(model=MODEL, messages=SHOWN_HOW, tools=[OLLAMA_WEATHER], options=GREEDY)
    assert first.done_reason == "stop", first
    calls = first.message.tool_calls or []
    assert len(calls) == 1, first.message
    [call] = calls
    assert call.function.name == "get_weather", call
    assert isinstance(call.function.arguments, Mapping), call
    assert set(call.function.arguments) == {"city"}, call
    city = call.function.arguments["city"]
    assert isinstance(city, str), call
    assert city.strip(), call

    # streamed: the call comes whole, in one part
    parts = list(
        olla.chat(model=MODEL, messages=SHOWN_HOW, tools=[OLLAMA_WEATHER], options=GREEDY, stream=True)
    )
    check_parts(parts, "message")
    streamed = [
        (c.function.name, dict(c.function.arguments)) for p in parts for c in p.message.tool_calls or []
    ]
    assert streamed == [("get_weather", dict(call.function.arguments))], parts

    turns = [
        *SHOWN_HOW,
        first.message,
        {"role": "tool", "tool_name": "get_weather", "content": weather_report(city)},
    ]
    reply = olla.chat(model=MODEL, messages=turns, tools=[OLLAMA_WEATHER], options=GREEDY)
    assert reply.message.content.strip(), reply
    assert not reply.message.tool_calls, f"called again after the result: {reply.message.tool_calls}"


def test_ollama_unknown_model_is_its_response_error_404_streamed_or_not(olla):
    with pytest.raises(ollama.ResponseError) as caught:
        olla.chat(model="no-such-model", messages=QUESTION)
    assert caught.value.status_code == 404
    assert "no-such-model" in caught.value.error, caught.value.error
    with pytest.raises(ollama.ResponseError) as streamed:
        list(olla.chat(model="no-such-model", messages=QUESTION, stream=True))
    assert streamed.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as shown:
        olla.show("no-such-model")
    assert shown.value.status_code == 404
