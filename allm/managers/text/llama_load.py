"""Loading a GGUF model into llama.cpp: GPU fit, load progress, and why a load failed.

The fit on the GPU is checked before anything loads; llama.cpp's load progress
feeds the watchdog; a failed load is classified by what llama.cpp logged, the
only place it says why.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

from allm.kernel.codes import LoadFailedError, OomRamError, OomVramError, UnsupportedError
from allm.managers.files.gguf import GGUFHeader
from allm.managers.text.options import CACHE_TYPES, LlamaOptions

# OMP_WAIT_POLICY stays unset here (GNU OpenMP's default: spin briefly, then sleep): on a
# small model each token crosses many thread barriers, and PASSIVE (right for whisper.cpp
# and stable-diffusion.cpp, whose managers set it) made every one a sleep and a wake-up, a
# third of the speed at two threads (docs/agents.md; bench/gateway.py measures it).
os.environ.setdefault("GGML_NO_BACKTRACE", "1")

import llama_cpp

log = logging.getLogger("allm.text.llama")

# llama.cpp explains a failed load only in its log: keep the last lines.
_LOG_LINES: collections.deque[str] = collections.deque(maxlen=50)


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _on_llama_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    line = text.decode("utf-8", "replace").strip()
    if line:
        _LOG_LINES.append(line)


llama_cpp.llama_log_set(_on_llama_log, ctypes.c_void_p(0))


def _llama_reason() -> str:
    """The most telling recent llama.cpp log line."""
    for line in reversed(_LOG_LINES):
        if any(w in line.lower() for w in ("error", "failed", "invalid", "unknown", "not ")):
            return line
    return _LOG_LINES[-1] if _LOG_LINES else "no reason logged"


def free_vram_bytes() -> int | None:
    """Free memory of the first NVIDIA GPU, or None where it cannot be read."""
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    try:
        done = subprocess.run(  # noqa: S603 - a fixed tool and arguments
            [tool, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return int(done.stdout.split()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def check_gpu_fit(model_id: str, header: GGUFHeader, options: LlamaOptions) -> None:
    """Refuse GPU layers this build cannot offload, or that do not fit the GPU (OOM_VRAM)."""
    if options.n_gpu_layers == 0:
        return
    if not llama_cpp.llama_supports_gpu_offload():
        raise UnsupportedError(
            f"{model_id}: n_gpu_layers = {options.n_gpu_layers}, but this llama.cpp build has no GPU offload",
            param="n_gpu_layers",
        )
    layers = header.arch_int("block_count") or 1
    share = 1.0 if options.n_gpu_layers < 0 else min(1.0, options.n_gpu_layers / layers)
    kv = options.n_parallel * kv_cache_bytes(header, options.n_ctx, options)
    need = int((header.file_size + kv) * share)
    free = free_vram_bytes()
    if free is not None and need > free:
        raise OomVramError(
            f"{model_id} needs about {need / 2**20:.0f} MiB of GPU memory for its offloaded layers; "
            f"{free / 2**20:.0f} MiB is free"
        )


def kv_cache_bytes(header: GGUFHeader, n_ctx: int, options: LlamaOptions | None = None) -> int:
    """Memory the key/value cache of a context of n_ctx tokens takes (f16 unless ``options``
    name other cache types)."""
    layers = header.arch_int("block_count")
    embd = header.arch_int("embedding_length")
    heads = header.arch_int("attention.head_count") or 1
    kv_heads = header.arch_int("attention.head_count_kv") or heads
    values = layers * n_ctx * (embd // heads) * kv_heads  # of the keys, and as many of the values
    k, v = (CACHE_TYPES["f16"],) * 2 if options is None else _types(options)
    return int(values * (k + v))


def _types(options: LlamaOptions) -> tuple[float, float]:
    return CACHE_TYPES[options.cache_type_k], CACHE_TYPES[options.cache_type_v]


#: values per block of llama.cpp's quantized cache types: a head's size must be a multiple
QUANT_BLOCK = 32


def check_cache_types(model_id: str, header: GGUFHeader, options: LlamaOptions) -> None:
    """Refuse a quantized key/value cache where llama.cpp cannot store this model's heads in one."""
    heads = header.arch_int("attention.head_count") or 1
    head = header.arch_int("attention.key_length") or header.arch_int("embedding_length") // heads
    for key in ("cache_type_k", "cache_type_v"):
        kind = getattr(options, key)
        if kind != "f16" and head % QUANT_BLOCK:
            raise LoadFailedError(
                f"{model_id}: option {key} = {kind!r} needs attention heads of a multiple of "
                f"{QUANT_BLOCK} values, and this model's have {head}; use f16",
                param=f"options.{key}",
            )


def prefix_cache_bytes(header: GGUFHeader, options: LlamaOptions) -> int:
    """The host memory saved prefixes may take: ``prefix_cache_mib``, else as much as the
    sequences' own caches (each prefix saved is one sequence's cache, or a part of it)."""
    if options.prefix_cache_mib is not None:
        return options.prefix_cache_mib * 2**20
    return options.n_parallel * kv_cache_bytes(header, options.n_ctx, options)


def sequences_context(
    model: Any,
    *,
    n_parallel: int,
    n_ctx: int,
    n_threads: int,
    n_batch: int,
    name: str,
    type_k: int | None = None,
    type_v: int | None = None,
) -> Any:
    """A llama.cpp context of ``n_parallel`` sequences of ``n_ctx`` tokens each, every one with a
    key/value stream of its own (one's numbers never depend on another's)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_parallel * n_ctx
    params.n_seq_max = n_parallel
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_threads = n_threads
    params.n_threads_batch = n_threads
    params.kv_unified = False
    params.no_perf = True
    if type_k is not None:
        params.type_k = type_k
    if type_v is not None:
        params.type_v = type_v
    ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        raise LoadFailedError(
            f"llama.cpp could not make a context of {n_parallel} × {n_ctx} tokens for {name}"
        )
    return ctx


_PROGRESS_LOCK = threading.Lock()


@contextlib.contextmanager
def _load_progress(model_id: str, report: Callable[[float], None] | None) -> Iterator[None]:
    """Feed llama.cpp's load progress to ``report`` during one ``Llama()`` construction.

    llama-cpp-python builds its model parameters inside ``Llama.__init__`` from
    ``llama_model_default_params()`` and offers no way to pass llama.cpp's
    ``progress_callback``: hand it defaults that carry ours, for this load only.
    """
    if report is None:
        yield
        return
    failed = False

    def on_progress(fraction: float, _user_data: ctypes.c_void_p) -> bool:
        nonlocal failed
        try:
            report(float(fraction))
        except Exception:  # an exception must never unwind into C: the load goes on
            if not failed:  # once: the callback runs hundreds of times a load
                failed = True
                log.exception("reporting the load progress of %s failed; the watchdog sees none", model_id)
        return True  # False would abort the load

    callback = llama_cpp.llama_progress_callback(on_progress)
    low_level = llama_cpp.llama_cpp
    original = low_level.llama_model_default_params

    def with_progress() -> Any:
        params = original()
        params.progress_callback = callback
        return params

    with _PROGRESS_LOCK:
        low_level.llama_model_default_params = with_progress
        try:
            yield
        finally:
            low_level.llama_model_default_params = original


def load_llama(
    model_id: str,
    header: GGUFHeader,
    options: LlamaOptions,
    *,
    n_ctx: int,
    embedding: bool,
    progress: Callable[[float], None] | None,
) -> llama_cpp.Llama:
    """The binding's ``Llama`` for ``header``'s file; a failed load raises its code."""
    _LOG_LINES.clear()
    try:
        with _load_progress(model_id, progress):
            return llama_cpp.Llama(
                str(header.path),
                n_ctx=n_ctx,
                n_threads=options.n_threads,
                n_threads_batch=options.n_threads,
                n_gpu_layers=options.n_gpu_layers,
                embedding=embedding,
                # A causal model has no pooling of its own: average its token states.
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN if embedding else -1,
                verbose=False,
            )
    except MemoryError as exc:
        raise OomRamError(f"out of host memory loading {model_id}") from exc
    except ValueError as exc:
        reason = _llama_reason()
        if options.n_gpu_layers and any(w in reason.lower() for w in ("cudamalloc", "out of memory")):
            raise OomVramError(f"out of GPU memory loading {model_id}: {reason}") from exc
        raise LoadFailedError(f"llama.cpp could not load {model_id}: {reason}") from exc
