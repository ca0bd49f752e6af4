"""The image manager: text to image with stable-diffusion.cpp.

Settings (from the supervisor)::

    {"models": [{"id", "path", "options"?}, ...], "memory_budget_bytes": int | None,
     "idle_unload_s": float | None, "load_stall_s": float | None}

A catalog ``path`` is a single-file model, or the diffusion model when the parts are
separate; the other parts are options named after stable-diffusion.cpp's own parameters
(``clip_l``, ``clip_g``, ``t5xxl``, ``vae``, ``taesd``), each an absolute path.  Every part is
checked (``model_check``) before stable-diffusion.cpp sees it: its binding does not notice a
failed load and crashes later instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from allm.kernel.codes import LoadFailedError, UnsupportedError
from allm.kernel.contract import ManagerInfo
from allm.managers.engines import STABLE_DIFFUSION_CPP
from allm.managers.image.model_check import ImageModelInfo, check_parts
from allm.managers.pool import ModelEntry, Plan, PooledManager, Progress
from allm.managers.report import ModelReport, Problems

if TYPE_CHECKING:
    from allm.managers.image.sd_engine import ImageEngine

PARTS = ("clip_l", "clip_g", "t5xxl", "vae", "taesd")
OPTIONS = frozenset({*PARTS, "n_threads", "steps", "cfg_scale", "sampler"})
#: a generation of this size is counted in the model's memory when it loads
PLANNED_SIZE = (512, 512)


def parts_of(entry: ModelEntry) -> dict[str, Path]:
    """The entry's files by stable-diffusion.cpp's parameter names."""
    unknown = sorted(set(entry.options) - OPTIONS)
    if unknown:
        raise LoadFailedError(
            f"unknown stable-diffusion.cpp option(s) {unknown}; known: {sorted(OPTIONS)}",
            param=f"options.{unknown[0]}",
        )
    separate = {name: entry.options[name] for name in PARTS if entry.options.get(name)}
    for name, value in separate.items():
        if not isinstance(value, str):
            raise LoadFailedError(f"option {name} must be a path, got {value!r}", param=f"options.{name}")
    main = "diffusion_model" if any(k in separate for k in ("clip_l", "clip_g", "t5xxl")) else "model"
    return {main: entry.path, **{name: Path(value) for name, value in separate.items()}}


def checked(entry: ModelEntry) -> tuple[dict[str, Path], ImageModelInfo]:
    """The entry's parts, checked as the worker will load them (a decode-only context).

    With no text encoder named, the path may be a whole model or a lone diffusion model
    (a Flux without its CLIP-L, say): when it is no whole model, it is checked as the
    latter, whose refusal says which part is missing.
    """
    parts = parts_of(entry)
    try:
        return parts, check_parts(parts, decode_only=True)
    except UnsupportedError:
        if "model" not in parts:
            raise
    alone = {"diffusion_model": parts.pop("model"), **parts}
    return alone, check_parts(alone, decode_only=True)


def plan_load(entry: ModelEntry) -> Plan:
    """Check every part and the engine, and estimate memory, before any engine runs."""
    parts, info = checked(entry)
    STABLE_DIFFUSION_CPP.require(entry.id)
    from allm.managers.image.sd_engine import compute_bytes

    estimate = info.weights_bytes + compute_bytes(*PLANNED_SIZE, "taesd" in parts)

    def load(progress: Progress, _reserve: object) -> ImageEngine:
        from allm.managers.image.sd_engine import ImageEngine

        return ImageEngine(
            entry.id,
            {name: str(path) for name, path in parts.items()},
            dict(entry.options),
            info.weights_bytes,
            progress=progress,
            free_bytes=lambda: psutil.virtual_memory().available,
        )

    return Plan(estimate, load)


def describe(settings: Mapping[str, Any]) -> ModelReport:
    """What ``allm check`` and ``allm models`` say of one image catalog entry."""
    entry = ModelEntry.from_settings(settings)
    problems = Problems()
    fmt, size = None, None
    with problems.under("path"):
        _parts, info = checked(entry)
        fmt, size = info.family, info.weights_bytes
    return problems.report(fmt, STABLE_DIFFUSION_CPP, size)


class ImageManager(PooledManager):
    def __init__(self, info: ManagerInfo) -> None:
        super().__init__(info, plan_load, operations=frozenset({"generate"}))


def create(info: ManagerInfo) -> ImageManager:
    return ImageManager(info)
