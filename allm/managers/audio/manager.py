"""The audio manager: speech to text and translation to English with whisper.cpp.

Settings (from the supervisor)::

    {"models": [{"id", "path", "format"?, "options"?}, ...], "cache_dir": str,
     "memory_budget_bytes": int | None, "idle_unload_s": float | None, "load_stall_s": float | None}

A catalog path is a whisper.cpp ggml file, or a CTranslate2 whisper directory (faster-whisper's
form, and the default tiny.en's), converted once into ``cache_dir`` under a name keyed by the
source's identity: the load that first needs it converts it, as a phase the watchdog follows.
Every file is checked (``model_check``) before whisper.cpp sees it: its binding crashes on a
bad one instead of saying so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allm.catalog_names import AUDIO_FORMATS
from allm.kernel.codes import FormatMismatchError, LoadFailedError
from allm.kernel.contract import ManagerInfo
from allm.managers.audio.model_check import WhisperModelInfo, check_model
from allm.managers.engines import WHISPER_CPP
from allm.managers.pool import ModelEntry, Plan, PooledManager, Progress
from allm.managers.report import ModelReport, Problems

if TYPE_CHECKING:
    from allm.managers.audio.whisper_engine import WhisperEngine

MIB = 1024 * 1024
OVERHEAD_BYTES = 64 * MIB  # the decoded request audio and bookkeeping beside the model
OPTIONS = frozenset({"n_threads"})
CONVERTER_VERSION = 1  # part of a converted file's cache key: a new converter converts again


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """A catalog entry's files, checked: a ggml file ready to load, or a directory to convert first."""

    format: str
    path: Path
    size_bytes: int
    info: WhisperModelInfo | None = None  # a ggml file's (converted or not)
    target: Path | None = None  # where a CTranslate2 directory converts to


def _cache_name(entry: ModelEntry, model_bin: Path) -> str:
    stat = model_bin.stat()
    identity = f"{model_bin.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}"
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", entry.id)[:64]
    return f"{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.ggml"


def resolve(entry: ModelEntry, cache_dir: Path | None) -> Source:
    """Find and check the entry's files; raises the coded error naming what is wrong."""
    path = entry.path
    if entry.format is not None and entry.format not in AUDIO_FORMATS:
        raise FormatMismatchError(
            f"audio models are {' or '.join(AUDIO_FORMATS)}, not {entry.format!r}", param="format"
        )
    if not path.is_absolute():  # pywhispercpp would take it for a model name to download
        raise LoadFailedError(f"model path must be absolute: {path}", param="path")
    if not path.exists():
        raise LoadFailedError(f"model path not found: {path}", param="path")
    if path.is_dir():
        model_bin = path / "model.bin"
        if not model_bin.is_file():
            raise FormatMismatchError(
                f"{path} is a directory without model.bin: an audio model is a whisper.cpp ggml file "
                "or a CTranslate2 whisper directory",
                param="path",
            )
        if entry.format == "ggml":
            raise FormatMismatchError(
                f"{path} is registered as ggml but is a CTranslate2 directory", param="path"
            )
        size = model_bin.stat().st_size
        if cache_dir is None:  # described, not loaded: nothing to convert into
            return Source("ctranslate2", path, size)
        target = cache_dir / _cache_name(entry, model_bin)
        return Source("ctranslate2", path, size, check_model(target) if target.is_file() else None, target)
    if entry.format == "ctranslate2":
        raise FormatMismatchError(f"{path} is registered as ctranslate2 but is a file", param="path")
    info = check_model(path)
    return Source("ggml", path, info.size_bytes, info)


def state_bytes(info: WhisperModelInfo | None, weights: int) -> int:
    """whisper.cpp's own memory beside the weights: key/value caches and compute buffers."""
    if info is None:  # not converted yet: scale with the weights
        return weights // 2 + OVERHEAD_BYTES
    h = info.hparams
    kv_self = 2 * 2 * h.n_text_layer * h.n_text_ctx * h.n_text_state
    kv_cross = 2 * 2 * h.n_text_layer * h.n_audio_ctx * h.n_text_state
    encoder = 4 * h.n_audio_ctx * h.n_audio_state * 16  # activations of one 30 s window
    return kv_self + kv_cross + encoder + OVERHEAD_BYTES


def check_options(entry: ModelEntry) -> None:
    unknown = sorted(set(entry.options) - OPTIONS)
    if unknown:
        raise LoadFailedError(
            f"unknown whisper.cpp option(s) {unknown}; known: {sorted(OPTIONS)}",
            param=f"options.{unknown[0]}",
        )
    threads = entry.options.get("n_threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise LoadFailedError(
            f"option n_threads must be an integer ≥ 1, got {threads!r}", param="options.n_threads"
        )


def make_plan(cache_dir: Path | None) -> Callable[[ModelEntry], Plan]:
    def plan_load(entry: ModelEntry) -> Plan:
        """Check the files, the options and the engine, and estimate memory, before loading."""
        check_options(entry)
        source = resolve(entry, cache_dir)
        if source.info is None and source.target is None:
            raise LoadFailedError(
                f"{entry.id}: no cache directory to convert {source.path} into", param="path"
            )
        WHISPER_CPP.require(entry.id)
        weights = source.info.weights_bytes if source.info is not None else source.size_bytes
        estimate = weights + state_bytes(source.info, weights)

        def load(progress: Progress, _reserve: object) -> WhisperEngine:
            from allm.managers.audio.whisper_engine import WhisperEngine

            info = source.info
            if info is None:
                from allm.managers.audio.ct2_convert import convert

                assert source.target is not None  # plan_load refused a conversion with nowhere to go
                source.target.parent.mkdir(parents=True, exist_ok=True)
                progress(0.1)
                convert(source.path, source.target, lambda done: progress(0.1 + 0.75 * done))
                info = check_model(source.target)
            progress(0.9)
            engine = WhisperEngine(entry.id, info, dict(entry.options))
            progress(1.0)
            return engine

        return Plan(estimate, load)

    return plan_load


def describe(settings: Mapping[str, Any]) -> ModelReport:
    """What ``allm check`` and ``allm models`` say of one audio catalog entry."""
    entry = ModelEntry.from_settings(settings)
    problems = Problems()
    fmt, size = entry.format, None
    with problems.under("options"):
        check_options(entry)
    with problems.under("path"):
        # Without a cache directory (the command line's case) a CTranslate2 source is described only.
        source = resolve(entry, Path(settings["cache_dir"]) if settings.get("cache_dir") else None)
        fmt, size = source.format, source.size_bytes
    return problems.report(fmt, WHISPER_CPP, size)


class AudioManager(PooledManager):
    def __init__(self, info: ManagerInfo) -> None:
        cache_dir = Path(info.settings["cache_dir"]) if info.settings.get("cache_dir") else None
        super().__init__(
            info, make_plan(cache_dir), operations=frozenset({"transcribe"}), engine_of=lambda _: WHISPER_CPP
        )


def create(info: ManagerInfo) -> AudioManager:
    return AudioManager(info)
