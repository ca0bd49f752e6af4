"""The Responses API, the recommended one.

    POST   /v1/responses                     a response object, or server-sent events
    GET    /v1/responses/{id}                a stored response
    DELETE /v1/responses/{id}
    GET    /v1/responses/{id}/input_items    the input items a stored response was made from

A stream follows OpenAI's event grammar whatever the request: response.created
and response.in_progress at once, before the first token; then each output
item in the order the model makes it, an item closing when the next begins
or the stream ends:

- reasoning: output_item.added, content_part.added, reasoning_text.delta*,
  reasoning_text.done, content_part.done, output_item.done;
- message: output_item.added, content_part.added, output_text.delta*,
  output_text.done, content_part.done, output_item.done;
- function call: output_item.added (arguments ""), function_call_arguments.delta*
  as the arguments are generated, function_call_arguments.done, output_item.done;

then response.completed (response.incomplete at the token limit, or
response.failed with the error), each event with a rising sequence_number.
The final response's output is the items the events built.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response

from allm.gateway import api_schema
from allm.gateway.config import Config, ModelConfig
from allm.gateway.errors import ApiError, bad_field, describe
from allm.gateway.fields import json_body, model_for, sampling
from allm.gateway.items import (
    Item,
    call_item,
    input_items,
    item_messages,
    message_item,
    new_id,
    output_items,
    reasoning_item,
)
from allm.kernel.codes import AllmError

bp = Blueprint("responses", url_prefix="/v1")

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


async def _stored(request: Request, response_id: str, param: str | None = None) -> tuple[Item, list[Item]]:
    """A stored response and its input items, or 404 for an unknown, deleted or expired id."""
    stored = await request.app.ctx.store.get(response_id)
    if stored is None:
        raise ApiError(404, f"no stored response with id {response_id!r}", code="not_found", param=param)
    response, items = stored
    return response, items


async def _turn(request: Request) -> Turn:
    config: Config = request.app.ctx.config
    payload = api_schema.RESPONSES.check(json_body(request), "")
    model = model_for(config, payload, "text")
    history: list[Item] = []
    previous = payload.get("previous_response_id")
    prefer = None
    if previous:
        response, items = await _stored(request, previous, "previous_response_id")
        history = items + response["output"]
        # The instance that served it holds the conversation's prefix in its cache.
        prefer = await request.app.ctx.store.instance_of(previous)
    turn = Turn(payload, model, history)
    turn.prefer = prefer
    return turn


@bp.post("/responses")
async def create(request: Request) -> HTTPResponse | None:
    config: Config = request.app.ctx.config
    client = request.app.ctx.client
    turn = await _turn(request)
    if not turn.payload.get("stream"):
        async with client.stream(
            "text",
            "chat",
            model=turn.model,
            params=turn.params,
            timeout_s=config.request_timeout_s,
            stream=False,
            prefer=turn.prefer,
        ) as s:
            async for _chunk in s:
                pass
        assert s.result is not None
        data = s.result.data
        response = turn.response("completed", output=output_items(data), data=data)
        if turn.store:
            await request.app.ctx.store.put(response, turn.items, instance=s.endpoint)
        return json_response(response)
    await _stream(request, turn)
    return None


async def _stream(request: Request, turn: Turn) -> None:
    config: Config = request.app.ctx.config
    events = Events(turn)
    async with request.app.ctx.client.stream(
        "text",
        "chat",
        model=turn.model,
        params=turn.params,
        timeout_s=config.request_timeout_s,
        prefer=turn.prefer,
    ) as s:
        response = await request.respond(
            content_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        opening = turn.response("in_progress")
        await response.send(
            events.event("response.created", response=opening)
            + events.event("response.in_progress", response=opening)
        )
        try:
            async for piece in s:
                out = events.feed(piece.data)
                if out:
                    await response.send(out)
        except AllmError as exc:
            _status, body, _headers = describe(exc)
            error = {"code": body["error"]["code"], "message": exc.message}
            failed = turn.response("failed", output=events.output, error=error)
            await response.send(events.event("response.failed", response=failed))
            await response.eof()
            return
        assert s.result is not None
        tail, final = events.finish(s.result.data)
        if turn.store:
            try:
                await request.app.ctx.store.put(final, turn.items, instance=s.endpoint)
            except ApiError as exc:  # the store is down: the stream ends saying so, not cut
                await response.send(events.event("error", code=exc.code, message=exc.message, param=None))
                await response.eof()
                return
        await response.send(tail)
        await response.eof()


class Events:
    """One response's stream: the manager's chunks as events, item by item, and the output they build."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.seq = 0
        self.output: list[Item] = []  # every item so far; the open one (if any) last
        self.open: str | None = None  # the type of the open item
        self.calls: dict[int, Item] = {}  # the manager's call index → its item

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.output[-1]["id"], "output_index": len(self.output) - 1}

    def _add(self, item: Item) -> str:
        out = self.close()
        self.output.append(item)
        self.open = item["type"]
        return out + self.event("response.output_item.added", output_index=len(self.output) - 1, item=item)

    def _begin(self, kind: str) -> str:
        """Open a text item of this kind (reasoning or message) unless it is the open one."""
        if self.open == kind:
            return ""
        if kind == "reasoning":
            out = self._add(reasoning_item(new_id("rs"), None, "in_progress"))
            part: Item = {"type": "reasoning_text", "text": ""}
        else:
            out = self._add(message_item(new_id("msg"), None, "in_progress"))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        out += self.event("response.content_part.added", **self._where(), content_index=0, part=part)
        self.output[-1]["content"].append(part)
        return out

    def feed(self, data: dict[str, Any]) -> str:
        """The events of one chunk: text, reasoning, a call's start or a call's arguments."""
        if "text" in data:
            out = self._begin("message")
            part = self.output[-1]["content"][0]
            part["text"] += data["text"]
            logprobs = (data.get("logprobs") or []) if self.turn.logprobs else []
            part["logprobs"].extend(logprobs)
            return out + self.event(
                "response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=data["text"],
                logprobs=logprobs,
            )
        if "reasoning" in data:
            out = self._begin("reasoning")
            self.output[-1]["content"][0]["text"] += data["reasoning"]
            return out + self.event(
                "response.reasoning_text.delta", **self._where(), content_index=0, delta=data["reasoning"]
            )
        if "call" in data:
            call = data["call"]
            item = call_item(new_id("fc"), call, "", "in_progress")
            self.calls[call["index"]] = item
            return self._add(item)
        if "arguments" in data:
            open_call = self.calls.get(data["index"])
            if open_call is None or open_call is not self.output[-1] or self.open is None:
                return ""  # arguments of a call that is not open: nothing to say it with
            open_call["arguments"] += data["arguments"]
            return self.event(
                "response.function_call_arguments.delta", **self._where(), delta=data["arguments"]
            )
        return ""

    def close(self, status: str = "completed") -> str:
        """Close the open item, if any: its done events, with the item as it ended."""
        if self.open is None:
            return ""
        item = self.output[-1]
        where = self._where()
        item["status"] = status
        out = ""
        if self.open == "message":
            part = item["content"][0]
            out += self.event(
                "response.output_text.done",
                **where,
                content_index=0,
                text=part["text"],
                logprobs=part["logprobs"],
            )
            out += self.event("response.content_part.done", **where, content_index=0, part=part)
        elif self.open == "reasoning":
            part = item["content"][0]
            out += self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"])
            out += self.event("response.content_part.done", **where, content_index=0, part=part)
        else:
            out += self.event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            )
        self.open = None
        return out + self.event("response.output_item.done", output_index=where["output_index"], item=item)

    def finish(self, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The closing events for the final reply, and the final response.

        What the reply holds that no chunk announced (calls the engine delivers only at
        the end, text it never streamed) is sent as items of its own first, so the
        output is the same as a request without stream would get.
        """
        kinds = {item["type"] for item in self.output}
        out = ""
        if data.get("reasoning") and "reasoning" not in kinds:
            out += self.feed({"reasoning": data["reasoning"]})
        if data["text"] and "message" not in kinds:
            out += self.feed({"text": data["text"], "logprobs": data.get("logprobs")})
        for index, call in enumerate(data.get("tool_calls") or []):
            if index not in self.calls:
                out += self.feed({"call": {"index": index, "id": call["id"], "name": call["name"]}})
                out += self.feed({"arguments": call["arguments"], "index": index})
        if not any(item["type"] in ("message", "function_call") for item in self.output):
            out += self._begin("message")  # an empty answer is still a message, as without stream
        out += self.close("incomplete" if data["finish_reason"] == "length" else "completed")
        final = self.turn.response("completed", output=self.output, data=data)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return out + self.event(kind, response=final), final


@bp.get("/responses/<response_id:str>")
async def retrieve(request: Request, response_id: str) -> HTTPResponse:
    api_schema.RESPONSE_ID.check(response_id, "response_id")
    response, _items = await _stored(request, response_id)
    return json_response(response)


@bp.delete("/responses/<response_id:str>")
async def delete(request: Request, response_id: str) -> HTTPResponse:
    api_schema.RESPONSE_ID.check(response_id, "response_id")
    if not await request.app.ctx.store.delete(response_id):
        raise ApiError(404, f"no stored response with id {response_id!r}", code="not_found")
    return json_response({"id": response_id, "object": "response", "deleted": True})


def _query(request: Request) -> dict[str, Any]:
    """The input_items query string, checked like a body: each key once, known keys only."""
    raw: dict[str, Any] = {}
    for key, values in request.get_args(keep_blank_values=True).items():
        name = key.removesuffix("[]")
        if name == "include":
            raw.setdefault(name, []).extend(values)
            continue
        if len(values) != 1 or name in raw:
            raise bad_field(name, f"'{name}' may be given once")
        value: Any = values[0]
        if name == "limit" and len(value) <= 20:
            with contextlib.suppress(ValueError):
                value = int(value)  # else the check below names it as not an integer
        raw[name] = value
    checked: dict[str, Any] = api_schema.INPUT_ITEMS_QUERY.check(raw, "")
    return checked


@bp.get("/responses/<response_id:str>/input_items")
async def list_input_items(request: Request, response_id: str) -> HTTPResponse:
    api_schema.RESPONSE_ID.check(response_id, "response_id")
    query = _query(request)
    _response, items = await _stored(request, response_id)
    if query.get("order", "desc") == "desc":
        items = items[::-1]
    start = 0
    if "after" in query:
        ids = [item["id"] for item in items]
        if query["after"] not in ids:
            raise bad_field("after", f"'after' names no input item of {response_id!r}")
        start = ids.index(query["after"]) + 1
    limit = query.get("limit", 20)
    page = items[start : start + limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(items),
        }
    )
