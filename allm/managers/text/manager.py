"""The text manager: routes chat, completion and embedding requests to the model's engine.

Settings (from the supervisor)::

    {"models": [{"id", "path", "format"?, "options"?}, ...], "cache_dir": str,
     "memory_budget_bytes": int | None, "idle_unload_s": float | None,
     "load_stall_s": float | None}

Heartbeats carry ``{"loading": {model: {"elapsed_s", "fraction"}}}`` while a
model loads, so the gateway can show it and nobody mistakes a load for a hang.
A safetensors model on the onnx backend is converted once into ``cache_dir``
by the load that first needs it (onnx_engine.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allm.kernel.codes import AllmError, CancelledError, DeadlineError, LoadFailedError
from allm.kernel.contract import ManagerInfo, Reply, RequestContext
from allm.managers.engines import LLAMA_CPP, MLX_LM, ONNX_GENAI, TRANSFORMERS, Engine
from allm.managers.files.gguf import GGUFHeader
from allm.managers.pool import ModelEntry, Plan, PooledManager, Progress
from allm.managers.report import ModelReport, Problems
from allm.managers.text.detect import Format, detect, read_header
from allm.managers.text.options import (
    LlamaOptions,
    OnnxOptions,
    llama_problems,
    onnx_problems,
    safetensors_problems,
)

if TYPE_CHECKING:
    from allm.managers.text.safetensors_engine import DirectoryInfo, SafetensorsEngine

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
    info: DirectoryInfo | None = None  # a safetensors or ONNX GenAI model's


def _backend_engine(backend: str) -> Engine:
    return {"mlx": MLX_LM, "onnx": ONNX_GENAI}.get(backend, TRANSFORMERS)


_serving = threading.local()  # the request this worker thread serves, for a conversion to watch


def _stop_if_asked() -> None:
    """Raise CANCELLED or TIMEOUT if the request this thread serves should stop.

    A conversion polls it while its builder runs; it reads cancel and deadline without
    counting as progress (``ctx.check()`` would), so a stuck builder still looks stuck.
    """
    ctx: RequestContext | None = getattr(_serving, "ctx", None)
    if ctx is None:
        return
    if ctx.cancelled:
        raise CancelledError("request cancelled")
    left = ctx.time_left_s()
    if left is not None and left <= 0:
        raise DeadlineError("request passed its deadline")


def resolve(entry: ModelEntry) -> Resolved:
    """Detect the format and check the files; raises the coded error naming what is wrong."""
    detected = detect(entry.path, Format(entry.format) if entry.format else None)
    if detected.format is Format.GGUF:
        header = read_header(detected.path)
        return Resolved(detected.format, LLAMA_CPP, header.file_size, header=header)
    if detected.format is Format.ONNX:
        from allm.managers.text.onnx_engine import check_genai_directory

        info = check_genai_directory(detected.path)
        return Resolved(detected.format, ONNX_GENAI, info.weight_bytes, info=info)
    from allm.managers.text.safetensors_engine import check_directory, choose_backend

    info = check_directory(detected.path)
    backend = choose_backend(str(entry.options.get("backend", "auto")), info.model_type)
    return Resolved(detected.format, _backend_engine(backend), info.weight_bytes, info=info)


def option_problems(entry: ModelEntry, fmt: Format) -> list[LoadFailedError]:
    if fmt is Format.GGUF:
        return llama_problems(entry.id, entry.options)
    if fmt is Format.ONNX:
        return onnx_problems(entry.id, entry.options)
    return safetensors_problems(entry.id, entry.options)


def plan_load(
    entry: ModelEntry,
    cache_dir: Path | None = None,
    entry_of: Callable[[str], ModelEntry | None] = lambda _id: None,
) -> Plan:
    """Check the files, the options and the engine, and estimate memory, before any engine runs.

    ``cache_dir``: where a model the onnx backend converts is kept (none: it cannot be).
    ``entry_of``: the catalog's entry of a model id (a draft model is another model's).
    """
    resolved = resolve(entry)
    for error in option_problems(entry, resolved.format):
        raise error
    resolved.engine.require(entry.id)
    if resolved.header is not None:
        from allm.managers.text.llama_engine import LlamaEngine
        from allm.managers.text.llama_load import (
            check_cache_types,
            check_gpu_fit,
            kv_cache_bytes,
            prefix_cache_bytes,
        )

        header = resolved.header
        options = LlamaOptions.from_settings(entry.id, entry.options)
        check_cache_types(entry.id, header, options)
        check_gpu_fit(entry.id, header, options)
        # a cache of n_ctx tokens for each of its n_parallel sequences, and the saved prefixes
        kv = options.n_parallel * kv_cache_bytes(header, options.n_ctx, options)
        estimate = header.file_size + kv + prefix_cache_bytes(header, options) + OVERHEAD_BYTES
        draft = _draft_of(entry, options, entry_of)
        if draft is not None:  # its weights and a cache of its own for each sequence
            draft_kv = options.n_parallel * kv_cache_bytes(draft[1], options.n_ctx)
            estimate += draft[1].file_size + draft_kv + OVERHEAD_BYTES
        # The embedding context, loaded on first use, reserves its own cache then.
        embedder_bytes = kv_cache_bytes(header, options.n_ctx) + OVERHEAD_BYTES
        return Plan(
            estimate,
            lambda progress, reserve: LlamaEngine(
                entry.id,
                header,
                options,
                progress,
                lambda: reserve(embedder_bytes, "the embedding context"),
                draft=draft,
            ),
        )
    from allm.managers.text.safetensors_engine import SafetensorsEngine, kv_cache_bytes_of

    info = resolved.info
    assert info is not None
    if resolved.engine is ONNX_GENAI:
        return _plan_onnx(entry, resolved.format, info, cache_dir)
    backend = "mlx" if resolved.engine is MLX_LM else "transformers"
    weights = int(info.weight_bytes * widening(info, backend, entry.options))
    estimate = weights + kv_cache_bytes_of(info, entry.options) + OVERHEAD_BYTES

    def load(progress: Progress, _reserve: object) -> SafetensorsEngine:
        return SafetensorsEngine(entry.id, info, entry.options, progress)

    return Plan(estimate, load)


def _draft_of(
    entry: ModelEntry, options: LlamaOptions, entry_of: Callable[[str], ModelEntry | None]
) -> tuple[str, GGUFHeader] | None:
    """The draft model an entry names: its id and GGUF header (a GGUF model of this catalog)."""
    if options.draft is None:
        return None
    draft = entry_of(options.draft)
    if draft is None:
        raise LoadFailedError(
            f"{entry.id}: its draft model {options.draft!r} is not a text model of the catalog",
            param="options.draft",
        )
    try:
        detected = detect(draft.path, Format(draft.format) if draft.format else None)
    except AllmError as exc:
        raise LoadFailedError(
            f"{entry.id}: its draft model {draft.id}: {exc.message}", param="options.draft"
        ) from exc
    if detected.format is not Format.GGUF:
        raise LoadFailedError(
            f"{entry.id}: its draft model {draft.id} is {detected.format.value}; "
            "a draft model is a GGUF model",
            param="options.draft",
        )
    return draft.id, read_header(detected.path)


def _plan_onnx(entry: ModelEntry, fmt: Format, info: DirectoryInfo, cache_dir: Path | None) -> Plan:
    from allm.managers.text.onnx_engine import cache_name, load
    from allm.managers.text.safetensors_engine import kv_cache_bytes_of

    options = OnnxOptions.from_settings(entry.id, entry.options)
    target = None
    weights = info.weight_bytes  # an ONNX directory's, as they are
    if fmt is Format.SAFETENSORS:
        if cache_dir is None:
            raise LoadFailedError(f"{entry.id}: no cache directory to convert {info.path} into", param="path")
        target = cache_dir / "onnx" / cache_name(info, options)
        weights = onnx_weight_bytes(info, options.precision)
    # ONNX Runtime GenAI keeps float32 activations and cache on the CPU, float16 on a GPU.
    dtype = "float32" if options.execution_provider == "cpu" else "float16"
    estimate = weights + kv_cache_bytes_of(info, {**entry.options, "dtype": dtype}) + OVERHEAD_BYTES

    def load_it(progress: Progress, _reserve: object) -> SafetensorsEngine:
        return load(entry.id, info, entry.options, target, progress=progress, should_stop=_stop_if_asked)

    return Plan(estimate, load_it)


def describe(settings: Mapping[str, Any]) -> ModelReport:
    """What ``allm check`` and ``allm models`` say of one catalog entry: every problem found."""
    entry = ModelEntry.from_settings(settings)
    problems = Problems()
    fmt = Format(entry.format) if entry.format else None
    if fmt is None and entry.path.suffix.lower() == ".gguf":
        fmt = Format.GGUF
    engine: Engine | None = None
    size: int | None = None
    with problems.under("path"):
        resolved = resolve(entry)
        fmt, engine, size = resolved.format, resolved.engine, resolved.size_bytes
    if fmt is not None:
        for error in option_problems(entry, fmt):
            problems.add(error, "options")
        if engine is None:  # the files could not say; the catalog still names the engine
            backend = "onnx" if fmt is Format.ONNX else str(entry.options.get("backend"))
            engine = LLAMA_CPP if fmt is Format.GGUF else _backend_engine(backend)
    # the option checks name the model in each message; the report is already the model's
    return problems.report(fmt.value if fmt else None, engine, size, strip=f"{entry.id}: ")


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


#: bytes per weight once converted; int4 counts one byte: its scales, and the embeddings
#: the builder leaves in float
PRECISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int4": 1.0}


def onnx_weight_bytes(info: DirectoryInfo, precision: str) -> int:
    """The weights of a safetensors model once the ONNX builder converted them to ``precision``."""
    stored = str(info.config.get("torch_dtype") or info.config.get("dtype") or "bfloat16")
    stored_bytes = 0.5 if info.mxfp4 else (4 if stored.endswith("float32") else 2)
    return int(info.weight_bytes / stored_bytes * PRECISION_BYTES[precision])


class TextManager(PooledManager):
    def __init__(self, info: ManagerInfo) -> None:
        cache_dir = Path(info.settings["cache_dir"]) if info.settings.get("cache_dir") else None
        super().__init__(
            info,
            lambda entry: plan_load(entry, cache_dir, self._entry_of),
            operations=frozenset({"chat", "count", "complete", "embed"}),
            engine_of=lambda entry: resolve(entry).engine,
        )

    def _entry_of(self, model_id: str) -> ModelEntry | None:
        return self.pool.catalog.get(model_id)

    def handle(self, ctx: RequestContext) -> Reply:
        _serving.ctx = ctx
        try:
            return super().handle(ctx)
        finally:
            _serving.ctx = None


def create(info: ManagerInfo) -> TextManager:
    return TextManager(info)
