"""The Responses API, the recommended one.

    POST   /v1/responses        a response object, or server-sent events
    GET    /v1/responses/{id}   a stored response
    DELETE /v1/responses/{id}

A stream is exactly: response.created, response.in_progress,
response.output_item.added, response.content_part.added, one
response.output_text.delta per token, response.output_text.done,
response.content_part.done, response.output_item.done, then
response.completed (or response.incomplete at the token limit, or
response.failed with the error), each with a rising sequence_number.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from kernel.codes import AllmError
from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response

from gateway import api_schema
from gateway.chat import open_stream, tool_calls
from gateway.config import Config
from gateway.errors import ApiError, describe
from gateway.fields import json_body, model_for, sampling, text_of

bp = Blueprint("responses", url_prefix="/v1")


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def input_messages(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked Responses ``input`` (a string or a list of items) as chat messages."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    out: list[dict[str, Any]] = []
    for item in raw:
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item["role"], "content": text_of(item["content"])})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:  # function_call_output
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text_of(item["output"])})
    return out


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
    """One Responses request: its parameters, then the response object as it fills in."""

    def __init__(self, payload: dict[str, Any], model: str, history: list[dict[str, Any]]) -> None:
        self.payload = payload
        self.model = model
        self.metadata = payload.get("metadata", {})
        instructions = payload.get("instructions")
        self.instructions = instructions
        messages = input_messages(payload["input"])
        system = [{"role": "system", "content": instructions}] if instructions else []
        # Instructions of an earlier response are not carried over (as OpenAI does).
        self.messages = system + [m for m in history if m["role"] != "system"] + messages
        self.params: dict[str, Any] = {
            "messages": self.messages,
            **sampling(payload, max_tokens_keys=("max_output_tokens",)),
            **chat_tools(payload),
        }
        fmt = text_format(payload)
        if fmt is not None:
            self.params["response_format"] = fmt
        self.id = _id("resp")
        self.message_id = _id("msg")
        self.created_at = int(time.time())
        self.store = payload.get("store", True) is not False

    @property
    def text_ids(self) -> dict[str, Any]:
        """Where the text of this response's message lives, as the text events name it."""
        return {"item_id": self.message_id, "output_index": 0, "content_index": 0}

    def message_item(self, text: str, status: str) -> dict[str, Any]:
        content = (
            [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
            if status != "in_progress"
            else []
        )
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def output(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        calls = tool_calls(data)
        items = [
            {
                "type": "function_call",
                "id": _id("fc"),
                "call_id": c["id"],
                "name": c["function"]["name"],
                "arguments": c["function"]["arguments"],
                "status": "completed",
            }
            for c in calls
        ]
        if data["text"] or not items:
            items.insert(0, self.message_item(data["text"], "completed"))
        return items

    def response(
        self, status: str, *, data: dict[str, Any] | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        p = self.payload
        usage = None
        output: list[dict[str, Any]] = []
        incomplete = None
        if data is not None:
            output = self.output(data)
            used_in, used_out = data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]
            usage = {
                "input_tokens": used_in,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": used_out,
                "output_tokens_details": {"reasoning_tokens": 0},
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
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": p.get("previous_response_id"),
            "temperature": p.get("temperature", 1.0),
            "top_p": p.get("top_p", 1.0),
            "tool_choice": p.get("tool_choice", "auto"),
            "tools": p.get("tools", []),
            "text": p.get("text", {"format": {"type": "text"}}),
            "truncation": "disabled",
            "usage": usage,
            "metadata": self.metadata,
            "store": self.store,
        }

    def conversation(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The messages a follow-up with previous_response_id continues from."""
        reply: dict[str, Any] = {"role": "assistant", "content": data["text"]}
        calls = tool_calls(data)
        if calls:
            reply["tool_calls"] = calls
        return [*self.messages, reply]


async def _turn(request: Request) -> Turn:
    config: Config = request.app.ctx.config
    payload = api_schema.RESPONSES.check(json_body(request), "")
    model = model_for(config, payload, "text")
    history: list[dict[str, Any]] = []
    previous = payload.get("previous_response_id")
    if previous:
        stored = await request.app.ctx.store.get(previous)
        if stored is None:
            raise ApiError(
                404,
                f"no stored response with id {previous!r}",
                code="not_found",
                param="previous_response_id",
            )
        history = stored[1]
    return Turn(payload, model.id, history)


@bp.post("/responses")
async def create(request: Request) -> HTTPResponse | None:
    config: Config = request.app.ctx.config
    client = request.app.ctx.client
    turn = await _turn(request)
    if not turn.payload.get("stream"):
        result = await client.call(
            "text", "chat", model=turn.model, params=turn.params, timeout_s=config.request_timeout_s
        )
        response = turn.response("completed", data=result.data)
        if turn.store:
            await request.app.ctx.store.put(response, turn.conversation(result.data))
        return json_response(response)
    await _stream(request, turn)
    return None


async def _stream(request: Request, turn: Turn) -> None:
    config: Config = request.app.ctx.config
    client = request.app.ctx.client
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        payload = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    ids = turn.text_ids
    streams_text = "tools" not in turn.params  # with tools, output is known only at the end
    async with client.stream(
        "text", "chat", model=turn.model, params=turn.params, timeout_s=config.request_timeout_s
    ) as s:
        response, opening, pieces = await open_stream(request, s)
        head = event("response.created", response=turn.response("in_progress"))
        head += event("response.in_progress", response=turn.response("in_progress"))
        if streams_text:
            head += _open_message(event, turn)
        if opening is not None:
            head += event("response.output_text.delta", delta=opening.data["text"], logprobs=[], **ids)
        await response.send(head)
        try:
            async for piece in pieces:
                await response.send(
                    event("response.output_text.delta", delta=piece.data["text"], logprobs=[], **ids)
                )
        except AllmError as exc:
            _status, body, _headers = describe(exc)
            failed = turn.response("failed", error={"code": body["error"]["code"], "message": exc.message})
            await response.send(event("response.failed", response=failed))
            await response.eof()
            return
        assert s.result is not None
        data = s.result.data
        final = turn.response("completed", data=data)
        tail = ""
        for index, item in enumerate(final["output"]):
            if item["type"] == "message":
                text = item["content"][0]["text"]
                if not streams_text:
                    tail += _open_message(event, turn)
                    tail += event("response.output_text.delta", delta=text, logprobs=[], **ids)
                tail += event("response.output_text.done", text=text, logprobs=[], **ids)
                tail += event("response.content_part.done", part=item["content"][0], **ids)
            else:
                tail += event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "arguments": "", "status": "in_progress"},
                )
                tail += event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=item["arguments"],
                )
                tail += event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            tail += event("response.output_item.done", output_index=index, item=item)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        tail += event(kind, response=final)
        if turn.store:
            await request.app.ctx.store.put(final, turn.conversation(data))
        await response.send(tail)
        await response.eof()


def _open_message(event: Callable[..., str], turn: Turn) -> str:
    return event(
        "response.output_item.added", output_index=0, item=turn.message_item("", "in_progress")
    ) + event(
        "response.content_part.added",
        part={"type": "output_text", "text": "", "annotations": []},
        **turn.text_ids,
    )


@bp.get("/responses/<response_id:str>")
async def retrieve(request: Request, response_id: str) -> HTTPResponse:
    api_schema.RESPONSE_ID.check(response_id, "response_id")
    stored = await request.app.ctx.store.get(response_id)
    if stored is None:
        raise ApiError(404, f"no stored response with id {response_id!r}", code="not_found")
    return json_response(stored[0])


@bp.delete("/responses/<response_id:str>")
async def delete(request: Request, response_id: str) -> HTTPResponse:
    api_schema.RESPONSE_ID.check(response_id, "response_id")
    if not await request.app.ctx.store.delete(response_id):
        raise ApiError(404, f"no stored response with id {response_id!r}", code="not_found")
    return json_response({"id": response_id, "object": "response", "deleted": True})
