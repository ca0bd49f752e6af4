"""Request checks: a chat or completion request's fields, checked into what every engine starts from.

Parameters arrive from a peer, so they are validated here (UNSUPPORTED with
reason ``invalid_request`` and the field in ``param``), never asserted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from allm import free_grammar
from allm.managers.text.sampling import Sampling, invalid

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
#: calls one reply may make when parallel calls are allowed
MAX_CALLS = 8
EFFORTS = ("low", "medium", "high")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages into the plain shape chat templates expect.

    Roles stay as sent (``developer`` too: gpt-oss's template has it; the others
    see it as ``system``); calls keep their ids and tool results their call ids.
    """
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise invalid(f"messages[{i}]", "each message must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role", f"role must be one of {sorted(ROLES)}, got {role!r}")
        content = msg.get("content") or ""
        if not isinstance(content, str):
            raise invalid(f"messages[{i}].content", "content must be text")
        clean: dict[str, Any] = {"role": role, "content": content}
        calls = msg.get("tool_calls")
        if calls:
            if not isinstance(calls, list) or not all(
                isinstance(c, Mapping) and isinstance(c.get("function"), Mapping) for c in calls
            ):
                raise invalid(f"messages[{i}].tool_calls", "tool_calls must be a list of function calls")
            clean["tool_calls"] = [
                {
                    "id": str(c.get("id", "")),
                    "type": "function",
                    "function": {
                        "name": str(c["function"].get("name", "")),
                        "arguments": str(c["function"].get("arguments") or "{}"),
                    },
                }
                for c in calls
            ]
        for key in ("tool_call_id", "reasoning_content", "name"):
            if isinstance(msg.get(key), str) and msg[key]:
                clean[key] = msg[key]
        out.append(clean)
    return out


#: what a model is shown of a custom tool: a function of one string, its free-form input
CUSTOM_PARAMETERS = {
    "type": "object",
    "properties": {"input": {"type": "string"}},
    "required": ["input"],
    "additionalProperties": False,
}


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    """The tools a reply may call: all of them, or the one ``tool_choice`` forces."""

    tools: list[dict[str, Any]]  # OpenAI chat tools, as chat templates take them
    required: bool  # tool_choice required or a named function: the reply is calls only
    forced: str | None
    max_calls: int  # 1 with parallel_tool_calls false
    #: custom tools (free-form input) by name: their input grammar, None for any text
    custom: dict[str, free_grammar.Grammar | None] = dataclasses.field(default_factory=dict)

    @property
    def functions(self) -> list[dict[str, Any]]:
        return [dict(t["function"]) for t in self.tools]

    @property
    def allowed(self) -> list[dict[str, Any]]:
        return [fn for fn in self.functions if self.forced is None or fn["name"] == self.forced]


def tool_spec(tools: Any, tool_choice: Any, parallel: Any = True) -> ToolSpec | None:
    """Checked tools and tool_choice; None when the reply may not call any."""
    if not tools or tool_choice == "none":
        return None
    if not isinstance(tools, list):
        raise invalid("tools", "tools must be a list")
    clean: list[dict[str, Any]] = []
    custom: dict[str, free_grammar.Grammar | None] = {}
    for i, tool in enumerate(tools):
        if isinstance(tool, Mapping) and tool.get("type") == "custom":
            shown, grammar = custom_tool(tool.get("custom"), f"tools[{i}].custom")
            custom[shown["name"]] = grammar
            clean.append({"type": "function", "function": shown})
            continue
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise invalid(f"tools[{i}]", "each tool must be {'type': 'function', 'function': {'name': ...}}")
        parameters = fn.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise invalid(f"tools[{i}].function.parameters", "parameters must be a JSON Schema object")
        clean.append({"type": "function", "function": dict(fn)})
    names = [t["function"]["name"] for t in clean]
    if len(set(names)) != len(names):
        raise invalid("tools", "two tools have the same name")
    forced: str | None = None
    if isinstance(tool_choice, Mapping):
        forced = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if forced not in names:
            raise invalid(
                "tool_choice", f"tool_choice names {forced!r}, which is not among the tools {names}"
            )
    elif tool_choice not in (None, "auto", "required"):
        raise invalid(
            "tool_choice", f"tool_choice must be none, auto, required or a function, got {tool_choice!r}"
        )
    if not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "parallel_tool_calls must be true or false")
    return ToolSpec(
        tools=clean,
        required=forced is not None or tool_choice == "required",
        forced=forced,
        max_calls=MAX_CALLS if parallel else 1,
        custom=custom,
    )


def custom_tool(spec: Any, param: str) -> tuple[dict[str, Any], free_grammar.Grammar | None]:
    """A custom tool ({name, description, format}) as the function a model is shown, and its grammar.

    ``format`` is ``{"type": "text"}`` or ``{"type": "grammar", "grammar": {"syntax", "definition",
    "parsed"}}``, ``parsed`` the grammar as ``allm.free_grammar`` holds it (the gateway parses it).
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise invalid(param, "a custom tool must be {'type': 'custom', 'custom': {'name': ...}}")
    fmt = spec.get("format") or {"type": "text"}
    description = str(spec.get("description") or "")
    grammar = None
    how = "Its input is free-form text, written as the string `input`."
    if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "grammar"):
        raise invalid(f"{param}.format", "format must be {'type': 'text'} or {'type': 'grammar', ...}")
    if fmt["type"] == "grammar":
        inner = fmt.get("grammar")
        if not isinstance(inner, Mapping) or not isinstance(inner.get("definition"), str):
            raise invalid(f"{param}.format.grammar", "a grammar format needs grammar.definition")
        try:
            grammar = free_grammar.check(inner.get("parsed"))
        except free_grammar.GrammarError as exc:
            raise invalid(f"{param}.format.grammar", f"the grammar cannot be used: {exc}") from exc
        syntax = inner.get("syntax", "lark")
        how += f" The input follows this {syntax} grammar:\n{inner['definition']}"
    function = {
        "name": spec["name"],
        "description": (description + "\n\n" + how).strip(),
        "parameters": CUSTOM_PARAMETERS,
    }
    return function, grammar


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat request as every engine starts from it: checked, not yet rendered."""

    messages: list[dict[str, Any]]
    sampling: Sampling
    tools: ToolSpec | None
    reasoning_effort: str | None = None

    def answered(self) -> set[tuple[str, str]]:
        """(name, arguments) of the calls in the conversation that already have a result."""
        results = {m.get("tool_call_id") for m in self.messages if m["role"] == "tool"}
        return {
            (c["function"]["name"], canonical(c["function"]["arguments"]))
            for m in self.messages
            for c in m.get("tool_calls", ())
            if c["id"] in results
        }


def chat_request(params: Mapping[str, Any]) -> ChatRequest:
    messages = check_messages(params.get("messages"))
    sampling = Sampling.from_params(params)
    tools = tool_spec(params.get("tools"), params.get("tool_choice"), params.get("parallel_tool_calls", True))
    effort = params.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise invalid("reasoning_effort", f"reasoning_effort must be one of {list(EFFORTS)}, got {effort!r}")
    return ChatRequest(messages, sampling, tools, effort)


def canonical(arguments: str) -> str:
    """A call's arguments in one spelling, so that the same call twice compares equal."""
    try:
        return json.dumps(json.loads(arguments or "{}"), sort_keys=True, separators=(",", ":"))
    except json.JSONDecodeError:
        return arguments


def prompt_of(params: Mapping[str, Any]) -> str:
    """A completion request's prompt, checked."""
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise invalid("prompt", "prompt must be a string")
    return prompt
