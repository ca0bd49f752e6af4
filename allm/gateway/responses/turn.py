"""One Responses request: the text manager's parameters, its input items, the response object it makes."""

from __future__ import annotations

import time
from typing import Any

from allm.gateway.config import ModelConfig
from allm.gateway.fields import sampling
from allm.gateway.responses.items import Item, input_items, item_messages, new_id

LOGPROBS = "message.output_text.logprobs"


def chat_tools(payload: dict[str, Any]) -> dict[str, Any]:
    """Checked Responses function tools ({type, name, parameters}) in the manager's chat shape."""
    out: dict[str, Any] = {}
    if payload.get("tools"):
        out["tools"] = [
            {
                "type": "function",
                "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool},
            }
            for tool in payload["tools"]
        ]
    choice = payload.get("tool_choice")
    if isinstance(choice, dict):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif choice is not None:
        out["tool_choice"] = choice
    return out


def text_format(payload: dict[str, Any]) -> dict[str, Any] | None:
    fmt = payload.get("text", {}).get("format")
    if fmt is None:
        return None
    if fmt["type"] == "json_schema":
        return {"type": "json_schema", "schema": fmt["schema"]}
    return {"type": fmt["type"]}


class Turn:
    """One Responses request: its parameters, its input items, the response object it makes."""

    def __init__(self, payload: dict[str, Any], model: ModelConfig, history: list[Item]) -> None:
        self.payload = payload
        self.model = model.id
        self.prefer: str | None = None  # the manager instance to choose among equally loaded ones
        self.metadata = payload.get("metadata", {})
        self.instructions = payload.get("instructions")
        # Every earlier item is kept; only an earlier response's instructions are not (OpenAI's rule).
        self.items = history + input_items(payload["input"])
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
        effort = payload.get("reasoning", {}).get("effort")
        if effort is not None:
            self.params["reasoning_effort"] = effort
        self.id = new_id("resp")
        self.created_at = int(time.time())
        self.store = payload.get("store", True) is not False

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
            "reasoning": p.get("reasoning", {"effort": None, "summary": None}),
            # what the engine was told, the request's or the defaults
            "temperature": self.params["temperature"],
            "top_p": self.params["top_p"],
            "top_logprobs": p.get("top_logprobs", 0),
            "tool_choice": p.get("tool_choice", "auto"),
            "tools": p.get("tools", []),
            "text": p.get("text", {"format": {"type": "text"}}),
            "truncation": "disabled",
            "usage": usage,
            "metadata": self.metadata,
            "store": self.store,
        }
