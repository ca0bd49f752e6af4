"""Operations and discovery: liveness, readiness, manager status, the model list.

GET /health      the process answers (no auth)
GET /ready       each modality has a manager up and the default text model loads (no auth)
GET /status      each manager instance: pid, state, restarts, last exit and cause, when it is
                 tried again, models loaded and loading (with progress), what runs, queue, memory
GET /metrics     Prometheus's text format (allm/gateway/metrics.py)
GET /v1/models   each catalog model with its modality and state (loaded, loading, available, unavailable)
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic import json as json_response
from sanic.response import raw

from allm import __version__
from allm.gateway.config import Config
from allm.kernel.codes import AllmError

bp = Blueprint("ops")

READY_TIMEOUT_S = 30.0


def manager_status(request: Request) -> list[dict[str, Any]]:
    return managers_of(request.app)


def managers_of(app: Sanic[Any, Any]) -> list[dict[str, Any]]:
    """Each manager instance as /status shows it (and /metrics counts it)."""
    remotes = getattr(app.ctx, "remotes", [])
    if app.ctx.supervisor is None:
        return heard_status(app, [*app.ctx.specs, *remotes])
    views = {v.endpoint: v for v in app.ctx.client.instances()}
    out = []
    for s in app.ctx.supervisor.status():
        view = views.get(s.endpoint)
        hb = view.heartbeat if view is not None else None
        extra = hb.extra if hb is not None and s.state == "running" else {}
        out.append(
            {
                "name": s.name,
                "modality": s.modality,
                "instance": s.instance,
                "endpoint": s.endpoint,
                "pid": s.pid,
                "state": s.state,
                "live": bool(view and view.live),
                "restarts": s.restarts,
                "last_exit": s.last_exit or None,
                "last_code": s.last_code or None,
                "last_lines": list(s.last_lines),  # its stderr's last lines before that exit
                "deaths": dict(s.deaths),  # by cause, since the gateway started
                "retry_in_s": s.retry_in_s,
                "models": list(hb.models) if hb else [],
                "loading": extra.get("loading") or {},
                "model_stats": extra.get("model_stats") or {},
                "running": extra.get("running") or [],
                "active": hb.active if hb else 0,
                "queued": hb.queued if hb else 0,
                "capacity": hb.capacity if hb else 0,
                "memory_bytes": s.memory_bytes,
                "remote": False,
            }
        )
    return out + heard_status(app, remotes)


def heard_status(app: Sanic[Any, Any], targets: list[Any]) -> list[dict[str, Any]]:
    """Managers something else runs (``allm gateway``): what their heartbeats say.

    ``state`` is ``running`` while heartbeats come, ``absent`` when none has come for the
    heartbeat timeout; ``restarts`` counts the new processes this gateway has heard.
    """
    views = {v.endpoint: v for v in app.ctx.client.instances()}
    out = []
    for spec in targets:  # ManagerSpec (run by supervisord) or Remote (another host)
        view = views.get(spec.endpoint)
        hb = view.heartbeat if view is not None else None
        live = bool(view and view.live)
        extra = hb.extra if hb is not None and live else {}
        out.append(
            {
                "name": spec.name,
                "modality": spec.modality,
                "instance": spec.instance,
                "endpoint": spec.endpoint,
                "pid": hb.pid if hb else None,
                "state": "running" if live else "absent",
                "live": live,
                "restarts": view.restarts_seen if view else 0,
                "last_exit": None,
                "last_code": None,
                "last_lines": [],
                "deaths": {},  # a process manager's to count: supervisord's log says
                "retry_in_s": None,
                "models": list(hb.models) if hb else [],
                "loading": extra.get("loading") or {},
                "model_stats": extra.get("model_stats") or {},
                "running": extra.get("running") or [],
                "active": hb.active if hb else 0,
                "queued": hb.queued if hb else 0,
                "capacity": hb.capacity if hb else 0,
                "memory_bytes": hb.memory_bytes if hb else None,
                "heard_s_ago": round(view.heard_s_ago, 3) if view and view.heard_s_ago is not None else None,
                "remote": spec.endpoint.startswith("tcp://"),
            }
        )
    return out


@bp.get("/health")
async def health(request: Request) -> HTTPResponse:
    return json_response({"status": "ok"})


@bp.get("/ready")
async def ready(request: Request) -> HTTPResponse:
    config: Config = request.app.ctx.config
    managers = manager_status(request)
    # Ready while each modality has an instance up: one host of several down is routed around.
    modalities = {m["modality"] for m in managers}
    up = {m["modality"] for m in managers if m["live"]}
    if modalities - up:
        down = [m["name"] for m in managers if not m["live"]]
        return json_response({"status": "not_ready", "reason": f"managers not up: {down}"}, status=503)
    default = next((m for m in config.models if m.modality == "text"), None)
    if default is not None:
        try:
            await request.app.ctx.client.call("text", "load", model=default.id, timeout_s=READY_TIMEOUT_S)
        except AllmError as exc:
            reason = f"default model {default.id} does not load: {exc.message}"
            return json_response({"status": "not_ready", "reason": reason}, status=503)
    return json_response({"status": "ready"})


@bp.get("/status")
async def status(request: Request) -> HTTPResponse:
    app = request.app
    managers = manager_status(request)
    return json_response(
        {
            "server": {
                "version": __version__,
                "mode": "serve" if app.ctx.supervisor is not None else "gateway",
                "uptime_s": round(time.monotonic() - app.ctx.started_at, 1),
                "in_flight": app.ctx.metrics.serving,
                "draining": app.ctx.draining,
                "reload": app.ctx.last_reload,
            },
            "managers": managers,
            "models": model_rows(request.app.ctx.config, managers, app.ctx.metrics.model_activity()),
        }
    )


def model_rows(
    config: Config, managers: list[dict[str, Any]], activity: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each catalog model: its state, the instances holding it, its memory and its traffic."""
    rows = []
    for model in config.models:
        holders = [m for m in managers if model.id in m["models"]]
        loading = any(model.id in m["loading"] for m in managers)
        live = any(m["live"] and m["modality"] == model.modality for m in managers)
        memory = [
            m["model_stats"].get(model.id, {}).get("memory_bytes")
            for m in holders
            if m["model_stats"].get(model.id, {}).get("memory_bytes") is not None
        ]
        seen = activity.get(model.id, {})
        rows.append(
            {
                "id": model.id,
                "modality": model.modality,
                "state": "loaded"
                if holders
                else "loading"
                if loading
                else ("available" if live else "unavailable"),
                "managers": [m["name"] for m in holders],
                "memory_bytes": sum(memory) if memory else None,
                "requests": seen.get("requests", 0),
                "tokens_out": seen.get("tokens_out", 0),
                "tokens_per_s": seen.get("tokens_per_s", 0.0),
            }
        )
    return rows


@bp.get("/metrics")
async def scrape(request: Request) -> HTTPResponse:
    return raw(generate_latest(request.app.ctx.metrics.registry), content_type=CONTENT_TYPE_PLAIN_0_0_4)


@bp.get("/v1/models")
async def models(request: Request) -> HTTPResponse:
    config: Config = request.app.ctx.config
    loaded: set[str] = set()
    loading: set[str] = set()
    live: set[str] = set()
    for m in manager_status(request):
        loaded.update(m["models"])
        loading.update(m["loading"])
        if m["live"]:
            live.add(m["modality"])
    data = [
        {
            "id": m.id,
            "object": "model",
            "created": 0,
            "owned_by": "allm",
            "modality": m.modality,
            "state": "loaded"
            if m.id in loaded
            else "loading"
            if m.id in loading
            else ("available" if m.modality in live else "unavailable"),
        }
        for m in config.models
    ]
    return json_response({"object": "list", "data": data})
