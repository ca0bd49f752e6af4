"""A manager's models in memory: load on demand within a budget, evict LRU, unload when idle.

Before a load, the memory a model needs is estimated from its files (weights
plus the key/value cache for its context) and compared with the budget and
with what the host has free.  A model that cannot fit is OOM_RAM with both
figures, instead of a load that takes the machine down.  A context loaded
later for a model in memory (llama.cpp's embedding context) reserves its
share the same way.

A model pinned (``pin``: ``POST /v1/models/{id}/pin``) is never taken out to make
room, nor unloaded when idle; a load that would need its memory is OOM_RAM. The pin
belongs to the model's id in this process: it lasts while the model stays in the
catalog, and an explicit unload (the ``unload`` op) drops it.

A load can take minutes (a 7B model in float32, a slow disk), so nothing that
heartbeats or status reads waits for one: the bookkeeping lock is never held
across a load, and ``loaded()``/``loading()`` read snapshots.  One model loads
at a time; a request for a model being loaded waits for that load (within its
deadline) instead of loading it twice.  A load runs as its request's
``phase``: the loader's progress feeds the watchdog, which declares a load
stuck only when its progress stops for ``load_stall_s``.
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

from allm.kernel.codes import OomRamError, UnsupportedError
from allm.kernel.contract import ManagerInfo, Reply, RequestContext
from allm.managers import engines

log = logging.getLogger("allm.pool")

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


Progress = Callable[[float], None]  # a load's fraction done, 0.0 … 1.0


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What loading a model will take, worked out before loading it."""

    estimate_bytes: int
    load: Callable[[Progress, Callable[[int, str], None]], Engine]  # (progress, reserve)


class _Loading:
    __slots__ = ("fraction", "started")

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.fraction: float | None = None


class _Loaded:
    __slots__ = (
        "closed",
        "engine",
        "entry",
        "estimate_bytes",
        "in_use",
        "keep_alive_s",
        "last_used",
        "stale",
    )

    def __init__(self, engine: Engine, estimate_bytes: int, entry: ModelEntry, now: float) -> None:
        self.engine = engine
        self.estimate_bytes = estimate_bytes
        self.entry = entry  # the catalog entry it was loaded from
        self.in_use = 0
        self.last_used = now  # on the pool's clock
        self.stale = False  # its entry changed or left the catalog: closed when its last user is done
        self.closed = False
        #: idle seconds before it is unloaded, as its last request asked (None: the pool's
        #: idle_unload_s; negative: never)
        self.keep_alive_s: float | None = None


@dataclasses.dataclass(slots=True)
class ModelStats:
    """What happened to one model in this process: for /metrics, through the heartbeat."""

    loads: int = 0
    load_failures: int = 0
    load_s: float = 0.0  # total seconds of the loads that succeeded
    unloads: int = 0
    last_used_at: float | None = None  # wall-clock time a request last finished with it


class ModelPool:
    def __init__(
        self,
        catalog: Mapping[str, ModelEntry],
        plan: Callable[[ModelEntry], Plan],
        *,
        budget_bytes: int | None = None,
        idle_unload_s: float | None = None,
        free_bytes: Callable[[], int] = lambda: psutil.virtual_memory().available,
        load_stall_s: float | None = None,
        modality: str = "text",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: when a model was last used and is idle since (tests hand-set it)."""
        self.catalog = dict(catalog)
        self._clock = clock
        self.modality = modality  # names the budget in messages
        self._plan = plan
        self.budget_bytes = budget_bytes
        self.idle_unload_s = idle_unload_s
        self.load_stall_s = load_stall_s
        self._free_bytes = free_bytes
        self._loaded: dict[str, _Loaded] = {}
        self._loading: dict[str, _Loading] = {}
        self._names: tuple[str, ...] = ()  # snapshot of _loaded's keys, for heartbeats
        self._stats: dict[str, ModelStats] = {}
        self._pinned: set[str] = set()  # never evicted nor unloaded when idle
        self._lock = threading.RLock()  # bookkeeping only: never held across a load
        self._load_lock = threading.Lock()  # one load at a time, so budgets add up
        self._closed = threading.Event()
        threading.Thread(target=self._sweep_idle, name="idle-unload", daemon=True).start()

    def loaded(self) -> tuple[str, ...]:
        """The models in memory; never waits (heartbeats call it)."""
        return self._names

    def loading(self) -> dict[str, dict[str, float | None]]:
        """The models being loaded, with seconds elapsed and fraction done; never waits."""
        now = time.monotonic()
        return {
            model: {"elapsed_s": round(now - rec.started, 2), "fraction": rec.fraction}
            for model, rec in list(self._loading.items())
        }

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each model's loads, failures, load time, unloads and the memory it holds; never waits."""
        loaded = dict(list(self._loaded.items()))
        out: dict[str, dict[str, Any]] = {}
        for model, st in list(self._stats.items()):
            slot = loaded.get(model)
            unload_in_s = self.unload_in_s(model) if slot is not None else None
            out[model] = {
                **dataclasses.asdict(st),
                "load_s": round(st.load_s, 3),
                "memory_bytes": None if slot is None else slot.estimate_bytes,
                "unload_in_s": None if unload_in_s is None else round(unload_in_s, 3),
            }
            engine_stats = getattr(slot and slot.engine, "engine_stats", None)
            if engine_stats is not None:  # what an engine tells of itself (saved prefixes, drafts)
                out[model].update(engine_stats())
        return out

    @contextlib.contextmanager
    def use(self, model_id: str, ctx: RequestContext | None = None) -> Iterator[Any]:
        """The engine for a model, loading it first if needed; kept loaded while in use."""
        slot = self._acquire(model_id, ctx)
        try:
            yield slot.engine
        finally:
            self._release(model_id, slot)

    def _release(self, model_id: str, slot: _Loaded) -> None:
        with self._lock:
            slot.in_use -= 1
            slot.last_used = self._clock()
            self._stats.setdefault(model_id, ModelStats()).last_used_at = time.time()
            if not slot.stale or slot.in_use or slot.closed:
                return
            self._forget(model_id, slot)
        slot.engine.close()
        log.info("unloaded %s: its catalog entry changed or was removed", model_id)

    def _forget(self, model_id: str, slot: _Loaded) -> None:
        """Take a slot out of the pool (under the lock): the caller closes its engine."""
        slot.closed = True
        if self._loaded.get(model_id) is slot:
            del self._loaded[model_id]
            self._names = tuple(self._loaded)
        self._stats.setdefault(model_id, ModelStats()).unloads += 1

    def configure(self, catalog: Mapping[str, ModelEntry]) -> dict[str, list[str]]:
        """Take a new catalog (a reload): a model whose entry is the same stays loaded and serves
        on; one whose entry changed or left is unloaded as soon as no request uses it, and the
        next request for a changed one loads it anew. Never waits for an engine to close."""
        with self._lock:
            old, self.catalog = self.catalog, dict(catalog)
            self._pinned &= set(self.catalog)
            stale = [(m, s) for m, s in self._loaded.items() if self.catalog.get(m) != s.entry]
            idle = []
            for model_id, slot in stale:
                slot.stale = True
                if not slot.in_use:
                    self._forget(model_id, slot)
                    idle.append((model_id, slot))

        def close() -> None:
            for model_id, slot in idle:
                slot.engine.close()
                log.info("unloaded %s: its catalog entry changed or was removed", model_id)

        if idle:
            threading.Thread(target=close, name="reload-unload", daemon=True).start()
        return {
            "added": sorted(set(self.catalog) - set(old)),
            "removed": sorted(set(old) - set(self.catalog)),
            "changed": sorted(m for m in set(old) & set(self.catalog) if old[m] != self.catalog[m]),
        }

    def unload(self, model_id: str) -> bool:
        with self._lock:
            slot = self._loaded.get(model_id)
            if slot is None or slot.in_use:
                return False
            self._forget(model_id, slot)
        slot.engine.close()
        log.info("unloaded %s", model_id)
        return True

    def pin(self, model_id: str) -> None:
        """Keep ``model_id`` loaded: no eviction, no idle unload (it is loaded already: ``use``)."""
        with self._lock:
            self._pinned.add(model_id)

    def unpin(self, model_id: str) -> bool:
        """Let ``model_id`` go again like any other; False when it was not pinned."""
        with self._lock:
            pinned = model_id in self._pinned
            self._pinned.discard(model_id)
            return pinned

    def pinned(self) -> tuple[str, ...]:
        """The pinned models; never waits (heartbeats call it)."""
        return tuple(sorted(self._pinned))

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            slots, self._loaded, self._names = list(self._loaded.values()), {}, ()
        for slot in slots:
            slot.engine.close()

    def _take(self, model_id: str) -> _Loaded | None:
        with self._lock:
            slot = self._loaded.get(model_id)
            if slot is None or slot.stale:  # a stale one serves only those already using it
                return None
            slot.in_use += 1
            return slot

    def _acquire(self, model_id: str, ctx: RequestContext | None) -> _Loaded:
        slot = self._take(model_id)
        if slot is not None:
            return slot
        # Wait for any other load first (checking our own deadline and cancel):
        # it may be this very model, and budgets only add up one load at a time.
        while not self._load_lock.acquire(timeout=0.1):
            if ctx is not None:
                ctx.check()
        try:
            slot = self._take(model_id)
            if slot is not None:
                return slot
            self._loading[model_id] = record = _Loading()
            try:
                phase = (
                    ctx.phase(f"load of model {model_id!r}", self.load_stall_s)
                    if ctx is not None
                    else contextlib.nullcontext()
                )
                with phase:

                    def progress(fraction: float) -> None:
                        record.fraction = fraction
                        if ctx is not None:
                            ctx.progress(fraction)

                    slot = self._load(model_id, progress)
            except Exception:
                if model_id in self.catalog:
                    self._stats.setdefault(model_id, ModelStats()).load_failures += 1
                raise
            finally:
                del self._loading[model_id]
            stats = self._stats.setdefault(model_id, ModelStats())
            stats.loads += 1
            stats.load_s += time.monotonic() - record.started
            with self._lock:
                slot.in_use += 1
                # Reloaded meanwhile: it serves this request, then leaves.
                slot.stale = self.catalog.get(model_id) != slot.entry
                self._loaded[model_id] = slot
                self._names = tuple(self._loaded)
            return slot
        finally:
            self._load_lock.release()

    def _load(self, model_id: str, progress: Progress) -> _Loaded:
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
                f"{model_id} needs about {need / MIB:.0f} MiB, more than the {self.modality} memory budget "
                f"of {self.budget_bytes / MIB:.0f} MiB"
            )
        self._make_room(need, model_id)
        started = time.monotonic()
        holder: list[_Loaded] = []

        def reserve(extra_bytes: int, what: str) -> None:
            """A context loaded later for this model takes its share of the budget too."""
            self._make_room(extra_bytes, f"{what} of {model_id}")
            with self._lock:
                holder[0].estimate_bytes += extra_bytes

        slot = _Loaded(plan.load(progress, reserve), need, entry, self._clock())
        holder.append(slot)
        log.info("loaded %s in %.2f s (estimate %.0f MiB)", model_id, time.monotonic() - started, need / MIB)
        return slot

    def _make_room(self, need: int, what: str) -> None:
        """Unload least recently used idle models until ``need`` fits, or raise OOM_RAM."""
        with self._lock:
            order = sorted(
                (m for m in self._loaded if m not in self._pinned), key=lambda m: self._loaded[m].last_used
            )
        for victim in order:
            if self._fits(need):
                break
            self.unload(victim)  # refuses a model in use
        if not self._fits(need):
            with self._lock:
                used = sum(s.estimate_bytes for s in self._loaded.values())
                pinned = [m for m in self._loaded if m in self._pinned]
            raise OomRamError(
                f"{what} needs about {need / MIB:.0f} MiB; {self._free_bytes() / MIB:.0f} MiB of host "
                f"memory is free and {used / MIB:.0f} MiB is held by models in use"
                + (f" or pinned ({', '.join(pinned)}: unpin one to make room)" if pinned else "")
                + (
                    f" ({self.modality} memory budget {self.budget_bytes / MIB:.0f} MiB)"
                    if self.budget_bytes
                    else ""
                )
            )

    def _fits(self, need: int) -> bool:
        if self.budget_bytes is not None:
            with self._lock:
                used = sum(s.estimate_bytes for s in self._loaded.values())
            if used + need > self.budget_bytes:
                return False
        return need <= self._free_bytes()

    def keep_alive(self, model_id: str, seconds: float) -> None:
        """Unload ``model_id`` once idle this long from now on (Ollama's keep_alive; negative: never)."""
        with self._lock:
            slot = self._loaded.get(model_id)
            if slot is not None:
                slot.keep_alive_s = seconds

    def _idle_limit(self, slot: _Loaded) -> float | None:
        """Idle seconds before ``slot`` is unloaded; None: never."""
        if slot.entry.id in self._pinned:
            return None
        limit = self.idle_unload_s if slot.keep_alive_s is None else slot.keep_alive_s
        return None if limit is None or limit < 0 or (limit == 0 and slot.keep_alive_s is None) else limit

    def unload_idle(self) -> list[str]:
        """Unload the models no request used for their idle limit; returns their ids."""
        now = self._clock()
        with self._lock:
            idle = []
            for model_id, slot in self._loaded.items():
                limit = self._idle_limit(slot)
                if limit is not None and not slot.in_use and now - slot.last_used > limit:
                    idle.append(model_id)
        return [model_id for model_id in idle if self.unload(model_id)]

    def unload_in_s(self, model_id: str) -> float | None:
        """Seconds until ``model_id`` is unloaded if no request comes; None: never (or not loaded)."""
        with self._lock:
            slot = self._loaded.get(model_id)
            limit = None if slot is None else self._idle_limit(slot)
            if slot is None or limit is None:
                return None
            return max(0.0, limit - (0 if slot.in_use else self._clock() - slot.last_used))

    def _sweep_idle(self) -> None:
        while not self._closed.wait(self._sweep_interval()):
            self.unload_idle()

    def _sweep_interval(self) -> float:
        """A quarter of the shortest idle limit, within 50 ms and 1 s."""
        with self._lock:
            limits = [limit for s in self._loaded.values() if (limit := self._idle_limit(s)) is not None]
        return max(0.05, min([1.0, *(limit / 4 for limit in limits)]))


class PooledManager:
    """A manager whose models live in a ModelPool: the operations every modality shares.

    ``models`` (answered on the I/O thread), ``load``, ``unload``, ``pin`` and ``unpin`` are the
    pool's; any op in ``operations`` is the loaded engine's method of that name, called with the
    request.
    ``engine_of``: the engine an entry of the catalog needs (None: not known yet), so that
    the engines of the catalog are imported before the manager serves (Engine.preload).
    """

    inline_ops = frozenset({"models", "configure", "unpin"})

    def __init__(
        self,
        info: ManagerInfo,
        plan: Callable[[ModelEntry], Plan],
        *,
        operations: frozenset[str],
        engine_of: Callable[[ModelEntry], engines.Engine | None] | None = None,
    ) -> None:
        settings = info.settings
        entries = [ModelEntry.from_settings(raw) for raw in settings.get("models", [])]
        if engine_of is not None:
            engines.preload_engines(entries, engine_of)
        self.operations = operations
        self.pool = ModelPool(
            {e.id: e for e in entries},
            plan,
            budget_bytes=settings.get("memory_budget_bytes"),
            idle_unload_s=settings.get("idle_unload_s"),
            load_stall_s=settings.get("load_stall_s"),
            modality=info.modality,
        )

    def models(self) -> tuple[str, ...]:
        return self.pool.loaded()

    def status(self) -> dict[str, Any]:
        # catalog: what this instance can serve, so that a gateway routes a model's requests
        # only to instances that have it (hosts may hold different catalogs)
        return {
            "loading": self.pool.loading(),
            "model_stats": self.pool.stats(),
            "catalog": sorted(self.pool.catalog),
            "pinned": list(self.pool.pinned()),
        }

    def close(self) -> None:
        self.pool.close()

    def handle(self, ctx: RequestContext) -> Reply:
        if ctx.op == "models":
            loaded = set(self.pool.loaded())
            listing = [
                {"id": m, "state": "loaded" if m in loaded else "available"} for m in self.pool.catalog
            ]
            return Reply({"models": listing})
        if ctx.op == "unload":  # asked for: its pin goes with it (one in use stays, pinned)
            unloaded = self.pool.unload(ctx.model)
            if unloaded:
                self.pool.unpin(ctx.model)
            return Reply({"unloaded": unloaded})
        if ctx.op == "unpin":
            return Reply({"unpinned": self.pool.unpin(ctx.model)})
        if ctx.op == "configure":  # a reload: the new catalog of this modality
            entries = [ModelEntry.from_settings(raw) for raw in ctx.params.get("models", [])]
            changes = self.pool.configure({e.id: e for e in entries})
            log.info("catalog reloaded: %s", changes)
            return Reply(changes)
        if ctx.op not in self.operations and ctx.op not in ("load", "pin"):
            raise UnsupportedError(f"the {self.pool.modality} manager has no operation {ctx.op!r}")
        keep_alive_s = ctx.params.pop("keep_alive_s", None)  # for the pool, not the engine
        if keep_alive_s is not None and (
            not isinstance(keep_alive_s, int | float) or isinstance(keep_alive_s, bool)
        ):
            raise UnsupportedError(
                f"keep_alive_s must be a number of seconds, got {keep_alive_s!r}", param="keep_alive_s"
            )
        with self.pool.use(ctx.model, ctx) as engine:
            if keep_alive_s is not None:
                self.pool.keep_alive(ctx.model, float(keep_alive_s))
            if ctx.op == "load":
                return Reply({"loaded": ctx.model})
            if ctx.op == "pin":  # loaded now (by ``use``), and kept
                self.pool.pin(ctx.model)
                return Reply({"pinned": ctx.model})
            result: Reply = getattr(engine, ctx.op)(ctx)
            return result
