"""Stored responses (``store: true``) in SQLite under the data directory, expiring and bounded.

Each row keeps the response object as returned and the input items that led
to it (every earlier turn's items and outputs, then the request's own input),
so ``previous_response_id`` can continue it and ``input_items`` can list it.
A row is forgotten ``ttl_s`` after it was stored, and past ``max_stored`` rows
the oldest go first. Expiry runs on wall-clock time, not ``time.monotonic()``:
the rows outlive the process. Calls run in a thread: the event loop never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = (
    # the first layout kept chat messages without item ids: nothing can list or continue them
    "DROP TABLE IF EXISTS responses",
    """
    CREATE TABLE IF NOT EXISTS stored_responses (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        stored_at REAL NOT NULL,
        response TEXT NOT NULL,
        items TEXT NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS stored_responses_at ON stored_responses (stored_at)",
)

Stored = tuple[dict[str, Any], list[dict[str, Any]]]


class ResponseStore:
    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float,
        max_stored: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.ttl_s = ttl_s
        self.max_stored = max_stored
        self._clock = clock
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            for statement in SCHEMA:
                self._db.execute(statement)
            self._prune()

    def _prune(self) -> None:
        """Forget expired rows, then the oldest past the bound (the caller holds the lock)."""
        self._db.execute("DELETE FROM stored_responses WHERE stored_at < ?", (self._clock() - self.ttl_s,))
        self._db.execute(
            "DELETE FROM stored_responses WHERE seq <= "
            "(SELECT seq FROM stored_responses ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (self.max_stored,),
        )

    def _put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO stored_responses (id, stored_at, response, items) "
                "VALUES (?, ?, ?, ?)",
                (response["id"], self._clock(), json.dumps(response), json.dumps(items)),
            )
            self._prune()

    def _get(self, response_id: str) -> Stored | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, items FROM stored_responses WHERE id = ? AND stored_at >= ?",
                (response_id, self._clock() - self.ttl_s),
            ).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def _delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            deleted = self._db.execute(
                "DELETE FROM stored_responses WHERE id = ? AND stored_at >= ?",
                (response_id, self._clock() - self.ttl_s),
            ).rowcount
            self._prune()
        return deleted > 0

    async def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        await asyncio.to_thread(self._put, response, items)

    async def get(self, response_id: str) -> Stored | None:
        """The response and its input items; None when unknown, deleted or expired."""
        return await asyncio.to_thread(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await asyncio.to_thread(self._delete, response_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
