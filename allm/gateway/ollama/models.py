"""Ollama's view of the catalog: model names with tags, and the details /api/tags, /api/show and /api/ps give.

Everything here is what allm knows without loading a model: the catalog entry (its id,
path, format, options and sampling defaults), the file on disk (size, time) and the
managers' heartbeats (what is loaded, the memory it holds). What only the model's file
could say (family, parameter count, quantization, chat template) is left empty, never
guessed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from allm.catalog_names import GGUF
from allm.gateway.config import Config, ModelConfig
from allm.gateway.errors import ApiError

#: the tag a name without one has, as in Ollama
LATEST = ":latest"
#: the context a GGUF model is served with when its catalog entry sets no n_ctx (the text manager's
#: DEFAULT_N_CTX, allm/managers/text/options.py; the gateway may not import a manager)
GGUF_DEFAULT_N_CTX = 4096
#: Go's zero time: what Ollama writes for a time it does not know
UNKNOWN_TIME = "0001-01-01T00:00:00Z"
#: what a text model can do through this API, whatever its file: chat and complete (tools included:
#: a model without tool syntax of its own gets allm's generic one) and embed
CAPABILITIES = ("completion", "tools", "embedding")
#: how far Ollama puts expires_at of a model kept loaded forever (Go's largest duration)
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)


def timestamp(when: datetime) -> str:
    """A time as Ollama's JSON writes it (RFC 3339, UTC)."""
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def now_text() -> str:
    return timestamp(datetime.now(UTC))


def display_name(model: ModelConfig) -> str:
    """The model's name in Ollama's model:tag form: ``ID:latest``, unless the id has a tag of its own."""
    return model.id if ":" in model.id else model.id + LATEST


def text_models(config: Config) -> list[ModelConfig]:
    """The models this API serves: the catalog's text models."""
    return [m for m in config.models if m.modality == "text"]


def resolve(config: Config, name: str) -> ModelConfig:
    """The text model a request names: its id, or its id with ``:latest``; else Ollama's 404."""
    for candidate in (name, name.removesuffix(LATEST)):
        model = config.model(candidate)
        if model is not None and model.modality == "text":
            return model
    raise ApiError(404, f"model '{name[:256]}' not found", code="model_not_found", param="model")


def context_length(model: ModelConfig) -> int | None:
    """The context the model is served with, where allm's settings say it: None when only its file could."""
    n_ctx = model.options.get("n_ctx")
    if isinstance(n_ctx, int) and not isinstance(n_ctx, bool):
        return n_ctx
    return GGUF_DEFAULT_N_CTX if model_format(model) == GGUF else None


def model_format(model: ModelConfig) -> str:
    """The catalog's format, or gguf for a .gguf file; "" where only the manager's look at it can say."""
    if model.format:
        return model.format
    return GGUF if model.path.lower().endswith(".gguf") else ""


def on_gpu(model: ModelConfig) -> bool:
    """Whether the catalog's options put the model on a GPU (llama.cpp layers, ONNX's provider)."""
    layers = model.options.get("n_gpu_layers", 0)
    return bool(layers != 0 or model.options.get("execution_provider", "cpu") != "cpu")


@dataclasses.dataclass(frozen=True, slots=True)
class OnDisk:
    """A model's files as the gateway's host sees them (nothing, where they are another host's)."""

    size_bytes: int
    modified: datetime | None

    @classmethod
    def of(cls, path: str) -> OnDisk:
        """Read the file system: a blocking call, for a worker thread."""
        root = Path(path)
        try:
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            stats = [f.stat() for f in files]
        except OSError:
            return cls(0, None)
        if not stats:
            return cls(0, None)
        newest = max(s.st_mtime for s in stats)
        return cls(sum(s.st_size for s in stats), datetime.fromtimestamp(newest, UTC))


def on_disk(models: Iterable[ModelConfig]) -> dict[str, OnDisk]:
    """Each model's files, by id (blocking: run it in a thread)."""
    return {m.id: OnDisk.of(m.path) for m in models}


def digest(model: ModelConfig, disk: OnDisk) -> str:
    """A sha256 that names this catalog entry and its files' size and time: it changes when either
    does. Not a hash of the file's bytes, which would mean reading gigabytes."""
    modified = disk.modified.timestamp() if disk.modified else 0
    facts = [model.id, model.path, model.format, dict(model.options), disk.size_bytes, modified]
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def details(model: ModelConfig) -> dict[str, Any]:
    """Ollama's ModelDetails, as far as the catalog says."""
    out: dict[str, Any] = {
        "parent_model": "",
        "format": model_format(model),
        "family": "",
        "families": None,
        "parameter_size": "",
        "quantization_level": "",
    }
    n_ctx = context_length(model)
    if n_ctx is not None:
        out["context_length"] = n_ctx
    return out


def listed(model: ModelConfig, disk: OnDisk) -> dict[str, Any]:
    """A model as /api/tags lists it."""
    name = display_name(model)
    return {
        "name": name,
        "model": name,
        "modified_at": timestamp(disk.modified) if disk.modified else UNKNOWN_TIME,
        "size": disk.size_bytes,
        "digest": digest(model, disk),
        "details": details(model),
        "capabilities": list(CAPABILITIES),
    }


def parameters(model: ModelConfig) -> dict[str, Any]:
    """The Modelfile parameters allm knows of the model: its context and its catalog's sampling defaults."""
    out: dict[str, Any] = {}
    n_ctx = context_length(model)
    if n_ctx is not None:
        out["num_ctx"] = n_ctx
    return {**out, **model.defaults}


def shown(model: ModelConfig, disk: OnDisk) -> dict[str, Any]:
    """A model as /api/show describes it."""
    params = parameters(model)
    lines = [f"{key:<30} {value!r}" for key, value in params.items()]
    modelfile = [
        f'# Modelfile of allm\'s catalog entry "{model.id}"',
        f"FROM {model.path}",
        *(f"PARAMETER {key} {value!r}" for key, value in params.items()),
    ]
    n_ctx = context_length(model)
    return {
        "modelfile": "\n".join(modelfile) + "\n",
        "parameters": "\n".join(lines),
        "details": details(model),
        # the context allm serves the model with, under allm's own key: the architecture's
        # (llama.context_length, its training context) is the file's to say
        "model_info": {} if n_ctx is None else {"allm.context_length": n_ctx},
        "capabilities": list(CAPABILITIES),
        "modified_at": timestamp(disk.modified) if disk.modified else UNKNOWN_TIME,
    }


def _unload_in_s(stats: dict[str, Any], model_id: str, idle_unload_s: float | None) -> float | None:
    """Seconds until a manager unloads the model if unused (its heartbeat says); None: never."""
    row = stats.get(model_id) or {}
    if "unload_in_s" in row:  # a manager of this version says it
        left = row["unload_in_s"]
        return None if left is None else float(left)
    return idle_unload_s


def running(
    model: ModelConfig, disk: OnDisk, managers: list[dict[str, Any]], idle_unload_s: float | None
) -> dict[str, Any] | None:
    """A model as /api/ps lists it, from the heartbeats of the instances holding it; None when none does."""
    holders = [m for m in managers if model.id in m["models"]]
    if not holders:
        return None
    size = sum(_memory(m["model_stats"], model.id) for m in holders)
    # when its managers would unload it, idle (their keep_alive or idle_unload_s); the last of them
    left = [_unload_in_s(m["model_stats"], model.id, idle_unload_s) for m in holders]
    expires = datetime.now(UTC) + (
        FOREVER if any(s is None for s in left) else timedelta(seconds=max(s for s in left if s is not None))
    )
    name = display_name(model)
    return {
        "name": name,
        "model": name,
        "size": size,
        "digest": digest(model, disk),
        "details": details(model),
        "expires_at": timestamp(expires),
        "size_vram": size if on_gpu(model) else 0,
        "context_length": context_length(model) or 0,
    }


def _memory(stats: Mapping[str, Any], model_id: str) -> int:
    held = stats.get(model_id, {}).get("memory_bytes")
    return held if isinstance(held, int) else 0


def holding(managers: list[dict[str, Any]], model_id: str) -> list[str]:
    """The endpoints of the instances that hold the model now, as their heartbeats say."""
    return [m["endpoint"] for m in managers if model_id in m["models"] and m["live"]]
