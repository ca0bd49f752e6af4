"""What Codex CLI needs of the Responses API, against `allm serve` on SmolLM2 with the openai SDK.

A request shaped like Codex's first one (function tools, a namespace, the custom
apply_patch tool with its Lark grammar, web search, encrypted reasoning with store
false, a prompt cache key, client metadata) answers 200 and streams in OpenAI's
grammar; a forced custom call's input follows its regex or Lark grammar and streams
as custom_tool_call_input events; a namespaced call carries its namespace and its
output continues the turn; sealed reasoning goes out and comes back, a forged one
is refused; forcing a tool only OpenAI runs is a 400; and a stream whose prompt the
model cannot hold is a 400 before any event, on Responses and Chat Completions alike.
"""

from __future__ import annotations

import json
import re

import openai
import pytest

from tests.codex_tools import APPLY_PATCH
from tests.event_grammar import check_response_events, plain
from tests.model_files import smollm2_path, write_tiny_llama_gguf

from .gateway_server import running_server

MODEL = "smollm2"
THINKER = "thinker"  # random weights under an R1-style template: every reply begins with reasoning
SHELL = {
    "type": "function",
    "name": "exec_command",
    "description": "Runs a command in a PTY, returning output or a session ID for ongoing interaction.",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {
            "cmd": {"type": "string", "description": "Shell command to execute."},
            "workdir": {"type": "string"},
            "yield_time_ms": {"type": "number"},
            "tty": {"type": "boolean"},
        },
        "required": ["cmd"],
        "additionalProperties": False,
    },
}
PLAN = {
    "type": "function",
    "name": "update_plan",
    "description": "Updates the task plan.",
    "strict": False,
    "parameters": {
        "type": "object",
        "properties": {
            "explanation": {"type": "string"},
            "plan": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"status": {"type": "string"}, "step": {"type": "string"}},
                    "required": ["step", "status"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["plan"],
        "additionalProperties": False,
    },
}
CRM = {
    "type": "namespace",
    "name": "crm",
    "description": "Tools in the crm namespace.",
    "tools": [
        {
            "type": "function",
            "name": "lookup",
            "description": "Look a customer up by name.",
            "strict": False,
            "defer_loading": True,
            "parameters": {
                "type": "object",
                "properties": {"customer": {"type": "string"}},
                "required": ["customer"],
                "additionalProperties": False,
            },
        }
    ],
}
APPLY_PATCH_TOOL = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Use the `apply_patch` tool to edit files. "
    "This is a FREEFORM tool, so do not wrap the patch in JSON.",
    "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH},
}
WEB_SEARCH = {"type": "web_search", "external_web_access": False, "search_content_types": ["text", "image"]}
#: a small command language, as a regex and as Lark, and what either means as a Python regex
RUN_REGEX = r"(ls|pwd|cat [a-z]{1,8}\.txt)"
CD_LARK = 'start: "cd " DIR ("/" DIR)~0..2 LF?\nDIR: /[a-z]{1,8}/\n%import common.LF\n'
CD_PYTHON = r"cd [a-z]{1,8}(/[a-z]{1,8}){0,2}\n?"


def codex_body(**more) -> dict:
    """A request as Codex's first one is shaped (its instructions and context cut short)."""
    return {
        "model": MODEL,
        "instructions": "You are Codex, a coding agent. You and the user share the same workspace.",
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text",
                             "text": "<permissions instructions>sandbox</permissions instructions>"}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text",
                     "text": "<environment_context>\n  <cwd>/work/demo</cwd>\n</environment_context>"},
                    {"type": "input_text", "text": "List the files here."},
                ],
            },
        ],
        "tools": [SHELL, PLAN, CRM, APPLY_PATCH_TOOL, WEB_SEARCH],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "reasoning": {"effort": "medium", "summary": "auto"},
        "store": False,
        "stream": True,
        "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": "019d27fa-d92f-7e91-a4f1-5b910be3713a",
        "text": {"verbosity": "low"},
        "client_metadata": {
            "x-codex-turn-metadata": json.dumps({"turn_id": "019d27fb", "sandbox": "seatbelt"})
        },
        "max_output_tokens": 16,  # not Codex's: it keeps the test short on two cores
        "temperature": 0,
        **more,
    }  # fmt: skip


def _config(tmp) -> str:
    thinker = write_tiny_llama_gguf(tmp / "thinker.gguf", "qwen-think")
    return f"""
[server]
data_dir = "{tmp / "data"}"

[[models]]
id = "{MODEL}"
path = "{smollm2_path()}"

[[models]]
id = "{THINKER}"
path = "{thinker}"
options = {{ n_ctx = 2048 }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("codex")
    with running_server(_config(tmp), tmp) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=120)


def sse_events(data: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: ")]


def test_a_request_shaped_like_codexs_first_streams_in_order(server):
    status, headers, data = server.request("POST", "/v1/responses", codex_body())
    assert status == 200, data[:500]
    assert headers["content-type"].startswith("text/event-stream")
    events = sse_events(data)
    items = check_response_events(events)
    final = events[-1]["response"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete"), events[-1]
    assert final["store"] is False
    assert final["prompt_cache_key"] == "019d27fa-d92f-7e91-a4f1-5b910be3713a"
    # the tools are echoed as sent; web search was not shown to the model, and noted as ignored
    assert [tool["type"] for tool in final["tools"]] == [
        "function",
        "function",
        "namespace",
        "custom",
        "web_search",
    ]
    assert final["tools"][3]["format"]["definition"] == APPLY_PATCH
    assert all(item["type"] != "web_search_call" for item in items)
    metrics = server.request("GET", "/metrics")[2].decode()
    assert re.search(r'allm_ignored_fields_total\{[^}]*field="tools\[\]"[^}]*\} [1-9]', metrics), [
        line for line in metrics.splitlines() if "ignored" in line
    ]


def test_the_same_conversation_goes_to_the_instance_that_holds_its_prefix(server):
    """With one instance, a prompt cache key changes nothing but must not fail; its second use is cached."""
    body = codex_body(stream=False, max_output_tokens=4)
    first = server.json("POST", "/v1/responses", body)
    second = server.json("POST", "/v1/responses", body)
    assert (first[0], second[0]) == (200, 200), (first, second)
    assert second[1]["usage"]["input_tokens_details"]["cached_tokens"] > 0


@pytest.mark.parametrize(
    ("syntax", "definition", "python"),
    [("regex", RUN_REGEX, RUN_REGEX), ("lark", CD_LARK, CD_PYTHON)],
)
def test_a_forced_custom_call_follows_its_grammar_and_streams_its_input(sdk, syntax, definition, python):
    tool = {"type": "custom", "name": "run", "description": "Run one command.",
            "format": {"type": "grammar", "syntax": syntax, "definition": definition}}  # fmt: skip
    stream = sdk.responses.create(
        model=MODEL,
        input="Show me the files.",
        tools=[tool, SHELL, WEB_SEARCH],
        tool_choice={"type": "custom", "name": "run"},
        parallel_tool_calls=False,
        max_output_tokens=60,
        stream=True,
    )
    events = [plain(event) for event in stream]
    items = check_response_events(events)
    [call] = items
    assert call["type"] == "custom_tool_call"
    assert call["name"] == "run"
    assert re.fullmatch(python, call["input"]), call["input"]
    deltas = [e["delta"] for e in events if e["type"] == "response.custom_tool_call_input.delta"]
    [done] = [e for e in events if e["type"] == "response.custom_tool_call_input.done"]
    assert "".join(deltas) == done["input"] == call["input"]
    assert events[-1]["response"]["output"] == items

    # the same without stream, and the call's output continues the turn
    response = sdk.responses.create(
        model=MODEL,
        input="Show me the files.",
        tools=[tool],
        tool_choice={"type": "custom", "name": "run"},
        parallel_tool_calls=False,
        max_output_tokens=60,
        store=False,
    )
    calls = [item for item in response.output if item.type == "custom_tool_call"]
    assert calls
    assert all(re.fullmatch(python, call.input) for call in calls), calls
    call = calls[0]
    follow = sdk.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "Show me the files."},
            {"type": "custom_tool_call", "call_id": call.call_id, "name": "run", "input": call.input},
            {"type": "custom_tool_call_output", "call_id": call.call_id, "output": "a.txt b.txt"},
        ],
        tools=[tool],
        max_output_tokens=8,
        store=False,
    )
    assert follow.status in ("completed", "incomplete")
    assert follow.usage.input_tokens > response.usage.input_tokens


def test_a_namespaced_call_carries_its_namespace_and_its_output_continues(sdk):
    # greedy, with room: a sampled name can run past a tight budget and cut the arguments short
    asked = {
        "model": MODEL,
        "tools": [CRM, WEB_SEARCH],
        "max_output_tokens": 64,
        "store": False,
        "temperature": 0,
    }
    response = sdk.responses.create(
        **asked, input="Who is the customer Ada?", tool_choice={"type": "function", "name": "lookup"}
    )
    assert response.status == "completed"
    [call] = [item for item in response.output if item.type == "function_call"]
    assert (call.name, call.namespace) == ("lookup", "crm")
    assert "customer" in json.loads(call.arguments)
    result = "Ada Lovelace, a customer since 1843, who wrote the first program."
    follow = sdk.responses.create(
        **{**asked, "max_output_tokens": 8, "tool_choice": "auto"},
        input=[
            {"role": "user", "content": "Who is the customer Ada?"},
            {"type": "function_call", "call_id": call.call_id, "name": "lookup", "namespace": "crm",
             "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": result},
        ],
    )  # fmt: skip
    assert follow.status in ("completed", "incomplete")
    # the call and its result are in the prompt: more than a dozen tokens more
    assert follow.usage.input_tokens > response.usage.input_tokens + 12


def test_reasoning_comes_back_sealed_and_a_forged_seal_is_refused(server, sdk):
    asked = {
        "model": THINKER,
        "input": "Think, then say hi.",
        "max_output_tokens": 24,
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "low", "summary": "auto"},
        "temperature": 0,  # every call the same reply, which opens with reasoning
    }
    response = sdk.responses.create(**asked)
    [reasoning] = [item for item in response.output if item.type == "reasoning"]
    sealed = reasoning.encrypted_content
    assert sealed
    assert reasoning.content[0].text not in sealed
    assert sdk.responses.create(**asked, stream=False).output[0].encrypted_content != sealed  # fresh nonce
    # streamed: the item is sealed when it closes
    events = [plain(e) for e in sdk.responses.create(**asked, stream=True)]
    check_response_events(events)
    done = [
        e["item"]
        for e in events
        if e["type"] == "response.output_item.done" and e["item"]["type"] == "reasoning"
    ]
    assert done
    assert done[0]["encrypted_content"]

    # Codex sends the item back as it came, without its text: the turn continues from it
    back = {"type": "reasoning", "id": reasoning.id, "summary": [], "encrypted_content": sealed}
    later = [{"role": "user", "content": "Think, then say hi."}, back,
             {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again."}]  # fmt: skip
    status, body = server.json("POST", "/v1/responses", {**asked, "input": later})
    assert status == 200, body

    forged = sealed[:-3] + ("AAA" if not sealed.endswith("AAA") else "BBB")
    status, body = server.json(
        "POST", "/v1/responses", {**asked, "input": [*later[:1], {**back, "encrypted_content": forged}]}
    )
    assert status == 400, body
    assert body["error"]["param"] == "input[1].encrypted_content"
    assert "was not made by this server or was changed" in body["error"]["message"]


@pytest.mark.parametrize(
    "choice",
    [{"type": "web_search_preview"}, {"type": "code_interpreter"}, {"type": "mcp", "server_label": "x"}],
)
def test_forcing_a_tool_only_openai_runs_is_refused(server, choice):
    status, body = server.json(
        "POST",
        "/v1/responses",
        {"model": MODEL, "input": "hi", "tools": [WEB_SEARCH, SHELL], "tool_choice": choice},
    )
    assert status == 400, body
    assert body["error"]["param"] == "tool_choice"
    assert "only OpenAI runs" in body["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": MODEL, "input": "word " * 6000, "stream": True}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "word " * 6000}], "stream": True},
        ),
        ("/v1/responses", {"model": "no-such-model", "input": "hi", "stream": True}),
    ],
)
def test_a_stream_the_manager_refuses_is_an_http_error_before_any_event(server, path, body):
    status, headers, data = server.request("POST", path, body)
    assert status in (400, 404), (status, data[:300])
    assert headers["content-type"].startswith("application/json")
    assert b"event:" not in data
    assert b"data:" not in data
    error = json.loads(data)["error"]
    expected = "model_not_found" if body["model"] == "no-such-model" else "context_length_exceeded"
    assert error["code"] == expected, error
