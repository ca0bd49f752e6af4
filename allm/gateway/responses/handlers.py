"""The Responses API, the recommended one: its routes, from the checked body to the kernel and back.

    POST   /v1/responses                     a response object, or server-sent events
    GET    /v1/responses/{id}                a stored response
    DELETE /v1/responses/{id}
    GET    /v1/responses/{id}/input_items    the input items a stored response was made from

The request becomes a ``Turn`` (allm/gateway/responses/turn.py); a stream's events are
``Events`` (allm/gateway/responses/events.py), which says their grammar. A stream is
answered once the manager has taken the request and sent its first chunk, so what it
refuses (a prompt past the context, a full queue, an unknown model) is a plain HTTP
error; only what goes wrong while generating travels in the stream (response.failed).

Where a request goes: among equally loaded manager instances, first the one that served
``previous_response_id`` (it holds the conversation's prefix in its cache), then the one
that last took the same conversation (its ``prompt_cache_key``, else its opening messages:
allm/gateway/affinity.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response

from allm.gateway.affinity import conversation
from allm.gateway.config import Config
from allm.gateway.errors import ApiError, bad_field
from allm.gateway.fields import json_body, model_for
from allm.gateway.responses import schema
from allm.gateway.responses.events import Events
from allm.gateway.responses.items import Item, output_items
from allm.gateway.responses.turn import Turn, needs_sealer
from allm.gateway.seal import sealer
from allm.gateway.streaming import open_stream, relay
from allm.kernel.codes import AllmError
from allm.kernel.protocol import Result

bp = Blueprint("responses", url_prefix="/v1")


async def _stored(request: Request, response_id: str, param: str | None = None) -> tuple[Item, list[Item]]:
    """A stored response and its input items, or 404 for an unknown, deleted or expired id."""
    stored = await request.app.ctx.store.get(response_id)
    if stored is None:
        raise ApiError(404, f"no stored response with id {response_id!r}", code="not_found", param=param)
    response, items = stored
    return response, items


async def _turn(request: Request) -> Turn:
    config: Config = request.app.ctx.config
    payload = schema.RESPONSES.check(json_body(request), "")
    model = model_for(config, payload, "text")
    history: list[Item] = []
    previous = payload.get("previous_response_id")
    prefer: list[str | None] = []
    if previous:
        response, items = await _stored(request, previous, "previous_response_id")
        history = items + response["output"]
        # The instance that served it holds the conversation's prefix in its cache.
        prefer.append(await request.app.ctx.store.instance_of(previous))
    turn = Turn(payload, model, history, sealer(config.data_dir) if needs_sealer(payload) else None)
    turn.prefer = tuple(dict.fromkeys(p for p in prefer if p is not None))
    turn.affinity = conversation(model.id, turn.params, payload.get("prompt_cache_key"))
    return turn


@bp.post("/responses")
async def create(request: Request) -> HTTPResponse | None:
    config: Config = request.app.ctx.config
    client = request.app.ctx.client
    turn = await _turn(request)
    if not turn.payload.get("stream"):
        while True:
            try:
                async with client.stream(
                    "text",
                    "chat",
                    model=turn.model,
                    params=turn.params,
                    timeout_s=config.request_timeout_s,
                    stream=False,
                    prefer=turn.prefer,
                    affinity=turn.affinity,
                ) as s:
                    async for _chunk in s:
                        pass
                break
            except AllmError as exc:
                if not (_too_long(exc) and turn.truncate()):
                    raise
        assert s.result is not None
        data = s.result.data
        response = turn.response(
            "completed", output=output_items(data, turn.shown, turn.sealing()), data=data
        )
        if turn.store:
            await request.app.ctx.store.put(response, turn.items, instance=s.endpoint)
        return json_response(response)
    await _stream(request, turn)
    return None


def _too_long(exc: AllmError) -> bool:
    """The manager refused the prompt as longer than the model's context."""
    return exc.reason == "context_length_exceeded"


async def _stream(request: Request, turn: Turn) -> None:
    while True:
        try:
            await _stream_once(request, turn)
            return
        except AllmError as exc:  # raised only before the stream opened: nothing was sent yet
            if not (_too_long(exc) and turn.truncate()):
                raise


async def _stream_once(request: Request, turn: Turn) -> None:
    config: Config = request.app.ctx.config
    events = Events(turn)
    async with request.app.ctx.client.stream(
        "text",
        "chat",
        model=turn.model,
        params=turn.params,
        timeout_s=config.request_timeout_s,
        prefer=turn.prefer,
        affinity=turn.affinity,
    ) as s:

        async def finish(result: Result) -> str:
            tail, final = events.finish(result.data)
            if turn.store:
                try:
                    await request.app.ctx.store.put(final, turn.items, instance=s.endpoint)
                except ApiError as exc:  # the store is down: the stream ends saying so, not cut
                    return events.event("error", code=exc.code, message=exc.message, param=None)
            return tail

        # Nothing is answered before the manager has taken the request: what it refuses is
        # an HTTP error. Then response.created and response.in_progress, with the first chunk.
        response, first_chunk, rest = await open_stream(request, s)
        opening = turn.response("in_progress")
        first = events.event("response.created", response=opening)
        first += events.event("response.in_progress", response=opening)
        if first_chunk is not None:
            first += events.feed(first_chunk.data)
        await relay(response, s, rest, first=first, feed=events.feed, finish=finish, failed=events.failed)


@bp.get("/responses/<response_id:str>")
async def retrieve(request: Request, response_id: str) -> HTTPResponse:
    schema.RESPONSE_ID.check(response_id, "response_id")
    response, _items = await _stored(request, response_id)
    return json_response(response)


@bp.delete("/responses/<response_id:str>")
async def delete(request: Request, response_id: str) -> HTTPResponse:
    schema.RESPONSE_ID.check(response_id, "response_id")
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
    checked: dict[str, Any] = schema.INPUT_ITEMS_QUERY.check(raw, "")
    return checked


@bp.get("/responses/<response_id:str>/input_items")
async def list_input_items(request: Request, response_id: str) -> HTTPResponse:
    schema.RESPONSE_ID.check(response_id, "response_id")
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
