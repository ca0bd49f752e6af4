"""The text manager: routes chat, completion and embedding requests to the model's engine.

Settings (from the supervisor)::

    {"models": [{"id", "path", "format"?, "options"?}, ...],
     "memory_budget_bytes": int | None, "idle_unload_s": float | None,
     "load_stall_s": float | None}

Heartbeats carry ``{"loading": {model: {"elapsed_s", "fraction"}}}`` while a
model loads, so the gateway can show it and nobody mistakes a load for a hang.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from allm.kernel.codes import AllmError, LoadFailedError
from allm.kernel.runtime import ManagerInfo
from allm.managers.engines import LLAMA_CPP, MLX_LM, TRANSFORMERS, Engine, ModelReport, Problem
from allm.managers.pool import ModelEntry, Plan, PooledManager, Progress
from allm.managers.text.detect import Format, detect
from allm.managers.text.gguf_header import GGUFHeader, read_header
from allm.managers.text.options import LlamaOptions, llama_problems, safetensors_problems

if TYPE_CHECKING:
    from allm.managers.text.safetensors_engine import DirectoryInfo

# Never reach for a model hub: a path that does not exist is an error, not a repo id.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger("allm.text")

OVERHEAD_BYTES = 96 * 1024 * 1024  # compute buffers and bookkeeping beside weights and cache


@dataclasses.dataclass(frozen=True, slots=True)
class Resolved:
    """A model's files, checked, and the engine that will run them: nothing loaded, nothing imported."""

    format: Format
    engine: Engine
    size_bytes: int
    header: GGUFHeader | None = None  # a GGUF model's
    info: DirectoryInfo | None = None  # a safetensors model's


def _backend_engine(backend: str) -> Engine:
    return MLX_LM if backend == "mlx" else TRANSFORMERS


def resolve(entry: ModelEntry) -> Resolved:
    """Detect the format and check the files; raises the coded error naming what is wrong."""
    detected = detect(entry.path, Format(entry.format) if entry.format else None)
    if detected.format is Format.GGUF:
        header = read_header(detected.path)
        return Resolved(detected.format, LLAMA_CPP, header.file_size, header=header)
    from allm.managers.text.safetensors_engine import check_directory, choose_backend

    info = check_directory(detected.path)
    backend = choose_backend(str(entry.options.get("backend", "auto")), info.model_type)
    return Resolved(detected.format, _backend_engine(backend), info.weight_bytes, info=info)


def option_problems(entry: ModelEntry, fmt: Format) -> list[LoadFailedError]:
    if fmt is Format.GGUF:
        return llama_problems(entry.id, entry.options)
    return safetensors_problems(entry.id, entry.options)


def plan_load(entry: ModelEntry) -> Plan:
    """Check the files, the options and the engine, and estimate memory, before any engine runs."""
    resolved = resolve(entry)
    for error in option_problems(entry, resolved.format):
        raise error
    resolved.engine.require(entry.id)
    if resolved.header is not None:
        from allm.managers.text.llama_engine import LlamaEngine, check_gpu_fit, kv_cache_bytes

        header = resolved.header
        options = LlamaOptions.from_settings(entry.id, entry.options)
        check_gpu_fit(entry.id, header, options)
        # a cache of n_ctx tokens for each of its n_parallel sequences
        kv = options.n_parallel * kv_cache_bytes(header, options.n_ctx)
        estimate = header.file_size + kv + OVERHEAD_BYTES
        # The embedding context, loaded on first use, reserves its own cache then.
        embedder_bytes = kv_cache_bytes(header, options.n_ctx) + OVERHEAD_BYTES
        return Plan(
            estimate,
            lambda progress, reserve: LlamaEngine(
                entry.id, header, options, progress, lambda: reserve(embedder_bytes, "the embedding context")
            ),
        )
    from allm.managers.text.safetensors_engine import SafetensorsEngine, kv_cache_bytes_of

    info = resolved.info
    assert info is not None
    backend = "mlx" if resolved.engine is MLX_LM else "transformers"
    weights = int(info.weight_bytes * widening(info, backend, entry.options))
    estimate = weights + kv_cache_bytes_of(info, entry.options) + OVERHEAD_BYTES

    def load(progress: Progress, _reserve: object) -> SafetensorsEngine:
        return SafetensorsEngine(entry.id, info, entry.options, progress)

    return Plan(estimate, load)


def describe(settings: Mapping[str, Any]) -> ModelReport:
    """What ``allm check`` and ``allm models`` say of one catalog entry: every problem found."""
    entry = ModelEntry.from_settings(settings)
    problems: dict[str, str] = {}  # field → the first problem found there
    fmt = Format(entry.format) if entry.format else None
    if fmt is None and entry.path.suffix.lower() == ".gguf":
        fmt = Format.GGUF
    engine: Engine | None = None
    size: int | None = None
    try:
        resolved = resolve(entry)
        fmt, engine, size = resolved.format, resolved.engine, resolved.size_bytes
    except AllmError as exc:
        problems.setdefault(exc.param or "path", exc.message)
    if fmt is not None:
        for error in option_problems(entry, fmt):
            problems.setdefault(error.param or "options", error.message)
        if engine is None:  # the files could not say; the catalog still names the engine
            engine = LLAMA_CPP if fmt is Format.GGUF else _backend_engine(str(entry.options.get("backend")))
    if engine is not None and not engine.installed():
        problems.setdefault("format", engine.not_installed())
    return ModelReport(
        fmt.value if fmt else None,
        engine,
        size,
        tuple(Problem(field, message.removeprefix(f"{entry.id}: ")) for field, message in problems.items()),
    )


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


class TextManager(PooledManager):
    def __init__(self, info: ManagerInfo) -> None:
        super().__init__(info, plan_load, operations=frozenset({"chat", "complete", "embed"}))


def create(info: ManagerInfo) -> TextManager:
    return TextManager(info)
