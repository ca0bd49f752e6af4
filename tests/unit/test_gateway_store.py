"""The response store: rows expire after ttl_s, the oldest go first past max_stored, instances kept."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import sys

import pytest

from allm.gateway.config import Config, ConfigError
from allm.gateway.store import SqliteStore, open_store
from tests.clock import Clock


def _response(i: int) -> dict:
    return {"id": f"resp_{i}", "created_at": i, "output": []}


def test_a_stored_response_expires_after_its_ttl(tmp_path):
    clock = Clock()
    store = SqliteStore(tmp_path / "r.sqlite3", ttl_s=60, max_stored=10, clock=clock)
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
    store = SqliteStore(tmp_path / "r.sqlite3", ttl_s=60, max_stored=3, clock=clock)
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
    store = SqliteStore(path, ttl_s=10, max_stored=100, clock=clock)
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
    SqliteStore(path, ttl_s=10, max_stored=10).close()
    with sqlite3.connect(path) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "responses" not in tables
    assert "stored_responses" in tables


def test_instance_of_names_the_instance_that_served_a_response_until_it_expires(tmp_path):
    clock = Clock()
    store = SqliteStore(tmp_path / "r.sqlite3", ttl_s=60, max_stored=10, clock=clock)
    try:
        asyncio.run(store.put(_response(1), [], instance="ipc:///run/allm/text-1.sock"))
        asyncio.run(store.put(_response(2), []))
        assert asyncio.run(store.instance_of("resp_1")) == "ipc:///run/allm/text-1.sock"
        assert asyncio.run(store.instance_of("resp_2")) is None  # stored without one
        assert asyncio.run(store.instance_of("resp_unknown")) is None
        asyncio.run(store.put(_response(1), [], instance="ipc:///run/allm/text-0.sock"))  # replaced
        assert asyncio.run(store.instance_of("resp_1")) == "ipc:///run/allm/text-0.sock"
        clock.now += 61
        assert asyncio.run(store.instance_of("resp_1")) is None
    finally:
        store.close()


def test_a_table_without_the_instance_column_gets_it_and_keeps_its_rows(tmp_path):
    path = tmp_path / "r.sqlite3"
    clock = Clock()
    items = [{"type": "message", "id": "msg_1", "role": "user", "content": []}]
    with sqlite3.connect(path) as db:  # the layout before the instance column
        db.execute(
            "CREATE TABLE stored_responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
            "stored_at REAL NOT NULL, response TEXT NOT NULL, items TEXT NOT NULL)"
        )
        db.execute(
            "INSERT INTO stored_responses (id, stored_at, response, items) VALUES (?, ?, ?, ?)",
            ("resp_1", clock.now, '{"id": "resp_1", "created_at": 1, "output": []}', json.dumps(items)),
        )
    db.close()
    store = SqliteStore(path, ttl_s=60, max_stored=10, clock=clock)
    try:
        assert asyncio.run(store.get("resp_1")) == (_response(1), items)
        assert asyncio.run(store.instance_of("resp_1")) is None
        asyncio.run(store.put(_response(2), [], instance="ipc:///run/allm/text-0.sock"))
        assert asyncio.run(store.instance_of("resp_2")) == "ipc:///run/allm/text-0.sock"
    finally:
        store.close()
    SqliteStore(path, ttl_s=60, max_stored=10, clock=clock).close()  # a second start: nothing to add
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(stored_responses)")]
        assert columns == ["seq", "id", "stored_at", "response", "items", "instance"]
        assert db.execute("SELECT id FROM stored_responses ORDER BY seq").fetchall() == [
            ("resp_1",),
            ("resp_2",),
        ]
    db.close()


def test_without_database_url_the_store_is_sqlite_in_the_data_directory(tmp_path):
    store = open_store(dataclasses.replace(Config(), data_dir=tmp_path / "data"))
    try:
        assert isinstance(store, SqliteStore)
        assert store.path == tmp_path / "data" / "responses.sqlite3"
    finally:
        store.close()


def test_database_url_without_psycopg_refuses_to_start_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg now raises ImportError
    config = dataclasses.replace(Config(), data_dir=tmp_path, database_url="postgresql://allm@127.0.0.1/allm")
    with pytest.raises(ConfigError, match=r"database_url .*pip install 'allm\[postgres\]'"):
        open_store(config)
