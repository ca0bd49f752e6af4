"""The text models in memory: load on demand within a budget, evict LRU, unload when idle.

Before a load, the memory a model needs is estimated from its files (weights
plus the key/value cache for its context) and compared with the budget and
with what the host has free.  A model that cannot fit is OOM_RAM with both
figures, instead of a load that takes the machine down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import psutil

from kernel.codes import OomRamError, UnsupportedError

log = logging.getLogger("allm.text.pool")

MIB = 1024 * 1024


class Engine(Protocol):
    def close(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ModelEntry:
    id: str
    path: Path
    format: str | None = None  # "gguf" or "safetensors" where a directory holds both
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_settings(cls, raw: Mapping[str, Any]) -> ModelEntry:
        return cls(
            id=str(raw["id"]),
            path=Path(raw["path"]),
            format=raw.get("format"),
            options=dict(raw.get("options") or {}),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What loading a model will take, worked out before loading it."""

    estimate_bytes: int
    load: Callable[[], Engine]


class _Loaded:
    __slots__ = ("engine", "estimate_bytes", "in_use", "last_used")

    def __init__(self, engine: Engine, estimate_bytes: int) -> None:
        self.engine = engine
        self.estimate_bytes = estimate_bytes
        self.in_use = 0
        self.last_used = time.monotonic()


class ModelPool:
    def __init__(
        self,
        catalog: Mapping[str, ModelEntry],
        plan: Callable[[ModelEntry], Plan],
        *,
        budget_bytes: int | None = None,
        idle_unload_s: float | None = None,
        free_bytes: Callable[[], int] = lambda: psutil.virtual_memory().available,
    ) -> None:
        self.catalog = dict(catalog)
        self._plan = plan
        self.budget_bytes = budget_bytes
        self.idle_unload_s = idle_unload_s
        self._free_bytes = free_bytes
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        if idle_unload_s:
            threading.Thread(target=self._sweep_idle, name="idle-unload", daemon=True).start()

    def loaded(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._loaded)

    @contextlib.contextmanager
    def use(self, model_id: str) -> Iterator[Any]:
        """The engine for a model, loading it first if needed; kept loaded while in use."""
        with self._lock:
            slot = self._loaded.get(model_id) or self._load(model_id)
            slot.in_use += 1
        try:
            yield slot.engine
        finally:
            with self._lock:
                slot.in_use -= 1
                slot.last_used = time.monotonic()

    def unload(self, model_id: str) -> bool:
        with self._lock:
            slot = self._loaded.get(model_id)
            if slot is None or slot.in_use:
                return False
            del self._loaded[model_id]
        slot.engine.close()
        log.info("unloaded %s", model_id)
        return True

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            slots, self._loaded = list(self._loaded.values()), {}
        for slot in slots:
            slot.engine.close()

    def _load(self, model_id: str) -> _Loaded:
        entry = self.catalog.get(model_id)
        if entry is None:
            raise UnsupportedError(
                f"model {model_id!r} is not in this manager's catalog",
                reason="model_not_found",
                param="model",
            )
        plan = self._plan(entry)
        need = plan.estimate_bytes
        if self.budget_bytes is not None and need > self.budget_bytes:
            raise OomRamError(
                f"{model_id} needs about {need / MIB:.0f} MiB, more than the text memory budget "
                f"of {self.budget_bytes / MIB:.0f} MiB"
            )
        # Least recently used idle models go first until the new one fits.
        for victim in sorted(self._loaded, key=lambda m: self._loaded[m].last_used):
            if self._fits(need):
                break
            if not self._loaded[victim].in_use:
                self.unload(victim)
        if not self._fits(need):
            used = sum(s.estimate_bytes for s in self._loaded.values())
            raise OomRamError(
                f"{model_id} needs about {need / MIB:.0f} MiB; {self._free_bytes() / MIB:.0f} MiB of host "
                f"memory is free and {used / MIB:.0f} MiB is held by models in use"
            )
        started = time.monotonic()
        slot = _Loaded(plan.load(), need)
        self._loaded[model_id] = slot
        log.info("loaded %s in %.2f s (estimate %.0f MiB)", model_id, time.monotonic() - started, need / MIB)
        return slot

    def _fits(self, need: int) -> bool:
        if self.budget_bytes is not None:
            used = sum(s.estimate_bytes for s in self._loaded.values())
            if used + need > self.budget_bytes:
                return False
        return need <= self._free_bytes()

    def _sweep_idle(self) -> None:
        assert self.idle_unload_s is not None
        interval = max(0.05, min(1.0, self.idle_unload_s / 4))
        while not self._closed.wait(interval):
            now = time.monotonic()
            with self._lock:
                idle = [
                    m
                    for m, s in self._loaded.items()
                    if not s.in_use and now - s.last_used > self.idle_unload_s
                ]
            for model_id in idle:
                self.unload(model_id)
