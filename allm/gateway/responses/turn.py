"""One Responses request: the text manager's parameters, its input items, the response object it makes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from allm.gateway.config import ModelConfig
from allm.gateway.errors import bad_field
from allm.gateway.fields import sampling
from allm.gateway.responses.items import Item, Shown, Tool, input_items, item_messages, new_id
from allm.gateway.responses.schema import EFFORTS, forced_tool, visible_tools
from allm.gateway.seal import Sealer

LOGPROBS = "message.output_text.logprobs"
ENCRYPTED = "reasoning.encrypted_content"
#: what a sealed reasoning item is for: a token sealed for anything else does not open as one
SEALED_REASONING = "responses.reasoning"


def needs_sealer(payload: dict[str, Any]) -> bool:
    """Whether the request seals reasoning, or sends sealed reasoning back (the key is read only then)."""
    sent = payload["input"] if isinstance(payload["input"], list) else []
    return ENCRYPTED in payload.get("include", ()) or any("encrypted_content" in item for item in sent)


def shown_tools(payload: dict[str, Any]) -> Shown:
    """The callable tools by the name the model sees them by."""
    return {
        shown: Tool(kind, name, namespace)
        for shown, (kind, name, namespace, _tool) in visible_tools(payload.get("tools", [])).items()
    }


def _chat_tool(shown: str, tool: dict[str, Any], namespace: dict[str, Any] | None) -> dict[str, Any]:
    """One callable tool in the manager's chat shape, under the name the model sees."""
    description = tool.get("description", "")
    if namespace is not None and namespace.get("description"):
        description = f"{description}\n\n(In {namespace['name']}: {namespace['description']})".strip()
    if tool["type"] == "custom":
        fmt = tool.get("format", {"type": "text"})
        if fmt["type"] == "grammar":
            fmt = {"type": "grammar", "grammar": {k: fmt[k] for k in ("syntax", "definition", "parsed")}}
        return {"type": "custom", "custom": {"name": shown, "description": description, "format": fmt}}
    function = {"name": shown, "description": description}
    if "parameters" in tool:
        function["parameters"] = tool["parameters"]
    return {"type": "function", "function": function}


def chat_tools(payload: dict[str, Any]) -> dict[str, Any]:
    """Checked Responses tools in the manager's chat shape: functions, custom tools, each namespace's
    tools by ``namespace.name``; the tools OpenAI runs are left out."""
    out: dict[str, Any] = {}
    tools = []
    for tool in payload.get("tools", ()):
        if tool["type"] == "namespace":
            tools += [_chat_tool(f"{tool['name']}.{inner['name']}", inner, tool) for inner in tool["tools"]]
        elif tool["type"] in ("function", "custom"):
            tools.append(_chat_tool(tool["name"], tool, None))
    if tools:
        out["tools"] = tools
    choice = payload.get("tool_choice")
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "function", "function": {"name": forced_tool(payload["tools"], choice)}}
    elif choice is not None and tools:
        out["tool_choice"] = choice
    return out


def published_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools as the response object echoes them: as sent, without the parsed grammars."""

    def bare(tool: dict[str, Any]) -> dict[str, Any]:
        if tool["type"] == "namespace":
            return {**tool, "tools": [bare(inner) for inner in tool["tools"]]}
        if "format" in tool:
            return {**tool, "format": {k: v for k, v in tool["format"].items() if k != "parsed"}}
        return tool

    return [bare(tool) for tool in tools]


def text_format(payload: dict[str, Any]) -> dict[str, Any] | None:
    fmt = payload.get("text", {}).get("format")
    if fmt is None:
        return None
    if fmt["type"] == "json_schema":
        return {"type": "json_schema", "schema": fmt["schema"]}
    return {"type": fmt["type"]}


class Turn:
    """One Responses request: its parameters, its input items, the response object it makes."""

    def __init__(
        self,
        payload: dict[str, Any],
        model: ModelConfig,
        history: list[Item],
        sealer: Sealer | None = None,
    ) -> None:
        """``sealer``: seals reasoning items and opens those sent back (none: they are refused)."""
        self.payload = payload
        self.model = model.id
        # the manager instances to choose among equally loaded ones, best first
        self.prefer: tuple[str, ...] = ()
        self.affinity: str | None = None  # the conversation's key (allm/gateway/affinity.py)
        self.metadata = payload.get("metadata", {})
        self.instructions = payload.get("instructions")
        self.sealer = sealer
        self.shown = shown_tools(payload)
        self.seals = ENCRYPTED in payload.get("include", ())
        # Every earlier item is kept; only an earlier response's instructions are not (OpenAI's rule).
        self.items = history + input_items(payload["input"], self.reasoning_of)
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        self.logprobs = LOGPROBS in payload.get("include", ())
        self.params: dict[str, Any] = {
            "messages": system + item_messages(self.items),
            **sampling(payload, model, max_tokens_keys=("max_output_tokens",)),
            **chat_tools(payload),
        }
        fmt = text_format(payload)
        if fmt is not None:
            self.params["response_format"] = fmt
        if self.logprobs:
            self.params["logprobs"] = True
            self.params["top_logprobs"] = payload.get("top_logprobs", 0)
        if "parallel_tool_calls" in payload:
            self.params["parallel_tool_calls"] = payload["parallel_tool_calls"]
        effort = EFFORTS.get(payload.get("reasoning", {}).get("effort", "none"))
        if effort is not None:
            self.params["reasoning_effort"] = effort
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.store = payload.get("store", True) is not False
        self.truncated = False  # truncation auto dropped the oldest exchanges to fit the context

    def truncate(self) -> bool:
        """``truncation: auto`` after the prompt was too long: drop the oldest exchange, from its
        first message up to the next user message (calls and their results go together), keeping
        the system and developer messages. False, and nothing dropped, once the last user turn
        is all that is left, or when the request did not ask for it."""
        if self.payload.get("truncation") != "auto":
            return False
        messages = self.params["messages"]
        first = next((i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")), None)
        if first is None:
            return False
        following = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None)
        if following is None:
            return False
        self.params["messages"] = messages[:first] + messages[following:]
        self.truncated = True
        return True

    def seal(self, reasoning: str) -> str:
        """A reasoning item's ``encrypted_content``: its text, sealed for a later request."""
        assert self.sealer is not None
        return self.sealer.seal({"use": SEALED_REASONING, "text": reasoning})

    def sealing(self) -> Callable[[str], str] | None:
        """``seal`` when the request included encrypted reasoning, else None."""
        return self.seal if self.seals and self.sealer is not None else None

    def reasoning_of(self, token: str, param: str) -> str:
        """The reasoning text of an ``encrypted_content`` allm sealed; a 400 naming ``param`` otherwise."""
        if self.sealer is None:
            raise bad_field(param, f"'{param}' cannot be opened here")
        payload = self.sealer.unseal(token, param)
        if payload.get("use") != SEALED_REASONING or not isinstance(payload.get("text"), str):
            raise bad_field(param, f"'{param}' was not made for a reasoning item: send it back where it came")
        text: str = payload["text"]
        return text

    def response(
        self,
        status: str,
        *,
        output: list[Item] | None = None,
        data: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        p = self.payload
        usage = None
        incomplete = None
        if data is not None:
            used = data["usage"]
            used_in, used_out = used["prompt_tokens"], used["completion_tokens"]
            usage = {
                "input_tokens": used_in,
                "input_tokens_details": {"cached_tokens": data.get("cached_tokens", 0)},
                "output_tokens": used_out,
                "output_tokens_details": {"reasoning_tokens": used.get("reasoning_tokens", 0)},
                "total_tokens": used_in + used_out,
            }
            if data["finish_reason"] == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": p.get("max_output_tokens"),
            "model": self.model,
            "output": output or [],
            "parallel_tool_calls": p.get("parallel_tool_calls", True),
            "previous_response_id": p.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None, **p.get("reasoning", {})},
            # what the engine was told, the request's or the defaults
            "temperature": self.params["temperature"],
            "top_p": self.params["top_p"],
            "top_logprobs": p.get("top_logprobs", 0),
            "tool_choice": p.get("tool_choice", "auto"),
            "tools": published_tools(p.get("tools", [])),
            "text": p.get("text", {"format": {"type": "text"}}),
            "truncation": p.get("truncation", "disabled"),
            "usage": usage,
            "metadata": self.metadata,
            "store": self.store,
            "prompt_cache_key": p.get("prompt_cache_key"),
            "safety_identifier": p.get("safety_identifier"),
            "service_tier": "default",
            "user": p.get("user"),
        }
