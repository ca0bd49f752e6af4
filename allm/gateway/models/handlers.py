"""The model routes: the list, and what an operator does to the catalog over HTTP.

GET    /v1/models                  every model: state, memory, context, pin, last use (listing.py)
GET    /v1/models/{id}             one of them
POST   /v1/models                  pull from the Hub and serve (``stream``: progress events; ``parts``:
                                   an image model made of several files)
POST   /v1/models/{id}/load        load it now
POST   /v1/models/{id}/unload      unload it from every instance holding it (its pin goes too)
POST   /v1/models/{id}/pin         load it and keep it on every instance serving it: no LRU eviction,
                                   no idle unload; kept across manager restarts (pins.py)
POST   /v1/models/{id}/unpin       let it go again like any other
DELETE /v1/models/{id}             remove a pulled model's files and record (``?force=true``: unload first)

All but the GETs change the server: they need an admin key, or a server with no keys that
listens on loopback (allm/gateway/admin.py). An id may hold slashes (``OWNER/REPO:QUANT``).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response

from allm.gateway import errors, reload
from allm.gateway.admin import require_admin
from allm.gateway.config import Config, ModelConfig
from allm.gateway.errors import ApiError, bad_field
from allm.gateway.fields import json_body
from allm.gateway.models import listing, pulls, schema
from allm.gateway.models.pins import Pins
from allm.gateway.ops import managers_of
from allm.gateway.streaming import SSE, begin, sse
from allm.hub import PullError, Store

bp = Blueprint("models")


@bp.get("/v1/models")
async def models(request: Request) -> HTTPResponse:
    created = await asyncio.to_thread(listing.created_at, request.app.ctx.config)
    return json_response(listing.model_list(request.app, created))


@bp.get("/v1/models/<model_id:path>")
async def one(request: Request, model_id: str) -> HTTPResponse:
    model = _model(request, model_id)
    return json_response(await _object(request, model))


@bp.post("/v1/models")
async def pull(request: Request) -> HTTPResponse | None:
    require_admin(request)
    body = schema.PULL.check(json_body(request), "")
    if "source" not in body and "parts" not in body:
        raise bad_field("source", "'source' is required (or an image model's parts)")
    try:
        job = pulls.start(
            request.app,
            body.get("source"),
            model_id=body.get("id"),
            revision=body.get("revision"),
            modality=body.get("modality"),
            parts=body.get("parts"),
            options=body.get("options"),
        )
    except PullError as exc:
        raise pulls.refusal(exc) from None
    if not body.get("stream"):
        done = await job.outcome()
        return json_response(await _pulled(request, done))
    response = await begin(request, SSE)
    async for step in job.steps():
        await response.send(sse(_step(step), "progress"))
    try:
        done = await job.outcome()
    except ApiError as exc:
        await response.send(_error_event(exc))
    else:
        await response.send(sse(await _pulled(request, done), "model"))
    await response.eof()
    return None


def _step(step: Any) -> dict[str, Any]:
    return {
        "file": step.file,
        "index": step.index,
        "count": step.count,
        "done_bytes": step.done_bytes,
        "total_bytes": step.total_bytes,
        "finished": step.finished,
        "model_done_bytes": step.model_done_bytes,
        "model_total_bytes": step.model_total_bytes,
    }


def _error_event(exc: ApiError) -> str:
    """A pull that fails once its events began: an ``error`` event in OpenAI's error shape."""
    return sse(errors.body(exc.message, exc.type, exc.code, exc.param), "error")


async def _pulled(request: Request, done: pulls.Registered) -> dict[str, Any]:
    """The final answer of a pull: the model as the list shows it, with what the pull said."""
    config: Config = request.app.ctx.config
    model = config.model(done.pulled.model.id) or done.pulled.model.model_config()
    return {**await _object(request, model), "fetched": done.pulled.fetched, "warnings": list(done.warnings)}


@bp.post("/v1/models/<model_id:path>/load")
async def load(request: Request, model_id: str) -> HTTPResponse:
    return await _act(request, model_id, "load")


@bp.post("/v1/models/<model_id:path>/unload")
async def unload(request: Request, model_id: str) -> HTTPResponse:
    return await _act(request, model_id, "unload")


@bp.post("/v1/models/<model_id:path>/pin")
async def pin(request: Request, model_id: str) -> HTTPResponse:
    return await _act(request, model_id, "pin")


@bp.post("/v1/models/<model_id:path>/unpin")
async def unpin(request: Request, model_id: str) -> HTTPResponse:
    return await _act(request, model_id, "unpin")


async def _act(request: Request, model_id: str, action: str) -> HTTPResponse:
    """Load, unload, pin or unpin a model; the answer is the model as the list shows it."""
    require_admin(request)
    model = _model(request, model_id)
    override: dict[str, Any] = {}
    pins: Pins = request.app.ctx.pins
    if action == "load":
        await _call(request, model, action)
        override = {"state": "loaded"}
    elif action == "pin":  # on every instance that serves it; the gateway keeps it (pins.py)
        await _pin_everywhere(request, model)
        pins.add(model.id)
        override = {"state": "loaded", "pinned": True}
    elif action == "unpin":
        pins.drop(model.id)
        for endpoint in _endpoints(request, model):
            await _call(request, model, "unpin", endpoint)
        override = {"pinned": False}
    else:
        pins.drop(model.id)
        if not await _unload(request, model):
            raise ApiError(
                409,
                f"model {model.id!r} is in use by requests running now: unload it once they end",
                code="model_in_use",
            )
        override = {"state": "available", "pinned": False, "memory_bytes": None}
    return json_response({**await _object(request, model), **override})


@bp.delete("/v1/models/<model_id:path>")
async def delete(request: Request, model_id: str) -> HTTPResponse:
    require_admin(request)
    model = _model(request, model_id)
    force = _force(request)
    await remove(request, model, force=force)
    return json_response({"id": model.id, "object": "model", "deleted": True})


async def remove(request: Request, model: ModelConfig, *, force: bool) -> None:
    """Take a pulled model out of the catalog and delete its files: 400 for the configuration's own,
    409 while loaded unless ``force`` (then it is unloaded first)."""
    if model.source is None:
        raise ApiError(
            400,
            f"model {model.id!r} is the configuration's own ([[models]] in its TOML file), not a pulled "
            "one: remove its entry there and reload (SIGHUP)",
            code="model_not_pulled",
        )
    holders = [m["name"] for m in managers_of(request.app) if model.id in m["models"]]
    if holders and not force:
        raise ApiError(
            409,
            f"model {model.id!r} is loaded ({', '.join(holders)}): unload it first "
            f"(POST /v1/models/{model.id}/unload), or delete with ?force=true",
            code="model_loaded",
        )
    request.app.ctx.pins.drop(model.id)
    if holders:
        await _unload(request, model)  # one still in use leaves once its requests end
    await reload.change_models(request.app, lambda models: [m for m in models if m.id != model.id])
    config: Config = request.app.ctx.config
    try:
        await asyncio.to_thread(Store(config.data_dir).remove, model.id)
    except PullError as exc:
        raise pulls.refusal(exc) from None


def _force(request: Request) -> bool:
    raw: dict[str, Any] = {}
    for key, values in request.get_args(keep_blank_values=True).items():
        if len(values) != 1:
            raise bad_field(key, f"'{key}' may be given once")
        raw[key] = values[0]
    return bool(schema.DELETE_QUERY.check(raw, "").get("force") == "true")


def _model(request: Request, model_id: str) -> ModelConfig:
    config: Config = request.app.ctx.config
    model_id = urllib.parse.unquote(model_id)
    model = config.model(model_id)
    if model is None:
        raise ApiError(
            404,
            f"the model {model_id[:256]!r} does not exist; GET /v1/models lists the models served here",
            code="model_not_found",
        )
    return model


async def _object(request: Request, model: ModelConfig) -> dict[str, Any]:
    created = await asyncio.to_thread(listing.created_at, request.app.ctx.config)
    return listing.model_object(model, managers_of(request.app), created)


def _endpoints(request: Request, model: ModelConfig, *, holding: bool = False) -> list[str]:
    """The live instances of the model's modality (``holding``: those whose heartbeat holds it)."""
    return [
        m["endpoint"]
        for m in managers_of(request.app)
        if m["live"] and m["modality"] == model.modality and (not holding or model.id in m["models"])
    ]


async def _call(request: Request, model: ModelConfig, op: str, endpoint: str | None = None) -> Any:
    config: Config = request.app.ctx.config
    return await request.app.ctx.client.call(
        model.modality, op, model=model.id, endpoint=endpoint, timeout_s=config.request_timeout_s
    )


async def _pin_everywhere(request: Request, model: ModelConfig) -> None:
    """Pin the model on each live instance whose catalog holds it (at least one: the first
    refusal is the answer)."""
    endpoints = [
        m.endpoint
        for m in request.app.ctx.client.instances()
        if m.live
        and m.modality == model.modality
        and m.heartbeat is not None
        and model.id in (m.heartbeat.extra.get("catalog") or ())
    ]
    if not endpoints:  # none has said yet: the kernel chooses, and refuses as it would a request
        await _call(request, model, "pin")
        return
    for endpoint in endpoints:
        await _call(request, model, "pin", endpoint)


async def _unload(request: Request, model: ModelConfig) -> bool:
    """Unload the model from each instance holding it; False when one keeps it (in use)."""
    unloaded = True
    for endpoint in _endpoints(request, model, holding=True):
        result = await _call(request, model, "unload", endpoint)
        unloaded &= bool(result.data.get("unloaded"))
    return unloaded
