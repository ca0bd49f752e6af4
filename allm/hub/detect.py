"""What a pulled model is, told from the files that arrived by the managers' own checks.

The selection says which modalities the files may be (a GGUF is a text model or an image
model; safetensors weights with a config.json are text; ggml and CTranslate2 files are
speech), and each candidate manager's ``describe`` (the one ``allm check`` and ``allm
models`` use) reads the files as it would before loading them: the first whose report has
no problem with the path is the modality, and its report names the format. Problems with
anything else (an engine not installed) are kept as warnings: the model is registered and
``allm models`` says what it needs. An image model pulled by parts is read the same way, as
the catalog entry its parts make (``detect_image``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from allm.gateway.config import SAMPLING_BOUNDS, ModelConfig
from allm.hub.errors import PullError
from allm.hub.select import Selection
from allm.kernel.registry import MANAGERS, module_for

#: the modalities a selection's files may be, in the order they are tried
CANDIDATES: Mapping[str, tuple[str, ...]] = {
    "gguf": ("text", "image"),
    "safetensors": ("text",),
    "ggml": ("audio",),
    "ctranslate2": ("audio",),
    "image": ("image",),
}
#: generation_config.json's names of the sampling defaults a catalog entry takes
GENERATION_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repeat_penalty",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Detected:
    modality: str
    format: str | None
    path: Path  # the catalog entry's path: the model's file, or its directory
    warnings: tuple[str, ...]


def describe(model: ModelConfig) -> Any:
    """The manager's report on a catalog entry (as ``allm check`` makes it); loads nothing."""
    return importlib.import_module(module_for(model.modality)).describe(model.settings())


def detect(model_dir: Path, selection: Selection, model_id: str, modality: str | None) -> Detected:
    """The modality, format and path of the pulled files; PullError (422) when no manager serves them."""
    path = model_dir / selection.main if selection.main else model_dir
    if selection.kind == "ctranslate2":
        _check_ctranslate2(model_dir / "model.bin")
    if modality is not None and modality not in MANAGERS:
        raise PullError(f"unknown modality {modality!r}; known: {', '.join(MANAGERS)}", status=400)
    refusals = []
    for candidate in (modality,) if modality else CANDIDATES[selection.kind]:
        report = describe(ModelConfig(model_id, str(path), candidate))
        refused = [p.message for p in report.problems if p.field == "path"]
        if not refused:
            warnings = tuple(f"{p.field}: {p.message}" for p in report.problems)
            return Detected(candidate, report.format, path, warnings)
        refusals.append(f"as a {candidate} model: {refused[0]}")
    raise PullError(
        f"the files pulled are no model allm serves ({'; '.join(refusals)}); they were deleted",
        status=422,
    )


def detect_image(path: Path, options: Mapping[str, Any], model_id: str) -> Detected:
    """An image model of parts: the catalog entry of ``path`` (the main part) and ``options`` (the
    others), read by the image manager; PullError (422) naming the part it refuses."""
    report = describe(ModelConfig(model_id, str(path), "image", options=options))
    refused = [p.message for p in report.problems if p.field == "path"]
    if refused:
        raise PullError(
            f"the parts pulled are no image model allm serves: {refused[0]}; they were deleted", status=422
        )
    return Detected("image", report.format, path, tuple(f"{p.field}: {p.message}" for p in report.problems))


def _check_ctranslate2(model_bin: Path) -> None:
    from allm.managers.files.sniff import is_ctranslate2, looks_like, read_opening

    head = read_opening(model_bin)
    if not is_ctranslate2(head):
        raise PullError(
            f"model.bin is {looks_like(head)}, not a CTranslate2 model; allm does not load pickles, "
            "which can run code when they are opened; they were deleted",
            status=422,
        )


def generation_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling defaults generation_config.json gives, those within allm's bounds."""
    try:
        raw = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict) or raw.get("do_sample") is False:
        return {}
    defaults = {}
    for key, name in GENERATION_KEYS.items():
        value = raw.get(key)
        low, high = SAMPLING_BOUNDS[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if low <= value <= high:
            defaults[name] = float(value)
    return defaults
