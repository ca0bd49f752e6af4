"""Ollama's API over allm's text models: its routes, from the checked body to the kernel and back.

GET  /api/version      {"version"}: the Ollama release whose API this follows (clients compare it)
GET  /api/tags         the catalog's text models, as ID:latest
POST /api/show         one model's details, parameters, context and capabilities
GET  /api/ps           the models loaded now, with their memory and when they unload
POST /api/chat         a chat turn: NDJSON lines (stream, the default) or one object
POST /api/generate     a completion of a prompt, through the chat template unless raw
POST /api/embed        embeddings of one input or several
POST /api/embeddings   the older shape: one prompt, one embedding

Anything known before the answer begins (an unknown model, a bad field, a prompt longer
than the context, a full queue) is an HTTP error before any line: the model is made ready,
and the stream opens on the manager's first chunk (``streaming.pump``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic import json as json_response

from allm.gateway.affinity import conversation
from allm.gateway.config import Config, ModelConfig
from allm.gateway.fields import json_body
from allm.gateway.ollama import models, schema
from allm.gateway.ollama.replies import NDJSON, ChatReply, Clock, GenerateReply, Reply
from allm.gateway.ollama.turn import chat_params, check_context, generate_params
from allm.gateway.ops import managers_of
from allm.gateway.streaming import pump
from allm.kernel.codes import AllmError
from allm.kernel.protocol import Result

log = logging.getLogger("allm.gateway")

bp = Blueprint("ollama", url_prefix="/api")

#: The Ollama release whose API (ollama/ollama api/types.go, server/routes.go) this follows. Clients
#: compare it with the least they need (VS Code's Copilot 0.6.4, Continue 0.6.5): allm's own
#: version number would read as an Ollama far too old.
OLLAMA_VERSION = "0.32.15"
#: how long an unload may take once the answer has gone (it frees memory; nothing waits on it)
UNLOAD_TIMEOUT_S = 60.0
#: what Ollama's embed answer counts (nothing is generated)
EMBED_METRICS = ("total_duration", "load_duration", "prompt_eval_count")
#: unloads running after their answers (keep_alive 0), held so that they run to the end
_unloads: set[asyncio.Task[None]] = set()


@bp.get("/version")
async def version(request: Request) -> HTTPResponse:
    return json_response({"version": OLLAMA_VERSION})


@bp.get("/tags")
async def tags(request: Request) -> HTTPResponse:
    listed = models.text_models(request.app.ctx.config)
    disks = await asyncio.to_thread(models.on_disk, listed)
    return json_response({"models": [models.listed(m, disks[m.id]) for m in listed]})


@bp.post("/show")
async def show(request: Request) -> HTTPResponse:
    payload = schema.SHOW.check(json_body(request), "")
    model = models.resolve(request.app.ctx.config, payload.get("model") or payload["name"])
    disk = await asyncio.to_thread(models.OnDisk.of, model.path)
    return json_response(models.shown(model, disk))


@bp.get("/ps")
async def ps(request: Request) -> HTTPResponse:
    config: Config = request.app.ctx.config
    managers = managers_of(request.app)
    listed = [m for m in models.text_models(config) if models.holding(managers, m.id)]
    disks = await asyncio.to_thread(models.on_disk, listed)
    idle_unload_s = config.modality("text").idle_unload_s
    rows = [models.running(m, disks[m.id], managers, idle_unload_s) for m in listed]
    shown = sorted((r for r in rows if r is not None), key=lambda r: r["expires_at"], reverse=True)
    return json_response({"models": shown})


@bp.post("/chat")
async def chat(request: Request) -> HTTPResponse | None:
    clock = Clock()
    payload = schema.CHAT.check(json_body(request), "")
    model = models.resolve(request.app.ctx.config, payload["model"])
    reply = _reply(ChatReply, payload)
    if not payload.get("messages"):
        check_context(payload.get("options", {}), model)
        return await _load_only(request, model, reply, payload)
    params = chat_params(payload, model)
    return await _answer(
        request, model=model, op="chat", params=params, reply=reply, payload=payload, clock=clock
    )


@bp.post("/generate")
async def generate(request: Request) -> HTTPResponse | None:
    clock = Clock()
    payload = schema.GENERATE.check(json_body(request), "")
    model = models.resolve(request.app.ctx.config, payload["model"])
    reply = _reply(GenerateReply, payload)
    if not payload.get("prompt"):
        check_context(payload.get("options", {}), model)
        return await _load_only(request, model, reply, payload)
    op, params = generate_params(payload, model)
    return await _answer(
        request, model=model, op=op, params=params, reply=reply, payload=payload, clock=clock
    )


@bp.post("/embed")
async def embed(request: Request) -> HTTPResponse:
    clock = Clock()
    payload = schema.EMBED.check(json_body(request), "")
    model = models.resolve(request.app.ctx.config, payload["model"])
    check_context(payload.get("options", {}), model)
    inputs = payload.get("input", [])
    if isinstance(inputs, str):
        inputs = [inputs] if inputs else []
    try:
        await _ready(request, model, clock)
        if not inputs:  # as Ollama: the model is loaded, nothing is embedded
            return json_response({"model": payload["model"], "embeddings": []})
        result = await _embeddings(request, model, inputs, clock, _kept(payload))
        dimensions = payload.get("dimensions")
        return json_response(
            {
                "model": payload["model"],
                "embeddings": [_shortened(v, dimensions) for v in result.data["embeddings"]],
                **{k: v for k, v in clock.metrics(result.data["usage"]).items() if k in EMBED_METRICS},
            }
        )
    finally:
        _unload_if_asked(request.app, model, payload)


@bp.post("/embeddings")
async def embeddings(request: Request) -> HTTPResponse:
    clock = Clock()
    payload = schema.EMBEDDINGS.check(json_body(request), "")
    model = models.resolve(request.app.ctx.config, payload["model"])
    check_context(payload.get("options", {}), model)
    try:
        await _ready(request, model, clock)
        if not payload.get("prompt"):  # as Ollama: the model is loaded, nothing is embedded
            return json_response({"embedding": []})
        result = await _embeddings(request, model, [payload["prompt"]], clock, _kept(payload))
        return json_response({"embedding": result.data["embeddings"][0]})
    finally:
        _unload_if_asked(request.app, model, payload)


def _reply(kind: type[Reply], payload: dict[str, Any]) -> Reply:
    """The answer's shape: named as the request named the model, reasoning shown unless ``think: false``."""
    return kind(
        payload["model"], thinking=payload.get("think") is not False, logprobs=bool(payload.get("logprobs"))
    )


def _shortened(vector: list[float], dimensions: int | None) -> list[float]:
    """The first ``dimensions`` values, normalized again (as Ollama's ``dimensions`` does)."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    kept = vector[:dimensions]
    norm = math.sqrt(sum(x * x for x in kept)) or 1.0
    return [x / norm for x in kept]


async def _embeddings(
    request: Request, model: ModelConfig, inputs: list[str], clock: Clock, kept: dict[str, Any]
) -> Result:
    config: Config = request.app.ctx.config
    result: Result = await request.app.ctx.client.call(
        "text",
        "embed",
        model=model.id,
        params={"input": inputs, **kept},
        timeout_s=clock.left_s(config.request_timeout_s),
    )
    return result


def _holders(app: Sanic[Any, Any], model_id: str) -> list[str]:
    """The live instances whose heartbeat says they hold the model."""
    return [
        view.endpoint
        for view in app.ctx.client.instances()
        if view.live and view.heartbeat is not None and model_id in view.heartbeat.models
    ]


async def _ready(request: Request, model: ModelConfig, clock: Clock) -> None:
    """Load the model unless an instance holds it already, and note when it is ready.

    The load is asked for on its own so that its time is known (load_duration) and a model
    that cannot load answers before any line; a model held already costs no second request.
    """
    if not _holders(request.app, model.id):
        config: Config = request.app.ctx.config
        await request.app.ctx.client.call("text", "load", model=model.id, timeout_s=config.request_timeout_s)
    clock.ready()


async def _load_only(
    request: Request, model: ModelConfig, reply: Reply, payload: dict[str, Any]
) -> HTTPResponse:
    """A request with nothing to answer loads the model, or with keep_alive 0 unloads it (Ollama's way)."""
    if payload.get("keep_alive") == 0:
        await _unload(request.app, model.id, None)
        return json_response(reply.loaded("unload"))
    kept = _kept(payload)
    if kept:  # loaded now, or already: either way it is kept as long as asked from now on
        config: Config = request.app.ctx.config
        await request.app.ctx.client.call(
            "text", "load", model=model.id, params=kept, timeout_s=config.request_timeout_s
        )
    else:
        await _ready(request, model, Clock())
    return json_response(reply.loaded("load"))


def _kept(payload: dict[str, Any]) -> dict[str, Any]:
    """keep_alive other than 0, as the manager's ``keep_alive_s`` (negative: never unloaded)."""
    keep_alive = payload.get("keep_alive")
    return {} if keep_alive is None or keep_alive == 0 else {"keep_alive_s": keep_alive}


async def _answer(
    request: Request,
    *,
    model: ModelConfig,
    op: str,
    params: dict[str, Any],
    reply: Reply,
    payload: dict[str, Any],
    clock: Clock,
) -> HTTPResponse | None:
    """Run a chat or completion and answer it: one object, or NDJSON lines as the chunks come."""
    config: Config = request.app.ctx.config
    served: str | None = None
    try:
        await _ready(request, model, clock)
        # Streamed from the manager either way: the first chunk's time is the prompt's evaluation's end.
        kernel = request.app.ctx.client.stream(
            "text",
            op,
            model=model.id,
            params={**params, **_kept(payload)},
            timeout_s=clock.left_s(config.request_timeout_s),
            affinity=conversation(model.id, params) if op == "chat" else None,
        )
        if not payload.get("stream", True):
            async with kernel as s:
                async for _chunk in s:
                    clock.piece()
            served = s.endpoint
            assert s.result is not None
            return json_response(reply.whole(s.result.data, clock.metrics(s.result.data["usage"])))

        def feed(data: dict[str, Any]) -> str:
            clock.piece()
            return reply.feed(data)

        def finish(result: Result) -> str:
            return reply.finish(result.data, clock.metrics(result.data["usage"]))

        try:
            await pump(request, kernel, feed=feed, finish=finish, framing=NDJSON)
        finally:
            served = kernel.endpoint
        return None
    finally:
        _unload_if_asked(request.app, model, payload, served)


def _unload_if_asked(
    app: Sanic[Any, Any], model: ModelConfig, payload: dict[str, Any], served: str | None = None
) -> None:
    """keep_alive 0: unload the model once the answer has gone, without keeping the client waiting."""
    if payload.get("keep_alive") != 0:
        return
    task = asyncio.get_running_loop().create_task(_unload_quietly(app, model.id, served))
    _unloads.add(task)
    task.add_done_callback(_unloads.discard)


async def _unload_quietly(app: Sanic[Any, Any], model_id: str, served: str | None) -> None:
    try:
        await _unload(app, model_id, served, timeout_s=UNLOAD_TIMEOUT_S)
    except AllmError as exc:
        log.warning("keep_alive 0: unloading %s failed: %s", model_id, exc.message)


async def _unload(
    app: Sanic[Any, Any], model_id: str, served: str | None, *, timeout_s: float | None = None
) -> None:
    """Unload the model from each instance holding it (and the one that served, which may not have
    said so yet); an instance where another request still uses it keeps it."""
    endpoints = set(_holders(app, model_id))
    if served is not None:
        endpoints.add(served)
    config: Config = app.ctx.config
    for endpoint in sorted(endpoints):
        await app.ctx.client.call(
            "text",
            "unload",
            model=model_id,
            endpoint=endpoint,
            timeout_s=timeout_s or config.request_timeout_s,
        )
