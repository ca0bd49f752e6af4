"""Stored responses (``store: true``): SQLite under the data directory, or PostgreSQL shared by gateways.

Each row keeps the response object as returned, the input items that led to
it (every earlier turn's items and outputs, then the request's own input), so
``previous_response_id`` can continue it and ``input_items`` can list it, and
the manager instance that served it, so a continued conversation can go back
to the instance that holds its prefix cache. A row is forgotten ``ttl_s``
after it was stored, and past ``max_stored`` rows the oldest go first. Expiry
runs on wall-clock time, not ``time.monotonic()``: the rows outlive the
process (and, in PostgreSQL, are shared by gateways on other hosts, each
stamping rows with its own clock: a skew of seconds against a TTL of days).
Calls run in a thread of the store's own: the event loop never waits on the disk or the
network. A PostgreSQL call that takes longer than ``CALL_TIMEOUT_S`` (a server that keeps
the connection open but does not answer: frozen, or its host paused) is a 503 to its
request, and while it is still held the calls after it are 503 at once; the store is used
again as soon as the held call returns.

With ``database_url`` set, gateways behind one load balancer share the rows,
so any of them continues, retrieves or deletes a response another stored.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from allm.gateway.config import Config, ConfigError
from allm.gateway.errors import ApiError

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("allm.gateway")

Stored = tuple[dict[str, Any], list[dict[str, Any]]]
T = TypeVar("T")

#: how long a gateway waits to reach PostgreSQL, unless the URL says (connect_timeout)
CONNECT_TIMEOUT_S = 5
#: how long a client is told to wait, and the store waits before connecting again, after failing
RETRY_AFTER_S = 1
#: how long a PostgreSQL call may take, reconnecting included, before its request gets a 503
CALL_TIMEOUT_S = 15.0
# the details (host, port, user) are for the log, not for API clients
UNAVAILABLE = "the response store is unavailable; try again"


class StoreUnavailable(ApiError):
    """The shared store cannot be reached, even after reconnecting once: 503, try again."""

    def __init__(self, message: str) -> None:
        super().__init__(
            503,
            message,
            code="store_unavailable",
            type="server_error",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


class ResponseStore(abc.ABC):
    """What the gateway calls; each method runs its implementation's blocking twin in a thread."""

    #: seconds a call may take before its request gets a 503; None: as long as it takes
    call_timeout_s: float | None = None

    def __init__(self, *, ttl_s: float, max_stored: int, clock: Callable[[], float]) -> None:
        self.ttl_s = ttl_s
        self.max_stored = max_stored
        self._clock = clock
        self._lock = threading.Lock()  # one connection per store: one call on it at a time
        # One thread, as there is one connection: calls wait in its queue, not in threads, so
        # a call that hangs holds one thread and the others can still give up on their turn.
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="allm-store")
        self._held: concurrent.futures.Future[Any] | None = None  # a call that ran past call_timeout_s

    def _cutoff(self) -> float:
        """Rows stored before this wall-clock time have expired."""
        return self._clock() - self.ttl_s

    @abc.abstractmethod
    def _put(self, response: dict[str, Any], items: list[dict[str, Any]], instance: str | None) -> None: ...

    @abc.abstractmethod
    def _get(self, response_id: str) -> Stored | None: ...

    @abc.abstractmethod
    def _delete(self, response_id: str) -> bool: ...

    @abc.abstractmethod
    def _instance_of(self, response_id: str) -> str | None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    async def put(
        self, response: dict[str, Any], items: list[dict[str, Any]], *, instance: str | None = None
    ) -> None:
        """Store (or replace, by id) a response; ``instance``: the manager endpoint that served it."""
        await self._call(self._put, response, items, instance)

    async def get(self, response_id: str) -> Stored | None:
        """The response and its input items; None when unknown, deleted or expired."""
        return await self._call(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        return await self._call(self._delete, response_id)

    async def instance_of(self, response_id: str) -> str | None:
        """The manager instance endpoint that served it; None when unknown, expired or not recorded."""
        return await self._call(self._instance_of, response_id)

    async def _call(self, blocking: Callable[..., T], *args: Any) -> T:
        """``blocking(*args)`` on the store's thread, given up after ``call_timeout_s``."""
        held = self._held
        if held is not None:
            if not held.done():
                raise StoreUnavailable(UNAVAILABLE)
            self._held = None
            log.warning("stored responses: the database answered again")
        future = self._thread.submit(blocking, *args)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.call_timeout_s)
        except TimeoutError:
            if not future.cancel():  # it was running, not waiting its turn: the database holds it
                self._held = future
                log.error(
                    "stored responses: the database did not answer in %g s; 503 until it does",
                    self.call_timeout_s,
                )
            raise StoreUnavailable(UNAVAILABLE) from None

    def close(self) -> None:
        """Close, without waiting on a call the database holds."""
        self._thread.shutdown(wait=False, cancel_futures=True)
        if self._lock.acquire(timeout=1.0):
            self._lock.release()
            self._close()
        else:
            log.warning("stored responses: closing while the database still holds a call")


def check(config: Config) -> None:
    """Raise ConfigError when ``config`` names a store this install cannot open; connects nowhere."""
    if config.database_url is None:
        return
    try:
        import psycopg  # noqa: F401 - only to know it is there
    except ImportError as exc:
        raise ConfigError(
            "setting database_url needs PostgreSQL support, which is not installed: "
            "pip install 'allm[postgres]'"
        ) from exc


def open_store(config: Config, *, clock: Callable[[], float] = time.time) -> ResponseStore:
    """The store ``config`` names: PostgreSQL at ``database_url``, else SQLite in the data directory.

    Blocking (it connects and creates the table): call it in a thread. Raises ConfigError when
    ``database_url`` is set and psycopg is not installed (see ``check``).
    """
    check(config)
    if config.database_url is None:
        return SqliteStore(
            config.data_dir.expanduser() / "responses.sqlite3",
            ttl_s=config.responses_ttl_s,
            max_stored=config.responses_max_stored,
            clock=clock,
        )
    return PostgresStore(
        config.database_url,
        ttl_s=config.responses_ttl_s,
        max_stored=config.responses_max_stored,
        clock=clock,
    )


# -- SQLite ---------------------------------------------------------------------------------

SQLITE_SCHEMA = (
    # the first layout kept chat messages without item ids: nothing can list or continue them
    "DROP TABLE IF EXISTS responses",
    """
    CREATE TABLE IF NOT EXISTS stored_responses (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        stored_at REAL NOT NULL,
        response TEXT NOT NULL,
        items TEXT NOT NULL,
        instance TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS stored_responses_at ON stored_responses (stored_at)",
)


class SqliteStore(ResponseStore):
    def __init__(
        self,
        path: Path,
        *,
        ttl_s: float,
        max_stored: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl_s=ttl_s, max_stored=max_stored, clock=clock)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            for statement in SQLITE_SCHEMA:
                self._db.execute(statement)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(stored_responses)")}
            if "instance" not in columns:  # a table from before the column: keep its rows
                self._db.execute("ALTER TABLE stored_responses ADD COLUMN instance TEXT")
            self._prune()

    def _prune(self) -> None:
        """Forget expired rows, then the oldest past the bound (the caller holds the lock)."""
        self._db.execute("DELETE FROM stored_responses WHERE stored_at < ?", (self._cutoff(),))
        self._db.execute(
            "DELETE FROM stored_responses WHERE seq <= "
            "(SELECT seq FROM stored_responses ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (self.max_stored,),
        )

    def _put(self, response: dict[str, Any], items: list[dict[str, Any]], instance: str | None) -> None:
        with self._lock, self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO stored_responses (id, stored_at, response, items, instance) "
                "VALUES (?, ?, ?, ?, ?)",
                (response["id"], self._clock(), json.dumps(response), json.dumps(items), instance),
            )
            self._prune()

    def _get(self, response_id: str) -> Stored | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, items FROM stored_responses WHERE id = ? AND stored_at >= ?",
                (response_id, self._cutoff()),
            ).fetchone()
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def _delete(self, response_id: str) -> bool:
        with self._lock, self._db:
            deleted = self._db.execute(
                "DELETE FROM stored_responses WHERE id = ? AND stored_at >= ?",
                (response_id, self._cutoff()),
            ).rowcount
            self._prune()
        return deleted > 0

    def _instance_of(self, response_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT instance FROM stored_responses WHERE id = ? AND stored_at >= ?",
                (response_id, self._cutoff()),
            ).fetchone()
        return None if row is None else row[0]

    def _close(self) -> None:
        with self._lock:
            self._db.close()


# -- PostgreSQL -----------------------------------------------------------------------------

#: pg_advisory_xact_lock keys: one for creating the table, one serializing the pruning that
#: keeps the bound (gateways that insert at once would each prune against a count that misses
#: the other's uncommitted row, and leave max_stored + 1 rows)
SCHEMA_LOCK = 0x616C6C6D_0001
WRITE_LOCK = 0x616C6C6D_0002

POSTGRES_SCHEMA = (
    # The JSON stays text: jsonb would reorder the keys of the objects we return.
    """
    CREATE TABLE IF NOT EXISTS allm_stored_responses (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        stored_at DOUBLE PRECISION NOT NULL,
        response TEXT NOT NULL,
        items TEXT NOT NULL,
        instance TEXT
    )
    """,
    "CREATE INDEX IF NOT EXISTS allm_stored_responses_at ON allm_stored_responses (stored_at)",
)


class PostgresStore(ResponseStore):
    """One connection, reopened once when a call finds it broken (PostgreSQL restarted, say)."""

    call_timeout_s: float | None = CALL_TIMEOUT_S

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        max_stored: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(ttl_s=ttl_s, max_stored=max_stored, clock=clock)
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        self._psycopg = psycopg
        # a database that does not answer fails the call in seconds, unless the URL says otherwise
        if "connect_timeout" not in conninfo_to_dict(url):
            url = make_conninfo(url, connect_timeout=CONNECT_TIMEOUT_S)
        self._conninfo = url
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        #: until when (time.monotonic()) a call answers 503 at once instead of connecting again
        self._down_until = 0.0
        # A database that is down at start does not stop the gateway: it serves what needs no
        # stored response, and connects (creating the table) at the first call that does.
        with self._lock:
            try:
                conn = self._connection()  # and the table, if it is missing
                with conn.transaction():
                    self._prune(conn)
            except psycopg.Error as exc:
                self._drop()
                log.warning(
                    "setting database_url: cannot use the database yet (%s); requests that need "
                    "a stored response get 503 until it can be used",
                    exc,
                )

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        """A new connection, the table made sure of (the caller holds the lock)."""
        # prepare_threshold=None: no server-side prepared statements, which poolers in
        # transaction mode (PgBouncer) cannot follow from one server connection to the next
        conn = self._psycopg.connect(self._conninfo, autocommit=True, prepare_threshold=None)
        try:
            # Only a missing table is created: CREATE … IF NOT EXISTS checks the right to create
            # before it looks, and a user with rights on the table alone would fail on it.
            if conn.execute("SELECT to_regclass('allm_stored_responses')").fetchone() == (None,):
                with conn.transaction():
                    # nor is it safe against itself: gateways starting at once may both try to
                    # create the table, and one fails
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                    for statement in POSTGRES_SCHEMA:
                        conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, call: Callable[[psycopg.Connection[tuple[Any, ...]]], T]) -> T:
        """``call(connection)``; on a database error once more on a new connection, then 503.

        After a call fails twice the next ones fail at once for RETRY_AFTER_S: a database that
        does not answer costs them no connect timeout each, queued behind the lock.
        """
        with self._lock:
            if self._conn is None and time.monotonic() < self._down_until:
                raise StoreUnavailable(UNAVAILABLE)
            try:
                return call(self._connection())
            except self._psycopg.Error as exc:
                self._drop()
                log.warning("stored responses: PostgreSQL failed (%s); reconnecting", exc)
            try:
                return call(self._connection())
            except self._psycopg.Error as exc:
                self._drop()
                self._down_until = time.monotonic() + RETRY_AFTER_S
                log.error("stored responses: PostgreSQL failed again after reconnecting: %s", exc)
                raise StoreUnavailable(UNAVAILABLE) from exc

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _prune(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        """Forget expired rows, then the oldest past the bound (in the caller's transaction).

        The lock makes the writers of all gateways take turns here; each statement after it
        (READ COMMITTED) sees every row the others committed, so the bound holds.
        """
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        conn.execute("DELETE FROM allm_stored_responses WHERE stored_at < %s", (self._cutoff(),))
        conn.execute(
            "DELETE FROM allm_stored_responses WHERE seq <= "
            "(SELECT seq FROM allm_stored_responses ORDER BY seq DESC LIMIT 1 OFFSET %s)",
            (self.max_stored,),
        )

    def _put(self, response: dict[str, Any], items: list[dict[str, Any]], instance: str | None) -> None:
        row = (response["id"], self._clock(), json.dumps(response), json.dumps(items), instance)

        def put(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            with conn.transaction():
                # seq = DEFAULT: a replaced row counts as the newest, as SQLite's INSERT OR REPLACE
                conn.execute(
                    "INSERT INTO allm_stored_responses (id, stored_at, response, items, instance) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET seq = DEFAULT, "
                    "stored_at = EXCLUDED.stored_at, response = EXCLUDED.response, "
                    "items = EXCLUDED.items, instance = EXCLUDED.instance",
                    row,
                )
                self._prune(conn)

        self._run(put)

    def _get(self, response_id: str) -> Stored | None:
        def get(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[Any, ...] | None:
            return conn.execute(
                "SELECT response, items FROM allm_stored_responses WHERE id = %s AND stored_at >= %s",
                (response_id, self._cutoff()),
            ).fetchone()

        row = self._run(get)
        return None if row is None else (json.loads(row[0]), json.loads(row[1]))

    def _delete(self, response_id: str) -> bool:
        def delete(conn: psycopg.Connection[tuple[Any, ...]]) -> bool:
            with conn.transaction():
                deleted = conn.execute(
                    "DELETE FROM allm_stored_responses WHERE id = %s AND stored_at >= %s",
                    (response_id, self._cutoff()),
                ).rowcount
                self._prune(conn)
            return deleted > 0

        return self._run(delete)

    def _instance_of(self, response_id: str) -> str | None:
        def instance_of(conn: psycopg.Connection[tuple[Any, ...]]) -> str | None:
            row = conn.execute(
                "SELECT instance FROM allm_stored_responses WHERE id = %s AND stored_at >= %s",
                (response_id, self._cutoff()),
            ).fetchone()
            return None if row is None else row[0]

        return self._run(instance_of)

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
