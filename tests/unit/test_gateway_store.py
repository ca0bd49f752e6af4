"""The response store: rows expire after ttl_s, the oldest go first past max_stored."""

from __future__ import annotations

import asyncio
import sqlite3

from allm.gateway.store import ResponseStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _response(i: int) -> dict:
    return {"id": f"resp_{i}", "created_at": i, "output": []}


def test_a_stored_response_expires_after_its_ttl(tmp_path):
    clock = Clock()
    store = ResponseStore(tmp_path / "r.sqlite3", ttl_s=60, max_stored=10, clock=clock)
    try:
        items = [{"type": "message", "id": "msg_1", "role": "system", "content": []}]
        asyncio.run(store.put(_response(1), items))
        clock.now += 59
        assert asyncio.run(store.get("resp_1")) == (_response(1), items)
        clock.now += 2
        assert asyncio.run(store.get("resp_1")) is None
        assert asyncio.run(store.delete("resp_1")) is False
    finally:
        store.close()


def test_past_max_stored_the_oldest_go_first(tmp_path):
    clock = Clock()
    store = ResponseStore(tmp_path / "r.sqlite3", ttl_s=60, max_stored=3, clock=clock)
    try:
        for i in range(5):
            asyncio.run(store.put(_response(i), []))
        kept = [i for i in range(5) if asyncio.run(store.get(f"resp_{i}")) is not None]
        assert kept == [2, 3, 4]
        rows = store._db.execute("SELECT COUNT(*) FROM stored_responses").fetchone()[0]
        assert rows == 3
    finally:
        store.close()


def test_expired_rows_are_deleted_not_only_hidden(tmp_path):
    clock = Clock()
    path = tmp_path / "r.sqlite3"
    store = ResponseStore(path, ttl_s=10, max_stored=100, clock=clock)
    asyncio.run(store.put(_response(1), []))
    clock.now += 11
    asyncio.run(store.put(_response(2), []))
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT id FROM stored_responses").fetchall() == [("resp_2",)]


def test_the_first_layout_is_dropped(tmp_path):
    path = tmp_path / "r.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE responses (id TEXT PRIMARY KEY, created_at INTEGER, response TEXT, messages TEXT)"
        )
    ResponseStore(path, ttl_s=10, max_stored=10).close()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "responses" not in tables
    assert "stored_responses" in tables
