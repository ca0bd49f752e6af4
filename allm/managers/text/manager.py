"""The text manager: routes chat, completion and embedding requests to the model's engine.

Settings (from the supervisor)::

    {"models": [{"id", "path", "format"?, "options"?}, ...],
     "memory_budget_bytes": int | None, "idle_unload_s": float | None,
     "load_stall_s": float | None}

Heartbeats carry ``{"loading": {model: {"elapsed_s", "fraction"}}}`` while a
model loads, so the gateway can show it and nobody mistakes a load for a hang.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from allm.kernel.codes import UnsupportedError
from allm.kernel.runtime import ManagerInfo, Reply, RequestContext
from allm.managers.text.detect import Format, detect
from allm.managers.text.gguf_header import read_header
from allm.managers.text.pool import ModelEntry, ModelPool, Plan, Progress

if TYPE_CHECKING:
    from allm.managers.text.safetensors_engine import DirectoryInfo

# Never reach for a model hub: a path that does not exist is an error, not a repo id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("allm.text")

OVERHEAD_BYTES = 96 * 1024 * 1024  # compute buffers and bookkeeping beside weights and cache


def plan_load(entry: ModelEntry) -> Plan:
    """Detect the format, check the files and estimate memory, before any engine runs."""
    detected = detect(entry.path, Format(entry.format) if entry.format else None)
    if detected.format is Format.GGUF:
        from allm.managers.text.llama_engine import LlamaEngine, LlamaOptions, check_gpu_fit, kv_cache_bytes

        header = read_header(detected.path)
        options = LlamaOptions.from_settings(entry.id, entry.options)
        check_gpu_fit(entry.id, header, options)
        estimate = header.file_size + kv_cache_bytes(header, options.n_ctx) + OVERHEAD_BYTES
        # The embedding context, loaded on first use, reserves its own cache then.
        embedder_bytes = kv_cache_bytes(header, options.n_ctx) + OVERHEAD_BYTES
        return Plan(
            estimate,
            lambda progress, reserve: LlamaEngine(
                entry.id, header, options, progress, lambda: reserve(embedder_bytes, "the embedding context")
            ),
        )
    from allm.managers.text.safetensors_engine import (
        SafetensorsEngine,
        check_directory,
        choose_backend,
        kv_cache_bytes_of,
    )

    info = check_directory(detected.path)
    backend = choose_backend(str(entry.options.get("backend", "auto")), info.model_type)
    weights = int(info.weight_bytes * widening(info, backend, entry.options))
    estimate = weights + kv_cache_bytes_of(info, entry.options) + OVERHEAD_BYTES

    def load(progress: Progress, _reserve: object) -> SafetensorsEngine:
        return SafetensorsEngine(entry.id, info, entry.options, progress)

    return Plan(estimate, load)


def widening(info: DirectoryInfo, backend: str, options: Mapping[str, Any]) -> float:
    """How much bigger the weights are in memory than on disk.

    mlx-lm keeps the stored types (MXFP4 included).  transformers loads in
    ``dtype`` (float32 by default on the CPU) and de-quantises MXFP4 first.
    """
    if backend == "mlx":
        return 1.0
    stored = str(info.config.get("torch_dtype") or info.config.get("dtype") or "bfloat16")
    stored_bytes = 0.5 if info.mxfp4 else (4 if stored.endswith("float32") else 2)
    wanted = str(options.get("dtype", "float32"))
    wanted_bytes = 2 if wanted in ("bfloat16", "float16") else (stored_bytes if wanted == "auto" else 4)
    return max(1.0, wanted_bytes / stored_bytes)


class TextManager:
    inline_ops = frozenset({"models"})

    def __init__(self, info: ManagerInfo) -> None:
        settings = info.settings
        entries = [ModelEntry.from_settings(raw) for raw in settings.get("models", [])]
        self.pool = ModelPool(
            {e.id: e for e in entries},
            plan_load,
            budget_bytes=settings.get("memory_budget_bytes"),
            idle_unload_s=settings.get("idle_unload_s"),
            load_stall_s=settings.get("load_stall_s"),
        )

    def models(self) -> tuple[str, ...]:
        return self.pool.loaded()

    def status(self) -> dict[str, Any]:
        return {"loading": self.pool.loading()}

    def close(self) -> None:
        self.pool.close()

    def handle(self, ctx: RequestContext) -> Reply:
        if ctx.op == "models":
            loaded = set(self.pool.loaded())
            listing: list[dict[str, Any]] = [
                {"id": m, "state": "loaded" if m in loaded else "available"} for m in self.pool.catalog
            ]
            return Reply({"models": listing})
        if ctx.op == "unload":
            return Reply({"unloaded": self.pool.unload(ctx.model)})
        if ctx.op not in ("chat", "complete", "embed", "load"):
            raise UnsupportedError(f"the text manager has no operation {ctx.op!r}")
        with self.pool.use(ctx.model, ctx) as engine:
            if ctx.op == "load":
                return Reply({"loaded": ctx.model})
            result: Reply = getattr(engine, ctx.op)(ctx)
            return result


def create(info: ManagerInfo) -> TextManager:
    return TextManager(info)
