"""Chat Completions, Completions and Embeddings: the compatibility APIs, parsed, run and rendered.

POST /v1/chat/completions   chat.completion, or chat.completion.chunk lines ending in [DONE]
POST /v1/completions        text_completion
POST /v1/embeddings         a list of embeddings (float or base64)
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response

from allm.gateway.affinity import conversation
from allm.gateway.chat import schema
from allm.gateway.fields import json_body, model_for, sampling, text_of
from allm.gateway.streaming import DONE, pump, sse

bp = Blueprint("chat", url_prefix="/v1")


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked chat messages in the manager's shape: text content, calls and call ids."""
    out = []
    for msg in messages:
        clean: dict[str, Any] = {"role": msg["role"], "content": text_of(msg.get("content"))}
        if msg.get("tool_calls"):
            clean["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {
                        "name": call["function"]["name"],
                        "arguments": call["function"]["arguments"],
                    },
                }
                for call in msg["tool_calls"]
            ]
        if msg.get("tool_call_id"):
            clean["tool_call_id"] = msg["tool_call_id"]
        if msg.get("reasoning_content"):
            clean["reasoning_content"] = msg["reasoning_content"]
        out.append(clean)
    return out


def response_format(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's checked response_format → the manager's {"type", "schema"}."""
    if fmt is None:
        return None
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    return {"type": "json_schema", "schema": fmt["json_schema"]["schema"]}


def tools_of(payload: dict[str, Any]) -> dict[str, Any]:
    """Checked chat tools and tool_choice, as the manager takes them."""
    out: dict[str, Any] = {}
    if payload.get("tools"):
        out["tools"] = [{"type": "function", "function": tool["function"]} for tool in payload["tools"]]
    if "tool_choice" in payload:
        out["tool_choice"] = payload["tool_choice"]
    return out


def usage(data: dict[str, Any]) -> dict[str, int]:
    prompt, completion = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_usage(data: dict[str, Any]) -> dict[str, Any]:
    """Usage with the reasoning tokens counted apart (0 where the model does not reason), and
    the prompt tokens the model's cache already held (not computed again)."""
    reasoning = data["usage"].get("reasoning_tokens", 0)
    completion: dict[str, int] = {"reasoning_tokens": reasoning}
    drafts = data.get("speculative")
    if drafts:  # speculative decoding: the draft tokens the model kept, and those it did not
        completion["accepted_prediction_tokens"] = drafts["accepted"]
        completion["rejected_prediction_tokens"] = drafts["drafted"] - drafts["accepted"]
    return {
        **usage(data),
        "prompt_tokens_details": {"cached_tokens": data.get("cached_tokens", 0)},
        "completion_tokens_details": completion,
    }


def tool_calls(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in data.get("tool_calls") or []
    ]


@bp.post("/chat/completions")
async def chat_completions(request: Request) -> HTTPResponse | None:
    config, client = request.app.ctx.config, request.app.ctx.client
    payload = schema.CHAT.check(json_body(request), "")
    model = model_for(config, payload, "text")
    params: dict[str, Any] = {
        "messages": chat_messages(payload["messages"]),
        **sampling(payload, model, max_tokens_keys=("max_tokens", "max_completion_tokens")),
        **tools_of(payload),
    }
    fmt = response_format(payload.get("response_format"))
    if fmt is not None:
        params["response_format"] = fmt
    asks_logprobs = bool(payload.get("logprobs"))
    if asks_logprobs:
        params["logprobs"] = True
        params["top_logprobs"] = payload.get("top_logprobs", 0)
    for key in ("parallel_tool_calls", "reasoning_effort"):
        if key in payload:
            params[key] = payload[key]
    affinity = conversation(model.id, params, payload.get("prompt_cache_key"))
    created = int(time.time())
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    if not payload.get("stream"):
        result = await client.call(
            "text",
            "chat",
            model=model.id,
            params=params,
            timeout_s=config.request_timeout_s,
            affinity=affinity,
        )
        data = result.data
        calls = tool_calls(data)
        message: dict[str, Any] = {"role": "assistant", "content": data["text"] or (None if calls else "")}
        if data.get("reasoning"):
            message["reasoning_content"] = data["reasoning"]
        if calls:
            message["tool_calls"] = calls
        logprobs = {"content": data.get("logprobs") or [], "refusal": None} if asks_logprobs else None
        return json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model.id,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": data["finish_reason"],
                        "logprobs": logprobs,
                    }
                ],
                "usage": chat_usage(data),
                "system_fingerprint": None,
            }
        )

    deltas = ChatDeltas(
        {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model.id},
        logprobs=asks_logprobs,
        include_usage=bool(payload.get("stream_options", {}).get("include_usage")),
    )
    await pump(
        request,
        client.stream(
            "text",
            "chat",
            model=model.id,
            params=params,
            timeout_s=config.request_timeout_s,
            affinity=affinity,
        ),
        first=deltas.chunk({"role": "assistant", "content": ""}),
        feed=deltas.feed,
        finish=lambda result: deltas.finish(result.data),
    )
    return None


class ChatDeltas:
    """The manager's stream chunks as chat.completion.chunk lines: text, reasoning, calls as generated."""

    def __init__(self, base: dict[str, Any], *, logprobs: bool, include_usage: bool) -> None:
        self.base = base
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.announced: set[int] = set()  # calls whose first delta went out

    def chunk(
        self, delta: dict[str, Any], finish: str | None = None, logprobs: list[Any] | None = None
    ) -> str:
        shown = {"content": logprobs, "refusal": None} if logprobs is not None else None
        return sse(
            {
                **self.base,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": shown}],
            }
        )

    def feed(self, data: dict[str, Any]) -> str:
        """One chunk's line: exactly one of text, reasoning, a call's start, a call's arguments."""
        if "text" in data:
            entries = (data.get("logprobs") or []) if self.logprobs else None
            return self.chunk({"content": data["text"]}, logprobs=entries)
        if "reasoning" in data:
            return self.chunk({"reasoning_content": data["reasoning"]})
        if "call" in data:
            call = data["call"]
            self.announced.add(call["index"])
            return self.chunk(
                {
                    "tool_calls": [
                        {
                            "index": call["index"],
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": ""},
                        }
                    ]
                }
            )
        if "arguments" in data:
            return self.chunk(
                {"tool_calls": [{"index": data["index"], "function": {"arguments": data["arguments"]}}]}
            )
        return ""

    def finish(self, data: dict[str, Any]) -> str:
        """Calls the stream never announced (in one delta each), the finish reason, usage, [DONE]."""
        out = ""
        for index, call in enumerate(tool_calls(data)):
            if index not in self.announced:
                out += self.chunk({"tool_calls": [{"index": index, **call}]})
        out += self.chunk({}, data["finish_reason"])
        if self.include_usage:
            out += sse({**self.base, "choices": [], "usage": chat_usage(data)})
        return out + DONE


@bp.post("/completions")
async def completions(request: Request) -> HTTPResponse | None:
    config, client = request.app.ctx.config, request.app.ctx.client
    payload = schema.COMPLETIONS.check(json_body(request), "")
    model = model_for(config, payload, "text")
    prompt = payload["prompt"]
    if isinstance(prompt, list):
        [prompt] = prompt
    params = {"prompt": prompt, **sampling(payload, model, max_tokens_keys=("max_tokens",))}
    params.setdefault("max_tokens", 16)  # OpenAI's default for this API
    created = int(time.time())
    base = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": created,
        "model": model.id,
    }

    def choice(text: str, finish: str | None) -> dict[str, Any]:
        return {**base, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    if not payload.get("stream"):
        result = await client.call(
            "text", "complete", model=model.id, params=params, timeout_s=config.request_timeout_s
        )
        return json_response(
            {**choice(result.data["text"], result.data["finish_reason"]), "usage": usage(result.data)}
        )
    await pump(
        request,
        client.stream("text", "complete", model=model.id, params=params, timeout_s=config.request_timeout_s),
        feed=lambda data: sse(choice(data["text"], None)),
        finish=lambda result: sse(choice("", result.data["finish_reason"])) + DONE,
    )
    return None


@bp.post("/embeddings")
async def embeddings(request: Request) -> HTTPResponse:
    config, client = request.app.ctx.config, request.app.ctx.client
    payload = schema.EMBEDDINGS.check(json_body(request), "")
    model = model_for(config, payload, "text")
    inputs = payload["input"]
    if isinstance(inputs, str):
        inputs = [inputs]
    encoding = payload.get("encoding_format", "float")
    result = await client.call(
        "text", "embed", model=model.id, params={"input": inputs}, timeout_s=config.request_timeout_s
    )
    data = []
    for i, vector in enumerate(result.data["embeddings"]):
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = result.data["usage"]["prompt_tokens"]
    return json_response(
        {
            "object": "list",
            "data": data,
            "model": model.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
