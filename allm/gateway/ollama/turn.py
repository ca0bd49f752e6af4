"""An Ollama request as the text manager's chat or complete parameters: messages, calls, options, format.

Ollama's tool calls carry their arguments as objects and often no id (its Python client
drops them); a tool result names its function (``tool_name``). The manager pairs calls and
results by id, so calls without one get an id here from their place, and each result is
paired with the call it answers: by id, else by function name, else in order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from allm.gateway.config import ModelConfig
from allm.gateway.errors import bad_field
from allm.gateway.fields import sampling
from allm.gateway.ollama.models import context_length

#: what Ollama's think levels are as the manager's reasoning effort
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high"}


def messages_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked Ollama messages in the manager's shape, every tool result paired with its call."""
    out: list[dict[str, Any]] = []
    unanswered: list[dict[str, Any]] = []  # calls of the latest assistant turn still without a result
    for i, msg in enumerate(messages):
        role = msg["role"]
        clean: dict[str, Any] = {"role": role, "content": msg.get("content", "")}
        if role == "assistant":
            if msg.get("thinking"):
                clean["reasoning_content"] = msg["thinking"]
            if msg.get("tool_calls"):
                calls = [_call(call, f"call_{i}_{j}") for j, call in enumerate(msg["tool_calls"])]
                clean["tool_calls"] = calls
                unanswered = list(calls)  # a copy: answering a call must not take it from the history
        elif role == "tool":
            call = _answered(unanswered, msg)
            if call is not None:
                unanswered.remove(call)
                clean["tool_call_id"] = call["id"]
                clean["name"] = call["function"]["name"]
            elif msg.get("tool_name"):
                clean["name"] = msg["tool_name"]
        out.append(clean)
    return out


def _call(call: dict[str, Any], fallback_id: str) -> dict[str, Any]:
    function = call["function"]
    return {
        "id": call.get("id") or fallback_id,
        "type": "function",
        "function": {"name": function["name"], "arguments": json.dumps(function.get("arguments", {}))},
    }


def _answered(calls: list[dict[str, Any]], result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The call a tool result answers: the one its id names, else the first of the function it
    names, else (it names neither) the next one."""
    wanted = result.get("tool_call_id")
    if wanted and (found := [c for c in calls if c["id"] == wanted]):
        return found[0]
    name = result.get("tool_name")
    if name:
        return next((c for c in calls if c["function"]["name"] == name), None)
    return calls[0] if calls and not wanted else None


def options_of(payload: Mapping[str, Any], model: ModelConfig) -> dict[str, Any]:
    """The checked ``options`` as the manager's sampling parameters, every one of them set."""
    options = dict(payload.get("options", {}))
    check_context(options, model)
    if options.get("num_predict", 1) <= 0:  # Ollama's "no limit": up to the context
        del options["num_predict"]
    if options.get("seed") == -1:  # Ollama's "draw one"
        del options["seed"]
    return sampling(options, model, max_tokens_keys=("num_predict",))


def check_context(options: Mapping[str, Any], model: ModelConfig) -> None:
    wanted = options.get("num_ctx")
    served = context_length(model)
    if wanted is not None and served is not None and wanted > served:
        raise bad_field(
            "options.num_ctx",
            f"'options.num_ctx' is {wanted}, but {model.id!r} is served with a context of {served} "
            "tokens (its catalog entry's n_ctx)",
        )


def generation_of(payload: Mapping[str, Any], model: ModelConfig) -> dict[str, Any]:
    """What /api/chat and /api/generate share: options, format, reasoning effort and logprobs."""
    params = options_of(payload, model)
    fmt = payload.get("format")
    if fmt == "json":
        params["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        params["response_format"] = {"type": "json_schema", "schema": fmt}
    think = payload.get("think")
    if isinstance(think, str):
        params["reasoning_effort"] = EFFORTS[think]
    if payload.get("logprobs"):
        params["logprobs"] = True
        params["top_logprobs"] = payload.get("top_logprobs", 0)
    return params


def chat_params(payload: Mapping[str, Any], model: ModelConfig) -> dict[str, Any]:
    """A checked /api/chat body (with messages) as the manager's chat parameters."""
    params = {"messages": messages_of(payload["messages"]), **generation_of(payload, model)}
    if payload.get("tools"):
        params["tools"] = [{"type": "function", "function": t["function"]} for t in payload["tools"]]
    if "tool_choice" in payload:
        params["tool_choice"] = payload["tool_choice"]
    return params


def generate_params(payload: Mapping[str, Any], model: ModelConfig) -> tuple[str, dict[str, Any]]:
    """A checked /api/generate body (with a prompt) as the manager's operation and its parameters:
    a raw prompt is completed as it is; any other goes through the chat template."""
    params = generation_of(payload, model)
    if payload.get("raw"):
        return "complete", {"prompt": payload["prompt"], **params}
    messages = [{"role": "system", "content": payload["system"]}] if payload.get("system") else []
    messages.append({"role": "user", "content": payload["prompt"]})
    return "chat", {"messages": messages, **params}
