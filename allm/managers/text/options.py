"""A text model's catalog ``options``, checked without loading or importing an engine.

The manager checks them before a load, and ``allm check`` before anything starts; both
get the same errors, each naming the option (``param`` is ``options.KEY``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

from allm.kernel.codes import LoadFailedError

DEFAULT_N_PARALLEL = 4  # a GGUF model's sequences decoded together: llama-server's default slots
DEFAULT_N_CTX = 4096  # llama.cpp's own default here: a 128k-token cache would dwarf most models
BACKENDS = ("auto", "mlx", "transformers")
DTYPES = ("float32", "bfloat16", "float16", "auto")


def llama_threads() -> int:
    """llama.cpp's threads: every core, as llama-server uses. Measured on 2 cores with
    OpenMP's default wait policy: twice one thread's tokens/s, heartbeats unharmed
    (README, Benchmarks)."""
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """All cores but one: the manager's ZeroMQ I/O thread needs one to answer promptly."""
    return max(1, (os.cpu_count() or 2) - 1)


def _unknown(model_id: str, engine: str, options: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(options) - known)
    if unknown:
        raise LoadFailedError(
            f"{model_id}: unknown {engine} option(s) {unknown}; known: {sorted(known)}",
            param=f"options.{unknown[0]}",
        )


def _count(model_id: str, options: Mapping[str, Any], key: str, default: int, minimum: int) -> int:
    value = options.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise LoadFailedError(
            f"{model_id}: option {key} must be an integer ≥ {minimum}, got {value!r}", param=f"options.{key}"
        )
    return value


def _choice(model_id: str, options: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = options.get(key, choices[0])
    if value not in choices:
        raise LoadFailedError(
            f"{model_id}: option {key} must be one of {list(choices)}, got {value!r}", param=f"options.{key}"
        )
    return str(value)


def _all(checks: list[Callable[[], object]]) -> list[LoadFailedError]:
    errors = []
    for check in checks:
        try:
            check()
        except LoadFailedError as exc:
            errors.append(exc)
    return errors


def llama_problems(model_id: str, options: Mapping[str, Any]) -> list[LoadFailedError]:
    """Every bad option of a GGUF model (llama.cpp), each naming its option."""
    return _all(
        [
            lambda: _unknown(
                model_id, "llama.cpp", options, {"n_ctx", "n_threads", "n_gpu_layers", "n_parallel"}
            ),
            lambda: _count(model_id, options, "n_ctx", DEFAULT_N_CTX, 16),
            lambda: _count(model_id, options, "n_parallel", DEFAULT_N_PARALLEL, 1),
            lambda: _count(model_id, options, "n_threads", llama_threads(), 1),
            lambda: _count(model_id, options, "n_gpu_layers", 0, -1),
        ]
    )


def safetensors_problems(model_id: str, options: Mapping[str, Any]) -> list[LoadFailedError]:
    """Every bad option of a safetensors model, each naming its option."""
    return _all(
        [
            lambda: _unknown(model_id, "safetensors", options, {"backend", "n_threads", "dtype", "n_ctx"}),
            lambda: _choice(model_id, options, "backend", BACKENDS),
            lambda: _choice(model_id, options, "dtype", DTYPES),
            lambda: _count(model_id, options, "n_threads", default_threads(), 1),
            lambda: _count(model_id, options, "n_ctx", DEFAULT_N_CTX, 16),
        ]
    )


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaOptions:
    n_ctx: int = DEFAULT_N_CTX  # the context of each sequence: the most one request may use
    n_threads: int | None = None
    n_gpu_layers: int = 0
    n_parallel: int = 4  # sequences decoded together (continuous batching), each with its own cache

    @classmethod
    def from_settings(cls, model_id: str, options: Mapping[str, Any]) -> LlamaOptions:
        for error in llama_problems(model_id, options):
            raise error
        return cls(
            n_ctx=options.get("n_ctx", DEFAULT_N_CTX),
            n_threads=options.get("n_threads", llama_threads()),
            n_gpu_layers=options.get("n_gpu_layers", 0),
            n_parallel=options.get("n_parallel", DEFAULT_N_PARALLEL),
        )


def check_safetensors_options(model_id: str, options: Mapping[str, Any]) -> None:
    """Raise LOAD_FAILED naming the first bad option of a safetensors model."""
    for error in safetensors_problems(model_id, options):
        raise error
