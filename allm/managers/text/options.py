"""A text model's catalog ``options``, checked without loading or importing an engine.

The manager checks them before a load, and ``allm check`` before anything starts; both
get the same errors, each naming the option (``param`` is ``options.KEY``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from allm.kernel.codes import LoadFailedError

DEFAULT_N_PARALLEL = 4  # a GGUF model's sequences decoded together: llama-server's default slots
DEFAULT_N_CTX = 4096  # llama.cpp's own default here: a 128k-token cache would dwarf most models
BACKENDS = ("auto", "mlx", "transformers", "onnx")
DTYPES = ("float32", "bfloat16", "float16", "auto")
#: ONNX Runtime GenAI's execution providers allm offers: DirectML (Windows), CUDA, the CPU
EXECUTION_PROVIDERS = ("cpu", "dml", "cuda")
PRECISIONS = ("int4", "fp16", "fp32")
#: the key/value cache types llama.cpp takes here, and the bytes each stores a value in
#: (a q8_0 block: 32 values in 34 bytes; a q4_0 block: 32 values in 18)
CACHE_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
#: speculative decoding: none, or drafts looked up in the request's own text (a draft model is
#: the ``draft`` option)
SPECULATIVE = ("none", "ngram")
#: the precisions its model builder builds for each provider (the builder's own list of pairs)
PROVIDER_PRECISIONS = {"cpu": ("fp32", "int4"), "cuda": ("fp32", "fp16", "int4"), "dml": ("fp16", "int4")}
ONNX_OPTIONS = frozenset({"execution_provider", "precision"})


def llama_threads() -> int:
    """llama.cpp's threads: every core, as llama-server uses. Measured on 2 cores with
    OpenMP's default wait policy: twice one thread's tokens/s, heartbeats unharmed
    (docs/benchmarks.md)."""
    return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """All cores but one: the manager's ZeroMQ I/O thread needs one to answer promptly."""
    return max(1, (os.cpu_count() or 2) - 1)


def default_execution_provider() -> str:
    """DirectML on Windows (any GPU there), the CPU elsewhere."""
    return "dml" if sys.platform == "win32" else "cpu"


def default_precision(provider: str) -> str:
    """int4 on a GPU; float32 on the CPU, where it gives the transformers backend's very tokens.

    int4 is faster on the CPU too (docs/benchmarks.md), but its rounding changes which token
    is likeliest; it is one option away (``precision = "int4"``).
    """
    return "fp32" if provider == "cpu" else "int4"


def preferred_backend() -> str:
    """What ``backend = "auto"`` picks where the architecture allows: mlx on Apple silicon,
    onnx (DirectML) on Windows, transformers elsewhere."""
    import platform

    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    return "onnx" if sys.platform == "win32" else "transformers"


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
            lambda: _unknown(model_id, "llama.cpp", options, LLAMA_OPTIONS),
            lambda: _count(model_id, options, "n_ctx", DEFAULT_N_CTX, 16),
            lambda: _count(model_id, options, "n_parallel", DEFAULT_N_PARALLEL, 1),
            lambda: _count(model_id, options, "n_threads", llama_threads(), 1),
            lambda: _count(model_id, options, "n_gpu_layers", 0, -1),
            lambda: _count(model_id, options, "prefix_cache_mib", 0, 0),
            lambda: _choice(model_id, options, "cache_type_k", tuple(CACHE_TYPES)),
            lambda: _choice(model_id, options, "cache_type_v", tuple(CACHE_TYPES)),
            lambda: _choice(model_id, options, "speculative", SPECULATIVE),
            lambda: _draft(model_id, options),
        ]
    )


def _draft(model_id: str, options: Mapping[str, Any]) -> None:
    """``draft``: another model's id, and no other kind of speculation beside it."""
    if "draft" not in options:
        return
    draft = options["draft"]
    if not isinstance(draft, str) or not draft.strip():
        raise LoadFailedError(
            f"{model_id}: option draft must name a model of the catalog, got {draft!r}", param="options.draft"
        )
    if draft == model_id:
        raise LoadFailedError(f"{model_id}: option draft names the model itself", param="options.draft")
    if options.get("speculative", "none") != "none":
        raise LoadFailedError(
            f"{model_id}: options draft and speculative = {options['speculative']!r} are two kinds of "
            "speculative decoding; give one",
            param="options.draft",
        )


LLAMA_OPTIONS = frozenset(
    {
        "n_ctx",
        "n_threads",
        "n_gpu_layers",
        "n_parallel",
        "prefix_cache_mib",
        "cache_type_k",
        "cache_type_v",
        "speculative",
        "draft",
    }
)


def safetensors_problems(model_id: str, options: Mapping[str, Any]) -> list[LoadFailedError]:
    """Every bad option of a safetensors model, each naming its option."""
    known = {"backend", "n_threads", "dtype", "n_ctx", *ONNX_OPTIONS}
    return _all(
        [
            lambda: _unknown(model_id, "safetensors", options, known),
            lambda: _choice(model_id, options, "backend", BACKENDS),
            lambda: _choice(model_id, options, "dtype", DTYPES),
            lambda: _count(model_id, options, "n_threads", default_threads(), 1),
            lambda: _count(model_id, options, "n_ctx", DEFAULT_N_CTX, 16),
            *_onnx_checks(model_id, options),
        ]
    )


def onnx_problems(model_id: str, options: Mapping[str, Any]) -> list[LoadFailedError]:
    """Every bad option of an ONNX GenAI directory (served as it is: no precision to choose)."""
    return _all(
        [
            lambda: _unknown(
                model_id, "ONNX GenAI", options, {"backend", "n_threads", "n_ctx", "execution_provider"}
            ),
            lambda: _choice(model_id, options, "backend", ("auto", "onnx")),
            lambda: _count(model_id, options, "n_threads", default_threads(), 1),
            lambda: _count(model_id, options, "n_ctx", DEFAULT_N_CTX, 16),
            lambda: OnnxOptions.from_settings(model_id, options),
        ]
    )


def _onnx_checks(model_id: str, options: Mapping[str, Any]) -> list[Callable[[], object]]:
    """The onnx backend's options: a known provider and precision, a pair its builder builds,
    and neither on another backend (nor the transformers backend's dtype on this one)."""
    backend = options.get("backend", "auto")
    onnx = backend == "onnx" or (backend == "auto" and preferred_backend() == "onnx")

    def elsewhere() -> None:
        given = sorted(ONNX_OPTIONS & set(options))
        if given and not onnx and backend in BACKENDS:
            raise LoadFailedError(
                f"{model_id}: option {given[0]} applies to the onnx backend only, "
                f'and this model runs on {backend!r} (set backend = "onnx")',
                param=f"options.{given[0]}",
            )
        if onnx and "dtype" in options:
            raise LoadFailedError(
                f"{model_id}: option dtype applies to the transformers backend; "
                "the onnx backend takes precision (int4, fp16, fp32)",
                param="options.dtype",
            )

    return [elsewhere, lambda: OnnxOptions.from_settings(model_id, options)] if onnx else [elsewhere]


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaOptions:
    n_ctx: int = DEFAULT_N_CTX  # the context of each sequence: the most one request may use
    n_threads: int | None = None
    n_gpu_layers: int = 0
    n_parallel: int = 4  # sequences decoded together (continuous batching), each with its own cache
    #: the host memory kept for saved prefixes; None: as much as the sequences' own caches
    prefix_cache_mib: int | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    speculative: str = "none"
    #: the id of the draft model (speculative decoding with a smaller model of the same tokenizer)
    draft: str | None = None

    @classmethod
    def from_settings(cls, model_id: str, options: Mapping[str, Any]) -> LlamaOptions:
        for error in llama_problems(model_id, options):
            raise error
        return cls(
            n_ctx=options.get("n_ctx", DEFAULT_N_CTX),
            n_threads=options.get("n_threads", llama_threads()),
            n_gpu_layers=options.get("n_gpu_layers", 0),
            n_parallel=options.get("n_parallel", DEFAULT_N_PARALLEL),
            prefix_cache_mib=options.get("prefix_cache_mib"),
            cache_type_k=options.get("cache_type_k", "f16"),
            cache_type_v=options.get("cache_type_v", "f16"),
            speculative=options.get("speculative", "none"),
            draft=options.get("draft"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class OnnxOptions:
    """The onnx backend's settings, defaults filled in (``n_threads`` is checked with the others)."""

    execution_provider: str
    precision: str
    n_threads: int

    @classmethod
    def from_settings(cls, model_id: str, options: Mapping[str, Any]) -> OnnxOptions:
        provider = options.get("execution_provider", default_execution_provider())
        if provider not in EXECUTION_PROVIDERS:
            raise LoadFailedError(
                f"{model_id}: option execution_provider must be one of {list(EXECUTION_PROVIDERS)}, "
                f"got {provider!r}",
                param="options.execution_provider",
            )
        precision = options.get("precision", default_precision(provider))
        if precision not in PRECISIONS:
            raise LoadFailedError(
                f"{model_id}: option precision must be one of {list(PRECISIONS)}, got {precision!r}",
                param="options.precision",
            )
        if precision not in PROVIDER_PRECISIONS[provider]:
            raise LoadFailedError(
                f"{model_id}: precision {precision} does not run on execution provider {provider}: "
                f"ONNX Runtime GenAI builds {' or '.join(PROVIDER_PRECISIONS[provider])} for it",
                param="options.precision",
            )
        return cls(str(provider), str(precision), int(options.get("n_threads") or default_threads()))


def check_safetensors_options(model_id: str, options: Mapping[str, Any]) -> None:
    """Raise LOAD_FAILED naming the first bad option of a safetensors model."""
    for error in safetensors_problems(model_id, options):
        raise error
