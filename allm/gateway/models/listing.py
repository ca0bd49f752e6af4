"""GET /v1/models: OpenAI's model list, each model with its state, memory, context, pin and last use.

The list keeps OpenAI's shape (``object: "list"``, ``data`` of ``{id, object: "model",
created, owned_by}``) and adds allm's fields: ``modality``; ``state`` (``available``,
``downloading`` with its ``fraction``, ``loading``, ``loaded``, or ``unavailable`` while no
manager of its modality is up); ``memory_bytes`` held where it is loaded; ``context_length``
where the catalog says it; ``pinned``; ``last_used`` (Unix seconds a request last finished
with it, as its managers say; None: not since they started); ``source`` (hf.co/… for a
pulled model, None for the configuration's own). Everything comes from the catalog, the
pulled models' records and the managers' heartbeats: nothing is loaded to answer.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from sanic import Sanic

from allm.gateway.config import Config, ModelConfig
from allm.gateway.models.pulls import jobs
from allm.gateway.ollama.models import context_length
from allm.gateway.ops import managers_of, model_state
from allm.hub import Store


def created_at(config: Config) -> dict[str, int]:
    """When each pulled model was pulled, in Unix seconds (blocking: it reads the records)."""
    out = {}
    for pulled in Store(config.data_dir).list():
        try:
            out[pulled.id] = int(datetime.datetime.fromisoformat(pulled.pulled_at).timestamp())
        except ValueError:
            continue
    return out


def model_object(
    model: ModelConfig, managers: list[dict[str, Any]], created: Mapping[str, int]
) -> dict[str, Any]:
    """One catalog model as the list shows it."""
    holders = [m for m in managers if model.id in m["models"]]
    loading = any(model.id in m["loading"] for m in managers)
    live = any(m["live"] and m["modality"] == model.modality for m in managers)
    stats = [m["model_stats"].get(model.id) or {} for m in managers if m["modality"] == model.modality]
    memory = [s["memory_bytes"] for s in stats if isinstance(s.get("memory_bytes"), int)]
    used = [s["last_used_at"] for s in stats if isinstance(s.get("last_used_at"), int | float)]
    owner = model.source.removeprefix("hf.co/").split("/")[0] if model.source else "allm"
    return {
        "id": model.id,
        "object": "model",
        "created": created.get(model.id, 0),
        "owned_by": owner,
        "modality": model.modality,
        "state": model_state(bool(holders), loading, live),
        "memory_bytes": sum(memory) if memory else None,
        "context_length": context_length(model) if model.modality == "text" else None,
        "pinned": any(model.id in m.get("pinned", ()) for m in holders),
        "last_used": int(max(used)) if used else None,
        "source": model.source,
    }


def model_list(app: Sanic[Any, Any], created: Mapping[str, int]) -> dict[str, Any]:
    """The list: the catalog's models, then those being pulled that it does not have yet."""
    config: Config = app.ctx.config
    managers = managers_of(app)
    data = [model_object(m, managers, created) for m in config.models]
    for job in jobs(app).values():
        if config.model(job.model_id) is None:
            data.append(
                {
                    "id": job.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "allm",
                    "state": "downloading",
                    "fraction": round(job.fraction, 4),
                }
            )
    return {"object": "list", "data": data}
