"""Anthropic's Messages API: its routes, from the checked body to the text manager and back.

    POST /v1/messages                 a message, or Anthropic's server-sent events
    POST /v1/messages/count_tokens    {"input_tokens": N}, the prompt as the model counts it

Claude Code posts to ``/v1/messages?beta=true``: the query is ignored. The body becomes the
same chat turn Chat Completions makes (its tools through the model's own call format and
grammar); ``blocks.py`` converts content both ways, ``events.py`` writes the stream.

A stream opens once the manager's first chunk arrives, so whatever fails before it (a prompt
longer than the context, a full queue) is an HTTP status with no event sent. A first chunk
slower than ``PING_AFTER_S`` (a model loading, a long prompt's prefill) opens the stream
anyway, with ``message_start`` and a ``ping`` every ``PING_EVERY_S`` until it comes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response

from allm.gateway.affinity import conversation
from allm.gateway.anthropic import blocks, schema
from allm.gateway.anthropic.events import FRAMING, PING, Events
from allm.gateway.config import Config
from allm.gateway.fields import json_body, model_for, sampling
from allm.gateway.seal import Sealer, sealer
from allm.gateway.streaming import begin, relay
from allm.kernel.client import Stream
from allm.kernel.codes import AllmError
from allm.kernel.protocol import Chunk

bp = Blueprint("anthropic", url_prefix="/v1")

#: how long a stream waits for the first token before it opens with pings
PING_AFTER_S = 3.0
PING_EVERY_S = 5.0
#: output_config's efforts as the manager takes them
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "xhigh": "high", "max": "high"}
#: thinking budgets up to these many tokens are a low, then a medium effort; more is high
LOW_BUDGET, MEDIUM_BUDGET = 4096, 16384


def effort(payload: dict[str, Any]) -> str | None:
    """The reasoning effort a body asks for: output_config's, else thinking's; None: the model's own."""
    asked = payload.get("output_config", {}).get("effort")
    if asked is not None:
        return EFFORTS[asked]
    thinking = payload.get("thinking")
    if thinking is None or thinking["type"] == "adaptive":
        return None
    if thinking["type"] == "disabled":
        return "low"
    budget = thinking["budget_tokens"]
    return "low" if budget <= LOW_BUDGET else "medium" if budget <= MEDIUM_BUDGET else "high"


def tool_params(payload: dict[str, Any]) -> dict[str, Any]:
    """Custom tools and tool_choice as the manager takes them (Chat Completions' shapes)."""
    out: dict[str, Any] = {}
    if payload.get("tools"):
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": tool["name"],
                    **({"description": tool["description"]} if "description" in tool else {}),
                    "parameters": tool["input_schema"],
                },
            }
            for tool in payload["tools"]
        ]
    choice = payload.get("tool_choice")
    if choice is not None:
        kind = choice["type"]
        if kind == "tool":
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        if choice.get("disable_parallel_tool_use"):
            out["parallel_tool_calls"] = False
    return out


def prompt_params(payload: dict[str, Any], seals: Sealer) -> dict[str, Any]:
    """What shapes the prompt: messages, tools, reasoning effort, output format (count_tokens' too)."""
    params: dict[str, Any] = {"messages": blocks.chat_messages(payload, seals), **tool_params(payload)}
    reasoning = effort(payload)
    if reasoning is not None:
        params["reasoning_effort"] = reasoning
    fmt = payload.get("output_config", {}).get("format")
    if fmt is not None:
        params["response_format"] = {"type": "json_schema", "schema": fmt["schema"]}
    return params


@bp.post("/messages")
async def create(request: Request) -> HTTPResponse | None:
    config: Config = request.app.ctx.config
    client = request.app.ctx.client
    payload = schema.MESSAGES_BODY.check(json_body(request), "")
    model = model_for(config, payload, "text")
    seals = sealer(config.data_dir)
    params = {
        **prompt_params(payload, seals),
        **sampling(payload, model, max_tokens_keys=("max_tokens",)),
    }
    if payload.get("stop_sequences"):
        params["stop"] = payload["stop_sequences"]
    message_id = blocks.new_id("msg")
    display = blocks.display_of(payload)
    affinity = conversation(model.id, params)
    if not payload.get("stream"):
        result = await client.call(
            "text",
            "chat",
            model=model.id,
            params=params,
            timeout_s=config.request_timeout_s,
            affinity=affinity,
        )
        return json_response(blocks.message(message_id, model.id, result.data, seals, display=display))
    events = Events(message_id, model.id, seals, display=display)
    await _stream(
        request,
        client.stream(
            "text",
            "chat",
            model=model.id,
            params=params,
            timeout_s=config.request_timeout_s,
            affinity=affinity,
        ),
        events,
    )
    return None


async def _stream(request: Request, stream: Stream, events: Events) -> None:
    """Run the kernel request as the client's stream: opened at the first chunk, or with pings."""
    async with stream:
        pieces = aiter(stream)
        first: asyncio.Future[Chunk | None] = asyncio.ensure_future(anext(pieces, None))
        try:
            opened = await _open(request, stream, first, events)
        finally:
            first.cancel()  # the client went away while it waited: stop waiting (done: nothing)
        if opened is not None:
            response, head = opened
            await relay(
                response,
                stream,
                pieces,
                feed=events.feed,
                finish=lambda result: events.finish(result.data),
                failed=FRAMING.failed,
                first=head,
            )


async def _open(
    request: Request, stream: Stream, first: asyncio.Future[Chunk | None], events: Events
) -> tuple[Any, str] | None:
    """Answer once the first chunk comes (a kernel error before it is an HTTP error), or open with
    pings when it is slow. Returns the response and what to send first; None: the stream ended."""
    await asyncio.wait({first}, timeout=PING_AFTER_S)
    if first.done():
        opening = first.result()
        response = await begin(request, FRAMING)
        if opening is None:  # a reply with no chunks: it has ended, its usage is known
            assert stream.result is not None
            data = stream.result.data
            return response, events.start(data["usage"]["prompt_tokens"], data.get("cached_tokens", 0))
        opened = events.start(opening.data.get("prompt_tokens", 0), opening.data.get("cached_tokens", 0))
        return response, opened + events.feed(opening.data)
    response = await begin(request, FRAMING)
    await response.send(events.start(0) + PING)  # the final usage says how long the prompt was
    while not (await asyncio.wait({first}, timeout=PING_EVERY_S))[0]:
        await response.send(PING)
    try:
        opening = first.result()
    except AllmError as exc:
        await response.send(FRAMING.failed(exc))
        await response.eof()
        return None
    return response, "" if opening is None else events.feed(opening.data)


@bp.post("/messages/count_tokens")
async def count_tokens(request: Request) -> HTTPResponse:
    config: Config = request.app.ctx.config
    payload = schema.COUNT_TOKENS_BODY.check(json_body(request), "")
    model = model_for(config, payload, "text")
    params = prompt_params(payload, sealer(config.data_dir))
    result = await request.app.ctx.client.call(
        "text", "count", model=model.id, params=params, timeout_s=config.request_timeout_s
    )
    return json_response({"input_tokens": result.data["input_tokens"]})
