"""Operations and discovery: liveness, readiness, manager status, the model list.

GET /health      the process answers (no auth)
GET /ready       each modality has a manager up and the default text model loads (no auth)
GET /status      each manager instance: pid, state, restarts, last exit and cause, when it is
                 tried again, models loaded and loading (with progress), what runs, queue, memory
GET /metrics     Prometheus's text format (allm/gateway/metrics.py)
(GET /v1/models, each model with its state, is allm/gateway/models/listing.py's.)
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
from allm.kernel.instances import InstanceView
from allm.kernel.supervisor import InstanceStatus

bp = Blueprint("ops")

READY_TIMEOUT_S = 30.0


def manager_status(request: Request) -> list[dict[str, Any]]:
    return managers_of(request.app)


def managers_of(app: Sanic[Any, Any]) -> list[dict[str, Any]]:
    """Each manager instance as /status shows it (and /metrics counts it): those the supervisor
    runs (``allm serve``), then those something else runs (``allm gateway``, another host)."""
    views = {v.endpoint: v for v in app.ctx.client.instances()}
    remotes = getattr(app.ctx, "remotes", [])
    if app.ctx.supervisor is None:
        return [instance_row(spec, views.get(spec.endpoint)) for spec in [*app.ctx.specs, *remotes]]
    kept = [instance_row(s, views.get(s.endpoint), s) for s in app.ctx.supervisor.status()]
    return kept + [instance_row(r, views.get(r.endpoint)) for r in remotes]


def instance_row(
    target: Any, view: InstanceView | None, kept: InstanceStatus | None = None
) -> dict[str, Any]:
    """One manager instance: ``target`` names it (a ManagerSpec, a Remote, or the supervisor's
    status), ``view`` is what the kernel client hears of it, ``kept`` the supervisor's record of a
    process it runs.

    Without a record (supervisord runs it, or another host) the heartbeats say it all: ``state``
    is ``running`` while they come, ``absent`` when none has come for the heartbeat timeout;
    ``restarts`` counts the new processes this gateway has heard, and deaths are a process
    manager's to count (supervisord's log says).
    """
    hb = view.heartbeat if view is not None else None
    live = bool(view and view.live)
    state = kept.state if kept is not None else ("running" if live else "absent")
    extra = hb.extra if hb is not None and state == "running" else {}
    row: dict[str, Any] = {
        "name": target.name,
        "modality": target.modality,
        "instance": target.instance,
        "endpoint": target.endpoint,
        "pid": kept.pid if kept is not None else (hb.pid if hb else None),
        "state": state,
        "live": live,
        "restarts": kept.restarts if kept is not None else (view.restarts_seen if view else 0),
        "last_exit": (kept.last_exit or None) if kept is not None else None,
        "last_code": (kept.last_code or None) if kept is not None else None,
        # its stderr's last lines before that exit
        "last_lines": list(kept.last_lines) if kept is not None else [],
        "deaths": dict(kept.deaths) if kept is not None else {},  # by cause, since the gateway started
        "retry_in_s": kept.retry_in_s if kept is not None else None,
        "models": list(hb.models) if hb else [],
        "loading": extra.get("loading") or {},
        "pinned": extra.get("pinned") or [],
        "model_stats": extra.get("model_stats") or {},
        "running": extra.get("running") or [],
        "active": hb.active if hb else 0,
        "queued": hb.queued if hb else 0,
        "capacity": hb.capacity if hb else 0,
        "memory_bytes": kept.memory_bytes if kept is not None else (hb.memory_bytes if hb else None),
    }
    if kept is None:
        row["heard_s_ago"] = round(view.heard_s_ago, 3) if view and view.heard_s_ago is not None else None
    row["remote"] = kept is None and target.endpoint.startswith("tcp://")
    return row


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


def model_state(loaded: bool, loading: bool, live: bool) -> str:
    """A catalog model's state, as /status and /v1/models show it (``live``: a manager of its
    modality is up, so a request for it would load it)."""
    if loaded:
        return "loaded"
    if loading:
        return "loading"
    return "available" if live else "unavailable"


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
                "state": model_state(bool(holders), loading, live),
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
