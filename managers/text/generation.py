"""What every text engine shares: parameters, the token loop, stop sequences, tool calls.

Parameters arrive from a peer, so they are validated here (UNSUPPORTED with
reason ``invalid_request`` and the field in ``param``), never asserted.
"""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from kernel.codes import UnsupportedError
from kernel.runtime import Reply, RequestContext

INVALID = "invalid_request"
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _bad(param: str, message: str) -> UnsupportedError:
    return UnsupportedError(message, reason=INVALID, param=param)


def _number(params: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
        raise _bad(key, f"{key} must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json_schema: Mapping[str, Any] | None = None  # constrain output to this schema
    json_object: bool = False  # constrain output to any JSON object

    def seed_or_random(self) -> int:
        """The request's seed, or a fresh random one."""
        return self.seed if self.seed is not None else random.getrandbits(31)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Sampling:
        max_tokens = params.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise _bad("max_tokens", f"max_tokens must be a positive integer, got {max_tokens!r}")
        seed = params.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _bad("seed", f"seed must be an integer, got {seed!r}")
        stop = params.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise _bad("stop", "stop must be a string or a list of up to 4 strings")
        fmt = params.get("response_format") or {}
        if not isinstance(fmt, Mapping):
            raise _bad("response_format", "response_format must be an object")
        kind = fmt.get("type", "text")
        schema = None
        if kind == "json_schema":
            schema = fmt.get("schema")
            if not isinstance(schema, Mapping):
                raise _bad("response_format", "a json_schema response_format needs a 'schema' object")
        elif kind not in ("text", "json_object"):
            raise _bad(
                "response_format", f"response_format type {kind!r} is not text, json_object or json_schema"
            )
        return cls(
            max_tokens=max_tokens,
            temperature=_number(params, "temperature", 0.8, 0.0, 2.0),
            top_p=_number(params, "top_p", 0.95, 0.0, 1.0),
            seed=seed,
            stop=tuple(s for s in stop if s),
            json_schema=schema,
            json_object=kind == "json_object",
        )


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages into the plain shape chat templates expect."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages must be a non-empty list")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise _bad(f"messages[{i}]", "each message must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"role must be one of {sorted(ROLES)}, got {role!r}")
        content = msg.get("content") or ""
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "content must be text")
        clean: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if msg.get("tool_calls"):
            clean["tool_calls"] = msg["tool_calls"]
        if msg.get("tool_call_id"):
            clean["tool_call_id"] = msg["tool_call_id"]
        out.append(clean)
    return out


class StopMatcher:
    """Cuts generated text at the first stop sequence, holding back what may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop sequence was reached."""
        if not self.stops:
            return text, False
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(stop[:k]):
                    hold = k
                    break
        cut = len(self.buffer) - hold
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a request with tools is generated: a prompt addition and an output schema."""

    system_text: str
    schema: dict[str, Any]


def plan_tools(tools: Any, tool_choice: Any) -> ToolPlan | None:
    """The generic tool-call scheme (as llama.cpp's server does for templates without tools).

    The model is told about the functions and its output is constrained to JSON:
    ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` or ``{"response": "..."}``.
    """
    if not tools or tool_choice == "none":
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be a list")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise _bad(f"tools[{i}]", "each tool must be {'type': 'function', 'function': {'name': ...}}")
        functions.append(fn)
    names = [fn["name"] for fn in functions]
    forced: str | None = None
    if isinstance(tool_choice, Mapping):
        forced = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if forced not in names:
            raise _bad("tool_choice", f"tool_choice names {forced!r}, which is not among the tools {names}")
    elif tool_choice not in (None, "auto", "required"):
        raise _bad(
            "tool_choice", f"tool_choice must be none, auto, required or a function, got {tool_choice!r}"
        )

    def call_schema(fn: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {
                "name": {"const": fn["name"]},
                "arguments": fn.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
        }

    allowed = [fn for fn in functions if forced is None or fn["name"] == forced]
    calls = {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": {"anyOf": [call_schema(fn) for fn in allowed]},
                "minItems": 1,
            }
        },
        "required": ["tool_calls"],
    }
    reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
    schema = calls if forced or tool_choice == "required" else {"anyOf": [calls, reply]}
    listing = json.dumps(
        [
            {
                "name": fn["name"],
                "description": fn.get("description", ""),
                "parameters": fn.get("parameters", {}),
            }
            for fn in functions
        ]
    )
    system_text = (
        "You can call these functions:\n"
        f"{listing}\n"
        'To call functions, answer with JSON {"tool_calls": [{"name": <function>, "arguments": {...}}]}.'
        + ("" if forced or tool_choice == "required" else ' To answer directly, use {"response": <text>}.')
    )
    return ToolPlan(system_text, schema)


def with_tool_prompt(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Render tool traffic as text and, with a plan, describe the tools in the system message.

    Chat templates of small models know nothing of tool roles or tool_calls;
    the generic scheme shows them to the model as the JSON it was asked for.
    """
    out: list[dict[str, Any]] = []
    for msg in messages:
        if msg["role"] == "tool":
            out.append({"role": "user", "content": f"Function result: {msg['content']}"})
        elif msg.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")}
                for c in msg["tool_calls"]
            ]
            out.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        else:
            out.append({"role": msg["role"], "content": msg["content"]})
    if plan is None:
        return out
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + plan.system_text}
    else:
        out.insert(0, {"role": "system", "content": plan.system_text})
    return out


def parse_tool_output(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The (text, tool calls) of constrained tool output."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text, []  # cut short by max_tokens: hand back what there is
    if isinstance(data, dict) and isinstance(data.get("tool_calls"), list):
        calls = [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "name": str(call.get("name", "")),
                "arguments": json.dumps(call.get("arguments", {})),
            }
            for call in data["tool_calls"]
            if isinstance(call, dict)
        ]
        return "", calls
    if isinstance(data, dict) and isinstance(data.get("response"), str):
        return data["response"], []
    return text, []


@dataclasses.dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat request as every engine starts from it: checked, tools planned."""

    messages: list[dict[str, Any]]
    sampling: Sampling  # with tools, constrained to the tool-call schema
    tools: ToolPlan | None


def chat_request(params: Mapping[str, Any]) -> ChatRequest:
    messages = check_messages(params.get("messages"))
    sampling = Sampling.from_params(params)
    tools = plan_tools(params.get("tools"), params.get("tool_choice"))
    if tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        messages = with_tool_prompt(messages, tools)
    if tools is not None:
        sampling = dataclasses.replace(sampling, json_schema=tools.schema, json_object=False)
    return ChatRequest(messages, sampling, tools)


def prompt_of(params: Mapping[str, Any]) -> str:
    """A completion request's prompt, checked."""
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt", "prompt must be a string")
    return prompt


class Detokenizer(Protocol):
    """Turns generated tokens into text, one token at a time."""

    def feed(self, token: int) -> str:
        """Text this token completes (may be empty while a character is incomplete)."""
        ...

    def flush(self) -> str:
        """Whatever is still held back at the end."""
        ...


def run_generation(
    ctx: RequestContext,
    tokens: Iterator[int],
    detokenizer: Detokenizer,
    is_end: Callable[[int], bool],
    sampling: Sampling,
    *,
    prompt_tokens: int,
    room: int,
    stream: bool,
    model_id: str,
) -> Reply:
    """The token loop every engine shares.

    Cancel and the deadline are checked between every two tokens; ``max_tokens``
    is a hard limit; stop sequences cut the text; usage is counted in tokens.
    """
    limit = min(sampling.max_tokens or room, room)
    stopper = StopMatcher(sampling.stop)
    parts: list[str] = []
    generated = 0
    finish = "length"
    cut = False  # a stop sequence ended the text: what is held back is dropped
    for token in tokens:
        ctx.check()
        if is_end(token):
            finish = "stop"
            break
        generated += 1
        text, stopped = stopper.feed(detokenizer.feed(token))
        if text:
            parts.append(text)
            if stream:
                ctx.emit({"text": text})
        if stopped:
            finish, cut = "stop", True
            break
        if generated >= limit:
            break
    tail = "" if cut else stopper.feed(detokenizer.flush())[0] + stopper.flush()
    if tail:
        parts.append(tail)
        if stream:
            ctx.emit({"text": tail})
    return Reply(
        {
            "text": "".join(parts),
            "finish_reason": finish,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generated},
            "model": model_id,
        }
    )
