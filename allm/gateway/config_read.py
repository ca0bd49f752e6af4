"""Reading the configuration: defaults < TOML file < ALLM_* environment < flags, into one Config.

A bad value keeps its default and is reported with the setting it names; ``load`` then
raises one ConfigError holding every problem found, ``read`` (``allm check``) returns them.
The tables: ``[server]`` (the gateway's own settings), ``[responses]`` (stored responses),
one per modality (``[text]``, ``[audio]``, ``[image]``: allm/gateway/config.py says what
each holds), ``[hub]`` (where ``allm pull`` fetches models) and ``[[models]]``, the catalog
(allm/gateway/catalog.py), which the models pulled into the data directory join.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from allm.gateway import catalog
from allm.gateway.config import (
    MAX_SIDE,
    MIB,
    MIN_SIDE,
    SIDE_STEP,
    Config,
    ConfigError,
    HubConfig,
    ImageLimits,
    ModalityConfig,
    ModelConfig,
    Problems,
    RemoteManager,
    parse_size,
    typed,
)
from allm.kernel import curve
from allm.kernel.registry import MANAGERS
from allm.kernel.transport import check_endpoint

#: the [server] settings an ALLM_* variable sets, over the file's
ENVIRONMENT: Mapping[str, str] = {
    "host": "ALLM_HOST",
    "port": "ALLM_PORT",
    "data_dir": "ALLM_DATA_DIR",
    "api_keys": "ALLM_API_KEYS",
    "admin_keys": "ALLM_ADMIN_KEYS",
    "cors_origins": "ALLM_CORS_ORIGINS",
    "max_body_bytes": "ALLM_MAX_BODY_BYTES",
    "request_timeout_s": "ALLM_REQUEST_TIMEOUT_S",
    "database_url": "ALLM_DATABASE_URL",
}
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
    file = file or (Path(environ["ALLM_CONFIG"]) if environ.get("ALLM_CONFIG") else None)
    doc = _document(file)
    problems = Problems()
    values = _server(_server_table(doc, environ, flags or {}, problems), problems)
    values.update(_responses(doc, problems))
    values["hub"] = _hub(doc, problems)
    modalities, values["images"] = _modalities(doc, problems)
    if any(m.remote for m in modalities.values()) and "curve_secret_key" not in values:
        problems.add(
            "setting curve_secret_key is needed to reach managers on other hosts: "
            "make a key pair with `allm keys gateway` and give its .key_secret file"
        )
    base = file.parent if file is not None else Path.cwd()
    models = catalog.models(doc.get("models", []), base, problems)
    models = catalog.with_pulled(models, values.get("data_dir") or Config().data_dir)
    _check_served(models, modalities, problems)
    return Config(**values, modalities=modalities, models=models), tuple(problems.found)


def _check_served(
    models: tuple[ModelConfig, ...], modalities: Mapping[str, ModalityConfig], problems: Problems
) -> None:
    """Each modality the catalog names has a manager to serve it, here or on another host."""
    for name in sorted({m.modality for m in models}):
        options = modalities.get(name) or ModalityConfig()
        if not options.instances and not options.remote:
            problems.add(f"[{name}] instances = 0 and no remote manager: nothing serves its models")


def _document(file: Path | None) -> dict[str, Any]:
    """The TOML file's tables; none without a file."""
    if file is None:
        return {}
    try:
        return tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {file}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None


def _server_table(
    doc: Mapping[str, Any], environ: Mapping[str, str], flags: Mapping[str, Any], problems: Problems
) -> dict[str, Any]:
    """The [server] settings as given: the file's, then the environment's over them, then the flags'."""
    server = doc.get("server", {})
    if not isinstance(server, dict):
        problems.add("[server] must be a table")
        server = {}
    server = dict(server)
    for key, var in ENVIRONMENT.items():
        if var in environ:
            server[key] = environ[var]
    server.update({k: v for k, v in flags.items() if v is not None})
    return server


def _number(kind: type, minimum: float) -> Callable[[str, Any], Any]:
    """The check of a numeric setting, which the environment gives as text."""

    def check(key: str, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = kind(value)
            except ValueError:
                raise ConfigError(f"setting {key} must be {kind.__name__}, got {value!r}") from None
        return typed(key, value, kind, minimum=minimum)

    return check


def _path(key: str, value: Any) -> Path:
    return Path(typed(key, value, str)).expanduser()


def _str_tuple(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"setting {name} must be a list of strings")
    return tuple(value)


def _database_url(key: str, value: Any) -> str:
    url = typed(key, value, str)
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"setting database_url must be a postgresql:// URL, got {url!r}")
    return cast(str, url)


def _key_pair_file(key: str, value: Any) -> Path:
    path = _path(key, value)
    try:
        curve.load_pair(path)
    except curve.BadKey as exc:
        raise ConfigError(f"setting curve_secret_key: {exc}") from None
    return path


#: each [server] setting and its check, ``check(name, value)``, in the order their problems are told
SERVER_CHECKS: Mapping[str, Callable[[str, Any], Any]] = {
    "port": _number(int, 0),
    "max_body_bytes": _number(int, 1024),
    "request_timeout_s": _number(float, 0.01),
    "body_timeout_s": _number(float, 0.1),
    "keep_alive_timeout_s": _number(float, 0.1),
    "heartbeat_interval_s": _number(float, 0.01),
    "heartbeat_timeout_s": _number(float, 0.01),
    "drain_timeout_s": _number(float, 0.01),
    "restart_cooldown_s": _number(float, 0.01),
    "host": lambda key, value: typed(key, value, str),
    "data_dir": _path,
    "runtime_dir": _path,
    "api_keys": _str_tuple,
    "admin_keys": _str_tuple,
    "cors_origins": _str_tuple,
    "database_url": _database_url,
    "curve_secret_key": _key_pair_file,
}


def _server(server: Mapping[str, Any], problems: Problems) -> dict[str, Any]:
    """The [server] settings given, checked; a bad one is reported and keeps its default."""
    unknown = set(server) - set(SERVER_CHECKS)
    if unknown:
        problems.add(f"[server] has unknown setting(s) {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, check in SERVER_CHECKS.items():
        if key in server and (value := problems.take(check, key, server[key])) is not None:
            values[key] = value
    return values


def _responses(doc: Mapping[str, Any], problems: Problems) -> dict[str, Any]:
    """The [responses] table, as the Config fields it sets."""
    responses = doc.get("responses", {})
    if not isinstance(responses, dict):
        problems.add("[responses] must be a table")
        responses = {}
    unknown = set(responses) - {"ttl_s", "max_stored"}
    if unknown:
        problems.add(f"[responses] has unknown setting(s) {sorted(unknown)}")
    values: dict[str, Any] = {}
    for key, field, kind, minimum in (
        ("ttl_s", "responses_ttl_s", float, 0.001),
        ("max_stored", "responses_max_stored", int, 1),
    ):
        if key in responses:
            value = problems.take(typed, f"responses.{key}", responses[key], kind, minimum=minimum)
            if value is not None:
                values[field] = value
    return values


def _hub(doc: Mapping[str, Any], problems: Problems) -> HubConfig:
    """The [hub] table: where ``allm pull`` fetches models (HF_ENDPOINT and HF_TOKEN are allm/hub's)."""
    hub = doc.get("hub", {})
    if not isinstance(hub, dict):
        problems.add("[hub] must be a table")
        hub = {}
    unknown = set(hub) - {"endpoint", "token_file", "max_model_gib"}
    if unknown:
        problems.add(f"[hub] has unknown setting(s) {sorted(unknown)}")
    endpoint = problems.take(typed, "hub.endpoint", hub["endpoint"], str) if "endpoint" in hub else None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        problems.add(f"setting hub.endpoint must be an http:// or https:// URL, got {endpoint!r}")
        endpoint = None
    token_file = problems.take(_path, "hub.token_file", hub["token_file"]) if "token_file" in hub else None
    most = hub.get("max_model_gib")
    gib = None if most is None else problems.take(typed, "hub.max_model_gib", most, float, minimum=0.001)
    return HubConfig(
        endpoint=endpoint.rstrip("/") if endpoint else None,
        token_file=token_file,
        max_model_bytes=None if gib is None else int(gib * 1024 * MIB),
    )


def _modalities(doc: Mapping[str, Any], problems: Problems) -> tuple[dict[str, ModalityConfig], ImageLimits]:
    """Each registered modality's table, and the [image] table's own limits."""
    modalities: dict[str, ModalityConfig] = {}
    images = ImageLimits()
    for name in MANAGERS:
        raw = doc.get(name, {})
        if not isinstance(raw, dict):
            problems.add(f"[{name}] must be a table")
            raw = {}
        if name == "image":
            images = _image_limits(raw, problems)
        modalities[name] = _modality(name, raw, problems, IMAGE_SETTINGS if name == "image" else frozenset())
    return modalities, images


def _remote(name: str, raw: Any) -> tuple[RemoteManager, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"setting {name}.remote must be a list of {{endpoint, public_key}} tables")
    out = []
    for i, entry in enumerate(raw):
        where = f"{name}.remote[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"endpoint", "public_key"}:
            raise ConfigError(f"setting {where} must be a table of endpoint and public_key")
        endpoint = typed(f"{where}.endpoint", entry["endpoint"], str)
        if not endpoint.startswith("tcp://"):
            raise ConfigError(f"setting {where}.endpoint must be tcp://host:port, got {endpoint!r}")
        try:
            check_endpoint(endpoint)
            key = curve.load_public(typed(f"{where}.public_key", entry["public_key"], str))
        except (ValueError, curve.BadKey) as exc:
            raise ConfigError(f"setting {where}: {exc}") from None
        out.append(RemoteManager(endpoint, key.decode()))
    endpoints = [r.endpoint for r in out]
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"setting {name}.remote lists an endpoint twice")
    return tuple(out)


def _modality(
    name: str, raw: Mapping[str, Any], problems: Problems, others: frozenset[str] = frozenset()
) -> ModalityConfig:
    """One [MODALITY] table; a bad setting is reported and its default kept; ``others`` are read elsewhere."""
    unknown = set(raw) - MODALITY_SETTINGS - others
    if unknown:
        problems.add(f"[{name}] has unknown setting(s) {sorted(unknown)}")
    defaults = ModalityConfig()

    def value(key: str, kind: type, minimum: float, default: Any, scale: int = 1) -> Any:
        if raw.get(key) is None:
            return default
        checked = problems.take(typed, f"{name}.{key}", raw[key], kind, minimum=minimum)
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


def _image_limits(raw: Mapping[str, Any], problems: Problems) -> ImageLimits:
    """The [image] table's own settings; a bad one is reported and its default kept."""
    defaults = ImageLimits()

    def value(key: str, kind: type, minimum: float, default: Any) -> Any:
        if raw.get(key) is None:
            return default
        checked = problems.take(typed, f"image.{key}", raw[key], kind, minimum=minimum)
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
