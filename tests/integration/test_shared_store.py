"""Stored responses in a real PostgreSQL server: two gateways continue each other's conversations.

The store alone first (the same semantics as SQLite's, and two stores on one database as two
gateways), then two real ``allm serve`` behind no balancer at all: a conversation stored on
one is continued, listed, retrieved and deleted on the other, and a PostgreSQL that stops
gives a clean 503 until it is back.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import threading

import psycopg
import pytest

from allm.gateway.store import PostgresStore, StoreUnavailable
from tests.clock import Clock
from tests.model_files import smollm2_path
from tests.postgres_server import postgres_server
from tests.waits import wait_for

from .gateway_server import ALLM, ROOT, free_port, running_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
_databases = itertools.count()


def _response(i: int) -> dict:
    return {"id": f"resp_{i}", "created_at": i, "output": [], "status": "completed"}


@pytest.fixture(scope="module")
def pg():
    with postgres_server() as server:
        yield server


@pytest.fixture
def database(pg):
    """A new database of its own for each test."""
    return pg.create_database(f"allm_{os.getpid()}_{next(_databases)}")


@pytest.fixture
def stores():
    """Stores a test opens, closed after it."""
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        store.close()


def _open(stores, url, **kw) -> PostgresStore:
    kw.setdefault("ttl_s", 60)
    kw.setdefault("max_stored", 100)
    store = PostgresStore(url, **kw)
    stores.append(store)
    return store


def _rows(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM allm_stored_responses ORDER BY seq")]


# -- the store against PostgreSQL ---------------------------------------------------------


def test_the_table_is_created_on_start(database, stores):
    _open(stores, database)
    assert _rows(database) == []


def test_put_get_instance_of_and_delete_round_trip(database, stores):
    store = _open(stores, database)
    items = [
        {"type": "message", "id": "msg_1", "role": "user", "content": [{"type": "input_text", "text": "é"}]}
    ]
    asyncio.run(store.put(_response(1), items, instance="ipc:///run/allm/text-1.sock"))
    assert asyncio.run(store.get("resp_1")) == (_response(1), items)
    assert list(asyncio.run(store.get("resp_1"))[0]) == list(_response(1))  # key order kept
    assert asyncio.run(store.instance_of("resp_1")) == "ipc:///run/allm/text-1.sock"
    asyncio.run(store.put(_response(2), []))
    assert asyncio.run(store.instance_of("resp_2")) is None
    assert asyncio.run(store.get("resp_unknown")) is None
    assert asyncio.run(store.delete("resp_1")) is True
    assert asyncio.run(store.delete("resp_1")) is False
    assert asyncio.run(store.get("resp_1")) is None
    assert asyncio.run(store.instance_of("resp_1")) is None


def test_a_stored_response_expires_after_its_ttl_and_is_then_deleted(database, stores):
    clock = Clock()
    store = _open(stores, database, ttl_s=60, clock=clock)
    asyncio.run(store.put(_response(1), [], instance="ipc://a"))
    clock.now += 59
    assert asyncio.run(store.get("resp_1")) is not None
    clock.now += 2
    assert asyncio.run(store.get("resp_1")) is None
    assert asyncio.run(store.instance_of("resp_1")) is None
    assert asyncio.run(store.delete("resp_1")) is False
    asyncio.run(store.put(_response(2), []))
    assert _rows(database) == ["resp_2"]  # deleted, not only hidden


def test_past_max_stored_the_oldest_go_first_and_a_replaced_row_is_the_newest(database, stores):
    store = _open(stores, database, max_stored=3)
    for i in range(4):
        asyncio.run(store.put(_response(i), []))
    assert _rows(database) == ["resp_1", "resp_2", "resp_3"]
    asyncio.run(store.put(_response(1), [], instance="ipc://b"))  # INSERT or replace, by id
    asyncio.run(store.put(_response(4), []))
    assert _rows(database) == ["resp_3", "resp_1", "resp_4"]
    assert asyncio.run(store.instance_of("resp_1")) == "ipc://b"


def test_two_stores_on_one_database_share_their_rows_like_two_gateways(database, stores):
    a, b = _open(stores, database), _open(stores, database)
    asyncio.run(a.put(_response(1), [{"type": "message"}], instance="ipc://a"))
    assert asyncio.run(b.get("resp_1")) == (_response(1), [{"type": "message"}])
    assert asyncio.run(b.instance_of("resp_1")) == "ipc://a"
    assert asyncio.run(b.delete("resp_1")) is True
    assert asyncio.run(a.get("resp_1")) is None


def test_gateways_inserting_at_once_keep_the_bound(database, stores):
    bound, rounds = 5, 20
    gateways = [_open(stores, database, max_stored=bound) for _ in range(4)]
    for r in range(rounds):  # each round all insert at once; the last to commit must see the others
        start = threading.Barrier(len(gateways))

        def insert(n: int, store: PostgresStore, start=start, r=r) -> None:
            start.wait()
            store._put(_response(r * 100 + n), [], None)

        threads = [threading.Thread(target=insert, args=(n, s)) for n, s in enumerate(gateways)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(_rows(database)) == min(bound, (r + 1) * len(gateways)), f"round {r}"


def test_gateways_starting_at_once_both_create_the_table(pg, stores):
    database = pg.create_database(f"allm_{os.getpid()}_start")
    opened: list[PostgresStore] = []
    start = threading.Barrier(6)

    def open_one() -> None:
        start.wait()
        opened.append(PostgresStore(database, ttl_s=60, max_stored=10))

    threads = [threading.Thread(target=open_one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stores.extend(opened)
    assert len(opened) == 6
    asyncio.run(opened[0].put(_response(1), []))
    assert all(asyncio.run(s.get("resp_1")) is not None for s in opened)


def test_a_user_with_rights_on_the_table_alone_uses_the_table_another_made(pg, database, stores):
    _open(stores, database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE ROLE allm_app LOGIN")
        conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON allm_stored_responses TO allm_app")
        conn.execute("GRANT USAGE ON SEQUENCE allm_stored_responses_seq_seq TO allm_app")
    try:
        store = _open(stores, database.replace("//allm@", "//allm_app@"))
        asyncio.run(store.put(_response(1), [], instance="ipc://a"))
        assert asyncio.run(store.instance_of("resp_1")) == "ipc://a"
    finally:
        for store in stores:
            store.close()
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("DROP OWNED BY allm_app")
            conn.execute("DROP ROLE allm_app")


def test_a_stopped_postgres_is_store_unavailable_and_a_restarted_one_is_reconnected(pg, database, stores):
    store = _open(stores, database)
    asyncio.run(store.put(_response(1), []))
    pg.stop()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            asyncio.run(store.get("resp_1"))
        assert (caught.value.status, caught.value.code, caught.value.type) == (
            503,
            "store_unavailable",
            "server_error",
        )
        assert str(pg.port) not in caught.value.message  # where the database is, is for the log
    finally:
        pg.start()
    # It connects again once its pause after a failure (RETRY_AFTER_S) is over.
    wait_for(lambda: _answers(store), 30, "the store to answer again")
    assert asyncio.run(store.get("resp_1")) is not None


def test_a_frozen_postgres_is_store_unavailable_and_is_used_again_once_it_answers(pg, database, stores):
    store = _open(stores, database)
    store.call_timeout_s = 1.0  # the default is 15 s
    asyncio.run(store.put(_response(1), []))
    pg.freeze()  # its connections stay open; nothing answers, nothing is refused
    try:
        with pytest.raises(StoreUnavailable) as caught:
            asyncio.run(store.get("resp_1"))
        assert caught.value.status == 503
        # The first call still waits on the database: the next ones do not queue behind it.
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                asyncio.run(store.put(_response(2), []))
    finally:
        pg.thaw()
    wait_for(lambda: _answers(store), 30, "the store to answer again")
    assert asyncio.run(store.get("resp_1")) is not None
    assert asyncio.run(store.get("resp_2")) is None  # refused while frozen: never stored


def _answers(store) -> bool:
    try:
        asyncio.run(store.get("resp_1"))
    except StoreUnavailable:
        return False
    return True


def test_a_database_down_at_start_does_not_stop_the_store(stores):
    store = _open(stores, f"postgresql://allm@127.0.0.1:{free_port()}/allm")
    with pytest.raises(StoreUnavailable):
        asyncio.run(store.get("resp_1"))
    with pytest.raises(StoreUnavailable):  # at once: the pause after a failure
        asyncio.run(store.put(_response(1), []))


# -- two gateways, one database -----------------------------------------------------------


def _config(data_dir, url: str) -> str:
    return f"""
[server]
data_dir = "{data_dir}"
database_url = "{url}"

[[models]]
id = "{MODEL}"
path = "{smollm2_path()}"
"""


@pytest.fixture(scope="module")
def gateways(pg, tmp_path_factory):
    url = pg.create_database(f"allm_{os.getpid()}_gateways")
    tmp_a, tmp_b = tmp_path_factory.mktemp("gateway-a"), tmp_path_factory.mktemp("gateway-b")
    with (
        running_server(_config(tmp_a / "data", url), tmp_a) as a,
        running_server(_config(tmp_b / "data", url), tmp_b) as b,
    ):
        yield a, b


def _create(server, **body):
    return server.json("POST", "/v1/responses", {"model": MODEL, "max_output_tokens": 4, **body})


def test_a_conversation_stored_on_one_gateway_continues_on_the_other(gateways):
    a, b = gateways
    status, first = _create(a, input="My name is Ada.", store=True)
    assert status == 200, first
    status, second = _create(b, input="What is my name?", previous_response_id=first["id"], store=True)
    assert status == 200, second
    # B answered with A's turn before its own: the input it was made from lists it
    status, page = b.json("GET", f"/v1/responses/{second['id']}/input_items?order=asc")
    assert status == 200, page
    texts = [part.get("text") for item in page["data"] for part in item.get("content", [])]
    assert texts[0] == "My name is Ada."
    assert texts[-1] == "What is my name?"
    assert {o["id"] for o in first["output"]} <= {item["id"] for item in page["data"]}
    # retrieved on B as A returned it, deleted on B, gone on A
    assert b.json("GET", f"/v1/responses/{first['id']}") == (200, first)
    status, deleted = b.json("DELETE", f"/v1/responses/{first['id']}")
    assert (status, deleted) == (200, {"id": first["id"], "object": "response", "deleted": True})
    status, gone = a.json("GET", f"/v1/responses/{first['id']}")
    assert status == 404
    assert gone["error"]["code"] == "not_found"


def test_a_stopped_postgres_is_a_clean_503_and_service_returns_with_it(pg, gateways):
    a, b = gateways
    status, first = _create(a, input="Hello.", store=True)
    assert status == 200, first
    pg.stop()
    try:
        for server in (a, b):
            status, body = server.json("GET", f"/v1/responses/{first['id']}")
            assert status == 503, body
            assert body["error"]["code"] == "store_unavailable"
            assert body["error"]["type"] == "server_error"
        status, body = _create(b, input="Again.", previous_response_id=first["id"])
        assert (status, body["error"]["code"]) == (503, "store_unavailable")
        assert _create(a, input="Hi.", store=False)[0] == 200  # what needs no store is served
        # A stream made while the store is down ends with an error event, not a cut connection.
        status, _headers, data = a.request(
            "POST",
            "/v1/responses",
            {"model": "smollm2-135m-instruct", "input": "Hi.", "max_output_tokens": 4, "stream": True},
        )
        assert status == 200
        events = [line for line in data.decode().splitlines() if line.startswith("event: ")]
        assert events[-1] == "event: error", events
        assert '"code":"store_unavailable"' in data.decode().replace(" ", "")
    finally:
        pg.start()
    wait_for(lambda: a.json("GET", f"/v1/responses/{first['id']}")[0] != 503, 30, "the gateway to reconnect")
    assert a.json("GET", f"/v1/responses/{first['id']}")[0] == 200
    status, body = _create(b, input="Again.", previous_response_id=first["id"], store=True)
    assert status == 200, body


def _serve_without_psycopg(tmp_path) -> subprocess.CompletedProcess[bytes]:
    """``allm serve`` with a database_url, where ``import psycopg`` fails."""
    blocker = tmp_path / "no-psycopg"
    (blocker / "psycopg").mkdir(parents=True)
    (blocker / "psycopg" / "__init__.py").write_text("raise ImportError('psycopg is hidden by the test')\n")
    config = tmp_path / "allm.toml"
    config.write_text(_config(tmp_path / "data", "postgresql://allm@127.0.0.1:1/allm"))
    env = {**os.environ, "PYTHONPATH": str(blocker), "ALLM_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [str(ALLM), "serve", "--config", str(config), "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )


def test_database_url_without_psycopg_stops_serve_naming_the_extra(tmp_path):
    done = _serve_without_psycopg(tmp_path)
    assert done.returncode != 0
    assert "pip install 'allm[postgres]'" in done.stderr.decode()


def test_database_url_without_psycopg_is_refused_like_any_bad_setting(tmp_path):
    done = _serve_without_psycopg(tmp_path)
    stderr = done.stderr.decode()
    assert done.returncode == 2
    assert "Traceback" not in stderr
    assert "allm: setting database_url needs PostgreSQL support" in stderr
