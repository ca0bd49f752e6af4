"""The OpenAI Agents SDK, LangChain's ChatOpenAI and instructor against `allm serve`, used as their users do.

SmolLM2-135M is tiny, so every request is greedy (temperature 0, a seed where the API takes one)
and the agents force their first turn's tool call (`tool_choice="required"`, which the Agents SDK
turns back to `auto` once the tool has run). Everything after that is the server's to get right:
exactly one call with valid arguments, the tool's result taken in, and a plain-text answer.
"""

from __future__ import annotations

import functools
import json
import operator
import socket
from collections.abc import AsyncIterator

import instructor
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    RunResult,
    RunResultStreaming,
    function_tool,
    set_tracing_disabled,
)
from agents.items import ToolCallItem, ToolCallOutputItem
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field

set_tracing_disabled(True)

MODEL = "smollm2-135m-instruct"
#: a short answer fits with room to spare; a runaway one ends the test in seconds, not minutes
MAX_TOKENS = 200
WEATHER_QUESTION = "What is the weather in Paris?"
# SmolLM2-135M at temperature 0 runs on inside the "country" string (never closing it) when
# asked to "give the city and its country"; asked to extract, it closes it. The grammar keeps
# the JSON valid either way: what a 135M model writes inside a string is its own.
CITY_TEXT = "Paris is the capital of France. Extract the city."
APIS = pytest.mark.parametrize("responses_api", [False, True], ids=["chat", "responses"])


class City(BaseModel):
    """A city and the country it lies in."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country the city is in")


def weather_report(city: str) -> str:
    return f"Sunny and 22 degrees Celsius in {city}."


def assert_plain_text_answer(text: object) -> None:
    """A final answer in words: not empty, and not the JSON of a tool-call scheme."""
    assert isinstance(text, str), text
    assert text.strip(), "empty answer"
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    assert not isinstance(parsed, dict | list), f"the answer is JSON, not text: {text!r}"
    for marker in ('"tool_calls"', '"response"', "<tool_call>"):
        assert marker not in text, f"the answer carries the call scheme ({marker}): {text!r}"


def assert_paris(city: object) -> None:
    assert isinstance(city, str), city
    assert "paris" in city.lower(), city


# -- OpenAI Agents SDK -------------------------------------------------------------


@pytest.fixture
async def async_client(base_url) -> AsyncIterator[AsyncOpenAI]:
    # one per test: an AsyncOpenAI client's connections belong to the event loop that made them
    client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
    yield client
    await client.close()


def weather_agent(client: AsyncOpenAI, api: str, calls: list[str]) -> Agent:
    @function_tool
    def get_weather(city: str) -> str:
        """Current weather of a city."""
        calls.append(city)
        return weather_report(city)

    model_class = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    return Agent(
        name="weather",
        instructions="You answer questions about the weather. Use the get_weather tool.",
        model=model_class(model=MODEL, openai_client=client),
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=MAX_TOKENS),
    )


def assert_one_call_then_text(result: RunResult | RunResultStreaming, calls: list[str]) -> None:
    assert len(calls) == 1, f"the tool ran {len(calls)} times: {calls}"
    assert_paris(calls[0])
    kinds = [type(item).__name__ for item in result.new_items]
    assert sum(isinstance(i, ToolCallItem) for i in result.new_items) == 1, kinds
    assert sum(isinstance(i, ToolCallOutputItem) for i in result.new_items) == 1, kinds
    # two model turns: the call, then the answer that read the tool's result
    assert len(result.raw_responses) == 2, kinds
    assert_plain_text_answer(result.final_output)
    answer = result.final_output.lower()
    assert "sunny" in answer or "22" in answer, (
        f"the answer ignores the tool's result: {result.final_output!r}"
    )


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_agents_sdk_agent_calls_its_tool_once_and_answers_in_text(async_client, api):
    calls: list[str] = []
    # max_turns=4: a model made to call again and again fails in seconds with MaxTurnsExceeded
    result = await Runner.run(weather_agent(async_client, api, calls), WEATHER_QUESTION, max_turns=4)
    assert_one_call_then_text(result, calls)


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_agents_sdk_streamed_agent_calls_its_tool_once_and_answers_in_text(async_client, api):
    calls: list[str] = []
    result = Runner.run_streamed(weather_agent(async_client, api, calls), WEATHER_QUESTION, max_turns=4)
    item_events = []
    text_deltas = []
    async for event in result.stream_events():
        if event.type == "run_item_stream_event":
            item_events.append(event.name)
        elif event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            text_deltas.append(event.data.delta)
    assert result.is_complete
    assert_one_call_then_text(result, calls)
    assert item_events == ["tool_called", "tool_output", "message_output_created"], item_events
    assert "".join(text_deltas) == result.final_output


# -- LangChain ---------------------------------------------------------------------


@tool
def get_weather(city: str) -> str:
    """Current weather of a city."""
    return weather_report(city)


def chat_openai(base_url: str, responses_api: bool) -> ChatOpenAI:
    # the Responses API has no seed; greedy decoding makes it moot there anyway
    seed = {} if responses_api else {"seed": 0}
    return ChatOpenAI(
        base_url=base_url,
        api_key="x",
        model=MODEL,
        use_responses_api=responses_api,
        temperature=0,
        max_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=120,
        **seed,
    )


@APIS
def test_langchain_invoke_answers_in_text(base_url, responses_api):
    reply = chat_openai(base_url, responses_api).invoke(
        "What is the capital of France? Answer in one sentence."
    )
    assert_plain_text_answer(reply.text)
    assert "paris" in reply.text.lower(), reply.text


@APIS
def test_langchain_stream_yields_the_answer_in_pieces(base_url, responses_api):
    chunks = list(
        chat_openai(base_url, responses_api).stream("What is the capital of France? Answer in one sentence.")
    )
    pieces = [c.text for c in chunks if c.text]
    assert len(pieces) > 1, pieces
    text = "".join(pieces)
    assert_plain_text_answer(text)
    assert "paris" in text.lower(), text


@APIS
@pytest.mark.parametrize("tool_choice", ["required", "get_weather"])
def test_langchain_bind_tools_makes_exactly_one_call(base_url, responses_api, tool_choice):
    llm = chat_openai(base_url, responses_api).bind_tools([get_weather], tool_choice=tool_choice)
    reply = llm.invoke(WEATHER_QUESTION)
    assert not reply.invalid_tool_calls, reply.invalid_tool_calls
    assert len(reply.tool_calls) == 1, f"{len(reply.tool_calls)} calls: {reply.tool_calls}"
    [call] = reply.tool_calls
    assert call["name"] == "get_weather"
    assert set(call["args"]) == {"city"}, call["args"]
    assert_paris(call["args"]["city"])


@APIS
def test_langchain_streamed_bind_tools_makes_exactly_one_call(base_url, responses_api):
    llm = chat_openai(base_url, responses_api).bind_tools([get_weather], tool_choice="required")
    reply = functools.reduce(operator.add, llm.stream(WEATHER_QUESTION))
    assert not reply.invalid_tool_calls, reply.invalid_tool_calls
    assert len(reply.tool_calls) == 1, f"{len(reply.tool_calls)} calls: {reply.tool_calls}"
    [call] = reply.tool_calls
    assert call["name"] == "get_weather"
    assert_paris(call["args"].get("city"))


@APIS
def test_langchain_tool_result_leads_to_a_text_answer(base_url, responses_api):
    llm = chat_openai(base_url, responses_api)
    history = [HumanMessage(WEATHER_QUESTION)]
    call_reply = llm.bind_tools([get_weather], tool_choice="required").invoke(history)
    [call] = call_reply.tool_calls
    history += [call_reply, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    # the second turn offers the tool again, as an agent loop does, under the default `auto`
    answer = llm.bind_tools([get_weather]).invoke(history)
    assert isinstance(answer, AIMessage)
    assert not answer.tool_calls, f"called again after the result: {answer.tool_calls}"
    assert_plain_text_answer(answer.text)


@APIS
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_is_a_valid_instance(base_url, responses_api, method):
    llm = chat_openai(base_url, responses_api).with_structured_output(City, method=method)
    city = llm.invoke(CITY_TEXT)
    assert isinstance(city, City), city
    assert_paris(city.name)


# -- instructor --------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA, instructor.Mode.RESPONSES_TOOLS], ids=str
)
def test_instructor_returns_a_valid_instance(base_url, mode):
    openai_client = OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)
    client = instructor.from_openai(openai_client, mode=mode)
    limits = (
        {"max_output_tokens": MAX_TOKENS}
        if mode is instructor.Mode.RESPONSES_TOOLS
        else {"max_tokens": MAX_TOKENS, "seed": 0}
    )
    # max_retries=0: instructor's re-asking would hide a first answer that does not parse
    with openai_client:
        city = client.create(
            model=MODEL,
            response_model=City,
            max_retries=0,
            temperature=0,
            messages=[{"role": "user", "content": CITY_TEXT}],
            **limits,
        )
    assert isinstance(city, City), city
    assert_paris(city.name)


def test_nothing_here_reaches_beyond_this_machine():
    # the guard in conftest.py that keeps tokenizer downloads, tracing and telemetry from leaving
    with pytest.raises(OSError, match="tried to reach"):
        socket.getaddrinfo("pypi.org", 443)
