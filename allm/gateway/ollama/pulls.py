"""Ollama's model management over allm's pulls: POST /api/pull and DELETE /api/delete.

``/api/pull`` takes Ollama's names of Hub models, ``hf.co/OWNER/REPO:QUANT`` (or ``OWNER/REPO``,
``hf://``…; a ``:latest`` tag means the default quant), pulls them as ``POST /v1/models`` does
(allm/gateway/models/pulls.py) and registers them under the name as given, so the app then
chats with that name. Its answer is Ollama's (docs/api.md, "Pull a Model"): NDJSON lines
``{"status": "pulling manifest"}``, then ``{"status": "pulling <digest>", "digest", "total",
"completed"}`` per file as it comes, then ``verifying sha256 digest``, ``writing manifest``
and ``success``; with ``stream: false`` the last one alone. A refusal known before the
stream (a bad name, no admin key) is an HTTP error; one found later is an ``{"error"}`` line.
``/api/delete`` removes a pulled model, unloading it first (as Ollama does); the
configuration's own models are not deleted here.
"""

from __future__ import annotations

from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic import json as json_response
from sanic.response import empty

from allm.gateway.admin import require_admin
from allm.gateway.bounds import MODEL, NAME
from allm.gateway.errors import ApiError
from allm.gateway.fields import json_body
from allm.gateway.models import handlers as models
from allm.gateway.models import pulls
from allm.gateway.ollama import models as ollama_models
from allm.gateway.ollama.replies import NDJSON, line
from allm.gateway.spec import AnyJson, Bool, Obj, Str
from allm.gateway.streaming import begin
from allm.hub import Progress, PullError
from allm.hub.source import parse_source

bp = Blueprint("ollama_pulls", url_prefix="/api")

_NAMED = {"model": MODEL, "name": Str(max_length=NAME, description="the older name of model")}
PULL = Obj(
    fields={
        **_NAMED,
        "insecure": Bool(description="accepted; the Hub endpoint (HF_ENDPOINT, [hub] endpoint) decides"),
        "stream": Bool(description="false: one line, at the end; default true"),
        "username": AnyJson(description="accepted and unused: a token comes from HF_TOKEN or [hub]"),
        "password": AnyJson(description="accepted and unused"),
    }
)
DELETE = Obj(fields=_NAMED)
FINAL = ("verifying sha256 digest", "writing manifest", "success")


def _name(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not name:
        raise ApiError(400, "model is required", code="invalid_value", param="model")
    return str(name)


@bp.post("/pull")
async def pull(request: Request) -> HTTPResponse | None:
    require_admin(request)
    body = PULL.check(json_body(request), "")
    name = _name(body).removesuffix(ollama_models.LATEST)
    try:
        parse_source(name)  # a name that is no Hub model is refused before the stream
        job = pulls.start(request.app, name)
    except PullError as exc:
        raise pulls.refusal(exc) from None
    if body.get("stream") is False:
        await job.outcome()
        return json_response({"status": "success"})
    response = await begin(request, NDJSON)
    await response.send(line({"status": "pulling manifest"}))
    async for step in job.steps():
        await response.send(line(_progress(step)))
    try:
        await job.outcome()
    except ApiError as exc:
        await response.send(line({"error": exc.message}))
    else:
        await response.send("".join(line({"status": status}) for status in FINAL))
    await response.eof()
    return None


def _progress(step: Progress) -> dict[str, Any]:
    """One file's progress as Ollama's layer progress: its digest (the Hub's sha256, or the git
    blob id of a small file), its size and the bytes done."""
    digest = f"sha256:{step.digest}" if len(step.digest) == 64 else f"sha1:{step.digest}"
    return {
        "status": f"pulling {step.digest[:12]}",
        "digest": digest,
        "total": step.total_bytes,
        "completed": step.done_bytes,
    }


@bp.delete("/delete", ignore_body=False)  # Ollama's DELETE has a body
async def delete(request: Request) -> HTTPResponse:
    require_admin(request)
    model = ollama_models.resolve(request.app.ctx.config, _name(DELETE.check(json_body(request), "")))
    await models.remove(request, model, force=True)
    return empty(status=200)
