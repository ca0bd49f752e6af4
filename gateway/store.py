"""Stored responses (``store: true``) in SQLite under the data directory.

Each row keeps the response object as returned and the conversation that led
to it, so ``previous_response_id`` can continue it.  Calls run in a thread:
the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,
    messages TEXT NOT NULL
)
"""


class ResponseStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)

    def _put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                (response["id"], response["created_at"], json.dumps(response), json.dumps(messages)),
            )

    def _get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, messages FROM responses WHERE id = ?", (response_id,)
            ).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def _delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    async def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        await asyncio.to_thread(self._put, response, messages)

    async def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        return await asyncio.to_thread(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
