"""Pins that outlive a manager's process: kept by the gateway, on disk, and put back by it.

A manager holds its pins in memory (allm/managers/pool.py): a pin there keeps a model loaded
while the process lives. The operator's intent is wider: ``POST /v1/models/{id}/pin`` means this
model stays ready wherever it is served. So the gateway keeps the pinned ids in the data
directory (``pins.json``), and a task watches the heartbeats: every live instance whose catalog
holds a pinned model, and whose heartbeat does not show it pinned (a manager restarted after a
crash, an instance that came up later, another host), is asked to pin it, which loads it. A pin
that fails (the model does not fit there, its files are gone) is tried again after
RETRY_AFTER_S, and said in the log, never in a loop. Unpinning, unloading or deleting the model
drops its pin.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sanic import Sanic

from allm.gateway.config import Config
from allm.kernel.codes import AllmError

log = logging.getLogger("allm.gateway.pins")

FILE = "pins.json"
#: how long a pin that failed on an instance waits before it is tried there again
RETRY_AFTER_S = 60.0


class Pins:
    """The pinned model ids, as the data directory keeps them."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / FILE
        self.ids: set[str] = set()
        try:
            raw = json.loads(self.path.read_text())
            self.ids = {str(i) for i in raw.get("pinned", [])}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("could not read the pins in %s (%s): no model is pinned", self.path, exc)
        self._trying: set[tuple[str, str]] = set()  # (endpoint, model) pins asked now
        self._failed: dict[tuple[str, str], float] = {}  # when a pin last failed there

    def add(self, model_id: str) -> None:
        if model_id not in self.ids:
            self.ids.add(model_id)
            self._write()

    def drop(self, model_id: str) -> None:
        if model_id in self.ids:
            self.ids.discard(model_id)
            self._write()

    def _write(self) -> None:
        """Replace the file whole: a crash midway leaves the old one. A data directory that
        cannot be written leaves the pins in memory, for this gateway's life, and says so."""
        partial = self.path.with_suffix(".partial")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"pinned": sorted(self.ids)}) + "\n")
            os.replace(partial, self.path)
        except OSError as exc:
            log.warning(
                "could not keep the pins in %s (%s): they last while the gateway runs",
                self.path,
                exc,
            )

    def missing(self, app: Sanic[Any, Any]) -> list[tuple[str, str, str]]:
        """(modality, endpoint, model) for each pin a live instance should hold and does not,
        nor is asked for now, nor failed lately."""
        config: Config = app.ctx.config
        now = time.monotonic()
        out = []
        for view in app.ctx.client.instances():
            hb = view.heartbeat
            if not view.live or hb is None:
                continue
            catalog = set(hb.extra.get("catalog") or ())
            pinned = set(hb.extra.get("pinned") or ())
            for model_id in sorted(self.ids & catalog - pinned):
                model = config.model(model_id)
                key = (view.endpoint, model_id)
                if model is None or model.modality != view.modality or key in self._trying:
                    continue
                if now - self._failed.get(key, -RETRY_AFTER_S) < RETRY_AFTER_S:
                    continue
                out.append((view.modality, view.endpoint, model_id))
        return out

    async def pin(self, app: Sanic[Any, Any], modality: str, endpoint: str, model_id: str) -> None:
        """Ask one instance to pin (and so load) a model; a failure is logged and retried later."""
        key = (endpoint, model_id)
        self._trying.add(key)
        config: Config = app.ctx.config
        try:
            await app.ctx.client.call(
                modality, "pin", model=model_id, endpoint=endpoint, timeout_s=config.request_timeout_s
            )
            self._failed.pop(key, None)
            log.info("pinned %s again on %s", model_id, endpoint)
        except AllmError as exc:
            self._failed[key] = time.monotonic()
            again = RETRY_AFTER_S
            log.warning(
                "could not pin %s on %s (%s); trying again in %.0f s", model_id, endpoint, exc.message, again
            )
        finally:
            self._trying.discard(key)

    async def keep(self, app: Sanic[Any, Any], interval_s: float) -> None:
        """Put pins back where they are missing, every ``interval_s``, until cancelled."""
        tasks: set[asyncio.Task[None]] = set()
        while True:
            if self.ids:
                for modality, endpoint, model_id in self.missing(app):
                    task = asyncio.create_task(self.pin(app, modality, endpoint, model_id))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            await asyncio.sleep(interval_s)
