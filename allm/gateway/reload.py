"""SIGHUP: read the configuration again and apply what can change while serving.

A reload is all or nothing for a bad file: if the new configuration has any problem (a
syntax error, a bad value, a model whose engine is not installed) nothing of it is
applied, and every problem is reported, in the log and in ``/status``'s
``server.reload``. Otherwise:

- the catalog: each manager instance is sent its modality's new models (the ``configure``
  op). A model whose entry is unchanged stays loaded and its requests run on; one whose
  entry changed or left is unloaded once no request uses it. The supervisor starts
  instances with the new catalog from then on;
- ``api_keys``, ``admin_keys``, ``cors_origins`` and ``request_timeout_s`` apply to the next request;
- everything else (the address, directories, heartbeats, the body and keep-alive
  timeouts, a modality's instances, queue and memory, a model of a modality with no
  manager running) needs a restart: it is named in ``restart_needed`` and the running
  value stays.

The catalog includes the models pulled into the data directory (allm/gateway/catalog.py).
A pull, a delete over HTTP (allm/gateway/models/) changes the running catalog the same way
(``change_models``), one change at a time with reloads (``catalog_lock``).

See docs/design.md, "Stop and reload".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from sanic import Sanic

from allm.gateway.config import Config, ConfigError, ModelConfig
from allm.kernel.codes import AllmError

log = logging.getLogger("allm.reload")

#: the settings a reload applies to a running server
LIVE = ("api_keys", "admin_keys", "cors_origins", "request_timeout_s")
#: settings whose values never go to the log or /status
SECRET = frozenset({"database_url", "curve_secret_key"})
#: how long one manager instance is given to take its new catalog
CONFIGURE_TIMEOUT_S = 10.0
#: how long a reload waits for heartbeats that show the new catalog (a few heartbeat intervals)
CATALOG_WAIT_S = 3.0


def restart_needed(old: Config, new: Config) -> list[str]:
    """The changed settings a running server cannot take."""
    out = []
    for field in dataclasses.fields(Config):
        name = field.name
        if name in LIVE or name in ("models", "modalities"):
            continue
        if getattr(old, name) != getattr(new, name):
            if name in SECRET:  # its value may hold a password: say only that it changed
                out.append(f"setting {name}: changed")
            else:
                out.append(f"setting {name}: {getattr(old, name)!r} → {getattr(new, name)!r}")
    for modality in sorted(set(old.modalities) | set(new.modalities)):
        before, after = old.modality(modality), new.modality(modality)
        for field in dataclasses.fields(before):
            a, b = getattr(before, field.name), getattr(after, field.name)
            if a != b:
                out.append(f"setting [{modality}] {field.name}: {a!r} → {b!r}")
    return out


def _models_of(models: tuple[ModelConfig, ...], modality: str) -> list[dict[str, Any]]:
    return [m.settings() for m in models if m.modality == modality]


async def _heard_catalog(app: Sanic[Any, Any], endpoints: set[str], catalog: list[str]) -> None:
    """Wait (briefly) until these instances' heartbeats carry the new catalog: the kernel
    client routes a model's requests by it, so a new model is served from the first request."""
    deadline = time.monotonic() + CATALOG_WAIT_S
    while time.monotonic() < deadline:
        views = {v.endpoint: v for v in app.ctx.client.instances()}
        if all(
            (hb := views[e].heartbeat) is None or hb.extra.get("catalog") in (None, catalog)
            for e in endpoints
            if e in views
        ):
            return
        await asyncio.sleep(0.05)


def catalog_lock(app: Sanic[Any, Any]) -> asyncio.Lock:
    """The lock every change of the running catalog holds: reloads, pulls, deletes."""
    lock: asyncio.Lock | None = getattr(app.ctx, "catalog_lock", None)
    if lock is None:
        lock = app.ctx.catalog_lock = asyncio.Lock()
    return lock


def served(app: Sanic[Any, Any], models: Iterable[ModelConfig]) -> tuple[ModelConfig, ...]:
    """The models a manager of this server serves (a modality with none needs a restart)."""
    serving = {spec.modality for spec in app.ctx.specs}
    return tuple(m for m in models if m.modality in serving)


async def send_models(app: Sanic[Any, Any], models: tuple[ModelConfig, ...]) -> list[str]:
    """Send each local manager instance its modality's models where they differ from the running
    catalog's, and wait for their heartbeats to show them; what was applied, said for a person.
    The caller holds ``catalog_lock`` and makes ``models`` the running catalog after."""
    old: Config = app.ctx.config
    applied: list[str] = []
    # The managers first: a model the gateway admits is then one its manager knows.
    for modality in sorted({spec.modality for spec in app.ctx.specs}):
        before, after = _models_of(old.models, modality), _models_of(models, modality)
        if before == after:
            continue
        specs = [s for s in app.ctx.specs if s.modality == modality]
        if app.ctx.supervisor is not None:
            app.ctx.supervisor.update_settings(modality, {**specs[0].settings, "models": after})
        answers = await asyncio.gather(
            *(
                app.ctx.client.call(
                    modality,
                    "configure",
                    params={"models": after},
                    endpoint=spec.endpoint,
                    timeout_s=CONFIGURE_TIMEOUT_S,
                )
                for spec in specs
            ),
            return_exceptions=True,
        )
        changes: dict[str, list[str]] = {}
        for spec, answer in zip(specs, answers, strict=True):
            if isinstance(answer, AllmError):
                # It takes the new catalog when it starts again (ours, or supervisord's
                # `allm manager`, which reads the same file).
                log.warning("%s did not take the new catalog now: %s", spec.name, answer.message)
                applied.append(
                    f"{spec.name}: not reached ({answer.message}); it reads the catalog when it starts"
                )
            elif isinstance(answer, BaseException):
                raise answer
            else:
                changes = answer.data
        said = [f"{kind} {', '.join(ids)}" for kind, ids in sorted(changes.items()) if ids]
        applied.append(f"{modality} models: {'; '.join(said) or 'options changed'}")
        reached = {
            spec.endpoint
            for spec, answer in zip(specs, answers, strict=True)
            if not isinstance(answer, BaseException)
        }
        await _heard_catalog(app, reached, sorted(m["id"] for m in after))
    return applied


async def change_models(
    app: Sanic[Any, Any], change: Callable[[tuple[ModelConfig, ...]], Iterable[ModelConfig]]
) -> list[str]:
    """Make ``change(running catalog)`` the running catalog, as a reload would; what was applied."""
    async with catalog_lock(app):
        models = served(app, change(app.ctx.config.models))
        applied = await send_models(app, models)
        app.ctx.config = dataclasses.replace(app.ctx.config, models=models)
        return applied


async def reload(app: Sanic[Any, Any], reread: Callable[[], Config]) -> dict[str, Any]:
    """Read the configuration again and apply it; returns what ``/status`` shows of it."""
    async with catalog_lock(app):
        return await _reload(app, reread)


async def _reload(app: Sanic[Any, Any], reread: Callable[[], Config]) -> dict[str, Any]:
    old: Config = app.ctx.config
    result: dict[str, Any] = {
        "at": time.time(),
        "ok": False,
        "applied": [],
        "restart_needed": [],
        "problems": [],
    }
    try:
        new = reread()
    except ConfigError as exc:
        result["problems"] = list(exc.problems)
        log.error("reload refused, nothing applied: %s", "; ".join(exc.problems))
        return result
    except OSError as exc:
        result["problems"] = [f"the configuration could not be read: {exc}"]
        log.error("reload refused, nothing applied: %s", exc)
        return result

    restart = restart_needed(old, new)
    models = served(app, new.models)
    restart += [
        f"model {m.id!r}: no {m.modality} manager runs; a restart starts one"
        for m in new.models
        if m not in models
    ]
    applied = await send_models(app, models)
    if not applied and models != old.models:
        applied.append("models: the gateway's own settings of a model")
    live = {name: getattr(new, name) for name in LIVE if getattr(new, name) != getattr(old, name)}
    applied += [f"setting {name}" for name in live]
    app.ctx.config = dataclasses.replace(old, models=models, **live)
    app.ctx.api_keys = [key.encode() for key in app.ctx.config.api_keys]
    result.update(ok=True, applied=applied, restart_needed=restart)
    log.info(
        "reloaded: applied %s; needs a restart: %s",
        "; ".join(applied) or "nothing (no change)",
        "; ".join(restart) or "nothing",
    )
    return result
