"""The pool's bookkeeping on a reload (configure) and its per-model counts, with a stand-in engine.

The real engines' loads and unloads under a reload are in tests/integration/test_stop_reload.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from allm.kernel.codes import UnsupportedError
from allm.managers.pool import ModelEntry, ModelPool, Plan
from tests.clock import Clock
from tests.waits import wait_for


class Engine:
    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.closed = False

    def close(self) -> None:
        self.closed = True


def pool(*entries: ModelEntry) -> tuple[ModelPool, list[Engine]]:
    made: list[Engine] = []

    def plan(entry: ModelEntry) -> Plan:
        def load(progress, reserve):
            engine = Engine(entry)
            made.append(engine)
            return engine

        return Plan(estimate_bytes=1000, load=load)

    return ModelPool({e.id: e for e in entries}, plan, free_bytes=lambda: 10**12), made


def entry(model_id: str, path: str = "/m.gguf", **options) -> ModelEntry:
    return ModelEntry(model_id, Path(path), options=options)


def wait_closed(engine: Engine) -> None:
    wait_for(lambda: engine.closed, 5, "the engine to be closed")


def test_an_unchanged_model_stays_loaded_and_a_removed_idle_one_leaves():
    p, made = pool(entry("a"), entry("b"))
    for model in ("a", "b"):
        with p.use(model):
            pass
    changes = p.configure({"a": entry("a"), "c": entry("c")})
    assert changes == {"added": ["c"], "removed": ["b"], "changed": []}
    [a, b] = made
    wait_closed(b)
    assert b.closed
    assert not a.closed
    assert p.loaded() == ("a",)
    with p.use("a") as engine:
        assert engine is a  # not loaded again
    assert p.stats()["b"]["unloads"] == 1
    assert p.stats()["a"]["loads"] == 1


def test_a_changed_model_in_use_finishes_on_its_old_engine_then_the_next_use_loads_the_new():
    p, made = pool(entry("a", n_ctx=512))
    with p.use("a") as old:
        changes = p.configure({"a": entry("a", n_ctx=1024)})
        assert changes["changed"] == ["a"]
        assert not old.closed  # its request runs on
        with p.use("a") as new:  # a request that comes now gets the new entry
            assert new is not old
            assert new.entry.options == {"n_ctx": 1024}
        assert not old.closed
    assert old.closed  # its last user is done
    assert p.loaded() == ("a",)
    with p.use("a") as again:
        assert again is made[1]
    assert p.stats()["a"]["loads"] == 2
    assert p.stats()["a"]["unloads"] == 1


def test_a_removed_model_in_use_is_unloaded_when_its_request_ends_and_refused_after():
    p, _made = pool(entry("a"))
    with p.use("a") as engine:
        p.configure({})
        assert not engine.closed
    assert engine.closed
    assert p.loaded() == ()
    with pytest.raises(UnsupportedError, match="not in this manager's catalog"), p.use("a"):
        pass


def test_stats_count_failed_loads_and_report_memory_only_while_loaded():
    p, _made = pool(entry("a"))

    def broken(entry_: ModelEntry) -> Plan:
        def load(progress, reserve):
            raise RuntimeError("no")

        return Plan(estimate_bytes=1000, load=load)

    with p.use("a"):
        pass
    assert p.stats()["a"]["memory_bytes"] == 1000
    p.unload("a")
    assert p.stats()["a"]["memory_bytes"] is None
    p._plan = broken
    with pytest.raises(RuntimeError), p.use("a"):
        pass
    assert p.stats()["a"]["load_failures"] == 1
    assert p.stats()["a"]["loads"] == 1


def test_a_model_unused_for_idle_unload_s_is_unloaded_and_one_in_use_never():
    clock = Clock()
    made: list[Engine] = []

    def plan(entry: ModelEntry) -> Plan:
        def load(progress, reserve):
            made.append(Engine(entry))
            return made[-1]

        return Plan(estimate_bytes=1000, load=load)

    p = ModelPool(
        {"a": entry("a"), "b": entry("b")}, plan, idle_unload_s=60, free_bytes=lambda: 10**12, clock=clock
    )
    try:
        with p.use("a"):
            pass
        clock.now += 30
        with p.use("b"):
            clock.now += 31  # a: 61 s unused; b: in use all along
            p.unload_idle()  # (the pool's own sweep, on the same clock, may have been first)
            assert p.loaded() == ("b",)
        assert made[0].closed
        assert not made[1].closed
        clock.now += 60  # b: exactly 60 s since its request ended, not past
        assert p.unload_idle() == []
        clock.now += 1
        p.unload_idle()
        assert p.loaded() == ()
        assert p.stats()["a"]["unloads"] == p.stats()["b"]["unloads"] == 1
    finally:
        p.close()


def test_the_catalogs_engines_are_imported_once_before_serving_and_a_broken_one_is_left_to_its_load(
    tmp_path, monkeypatch, caplog
):
    """A native library linked mid-load holds the GIL and silences heartbeats: import it first."""
    import sys

    from allm.kernel.codes import LoadFailedError
    from allm.managers import engines

    (tmp_path / "allm_test_engine_a.py").write_text("import builtins\nbuiltins.allm_test_imports += 1\n")
    (tmp_path / "allm_test_engine_b.py").write_text("raise RuntimeError('a broken build')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("builtins.allm_test_imports", 0, raising=False)
    good = engines.Engine("good", ("allm_test_engine_a",), None)
    broken = engines.Engine("broken", ("allm_test_engine_b",), None)
    absent = engines.Engine("absent", ("allm_test_engine_not_installed",), None)
    by_id = {"a": good, "a2": good, "b": broken, "c": absent, "d": None}

    def engine_of(entry: ModelEntry) -> engines.Engine | None:
        if entry.id == "unreadable":
            raise LoadFailedError("no such file", param="path")
        return by_id[entry.id]

    entries = [ModelEntry(i, Path("/m")) for i in ("unreadable", *by_id)]
    with caplog.at_level("INFO", logger="allm.engines"):
        engines.preload_engines(entries, engine_of)
    import builtins

    assert builtins.allm_test_imports == 1  # type: ignore[attr-defined]  # twice in the catalog, once here
    assert "allm_test_engine_a" in sys.modules
    assert "could not import the broken engine before serving" in caplog.text
    assert "absent" not in caplog.text  # not installed: its load says how to install it
    for name in ("allm_test_engine_a", "allm_test_engine_b"):
        sys.modules.pop(name, None)


def test_a_models_own_keep_alive_overrides_idle_unload_s_and_a_negative_one_keeps_it():
    """Ollama's keep_alive: the last request says how long its model stays once idle."""
    clock = Clock()
    p, _made = pool(entry("a"), entry("b"), entry("c"))
    p._clock = clock
    try:
        for model in ("a", "b", "c"):
            with p.use(model):
                pass
        p.keep_alive("a", 5)
        p.keep_alive("b", -1)  # never
        assert p.unload_in_s("a") == 5
        assert p.unload_in_s("b") is None
        assert p.unload_in_s("c") is None  # no idle_unload_s: loaded until asked
        assert p.stats()["a"]["unload_in_s"] == 5
        clock.now += 5
        assert p.unload_idle() == []  # exactly 5 s idle, not past
        clock.now += 1
        p.unload_idle()  # (the pool's own sweep, on the same clock, may have been first)
        assert p.loaded() == ("b", "c")
        p.idle_unload_s = 10  # the modality's setting still holds those without their own
        clock.now += 1000
        p.unload_idle()
        assert p.loaded() == ("b",)
    finally:
        p.close()
