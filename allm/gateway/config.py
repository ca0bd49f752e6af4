"""The one configuration of an allm process, as the frozen objects every part is handed.

It is built once at start (allm/gateway/config_read.py: defaults < TOML file < ALLM_*
environment < flags; allm/gateway/catalog.py: the model catalog). A bad value stops
start-up with a message that names the setting (and, in the model catalog, the entry).

Each modality's table (``[text]``, ``[audio]``, ``[image]``) holds its managers'
settings (``ModalityConfig``: instances, queue, memory, stall limits). The
``[image]`` table also holds what the gateway allows and keeps of images
(``ImageLimits``, read into ``Config.images``; the manager never sees them):

- ``max_width``, ``max_height`` (1024 each): the largest image a request may ask
  for, in pixels; at least 64 and a multiple of 8, as every image size is;
- ``default_size`` ("512x512", or less where the limits above are less): the
  size of ``size: "auto"``, or of a request that gives none; within those limits;
- ``url_ttl_s`` (3600): how long an image answered as a URL (``response_format:
  url``) is kept under ``<data_dir>/images/`` and served, then deleted;
- ``url_max_files`` (1000) and ``url_max_mib`` (1024): the most such images, and
  bytes, kept at once; past either the oldest go first, expired or not.

The ``[hub]`` table (``HubConfig``) says where ``allm pull`` fetches models from:
``endpoint`` (a Hugging Face Hub mirror; ``HF_ENDPOINT`` wins over it), ``token_file``
(a file holding the token for gated repositories; ``HF_TOKEN`` wins over it) and
``max_model_gib`` (the largest model a pull may fetch, in GiB; none by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

MIB = 1024 * 1024
#: requests one manager instance runs at once, by modality (the rest wait in its queue)
DEFAULT_SLOTS: Mapping[str, int] = {"text": 4}
#: every image side is a multiple of this (the latent is an eighth of the image) and at least MIN_SIDE
SIDE_STEP = 8
MIN_SIDE = 64
#: the largest side a config may allow: past it the latent alone outgrows any host
MAX_SIDE = 8192


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


class Problems:
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


def typed(name: str, value: Any, kind: type, *, minimum: float | None = None) -> Any:
    """``value`` as a ``kind`` (an int is a float too) of at least ``minimum``, else the problem naming it."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"setting {name} must be {kind.__name__}, got {value!r}")
    if minimum is not None and cast(float, value) < minimum:
        raise ConfigError(f"setting {name} must be at least {minimum:g}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str
    path: str
    modality: str = "text"
    format: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: sampling values for requests that leave them out (before SAMPLING_DEFAULTS)
    defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)
    #: where a pulled model came from (hf.co/OWNER/REPO[:TAG]); None for the configuration's own
    source: str | None = None

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
class HubConfig:
    """Where ``allm pull`` fetches models from: the ``[hub]`` table (allm/hub reads the environment)."""

    endpoint: str | None = None  # a Hub mirror's base URL; None: HF_ENDPOINT, else huggingface.co
    token_file: Path | None = None  # holds the token for gated repositories (HF_TOKEN wins)
    max_model_bytes: int | None = None  # the largest model a pull may fetch ([hub] max_model_gib)


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("~/.local/share/allm")
    runtime_dir: Path | None = None  # a private temporary directory when None
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()  # the keys that may change the server (pull, load, pin, delete)
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 * MIB
    request_timeout_s: float = 600.0
    body_timeout_s: float = 30.0  # a request whose headers or body stop arriving this long gets 408
    keep_alive_timeout_s: float = 30.0  # a connection idle between requests is closed after this
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
    hub: HubConfig = dataclasses.field(default_factory=HubConfig)
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
