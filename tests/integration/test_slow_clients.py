"""A slow client cannot hold the server: stalled headers and bodies get 408, idle connections close.

A real `allm serve` with short limits (``body_timeout_s``, ``keep_alive_timeout_s``), spoken to
over raw sockets, since an HTTP client library would not send half a request.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from tests.model_files import smollm2_path

from .gateway_server import Server, running_server

CHAT = "/v1/chat/completions"
BODY_TIMEOUT_S = 2
KEEP_ALIVE_TIMEOUT_S = 1
STALLED = 50
#: only ever fails the test: every wait below ends on the server's answer or its close
SOCKET_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("slow")
    config = (
        f'[server]\ndata_dir = "{tmp}"\nbody_timeout_s = {BODY_TIMEOUT_S}\n'
        f"keep_alive_timeout_s = {KEEP_ALIVE_TIMEOUT_S}\n\n"
        f'[[models]]\nid = "smol"\npath = "{smollm2_path()}"\n'
    )
    with running_server(config, tmp) as running:
        yield running


def connect(server: Server, sent: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT_S)
    sock.sendall(sent)
    return sock


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends on this connection, until it closes it."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 response with a Content-Length: its status, headers and JSON body."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = rest[: int(headers["content-length"])]
    assert rest[len(body) :] == b"", "one response only"
    return int(status_line.split()[1]), headers, json.loads(body) if body else None


def test_bodies_that_stop_arriving_get_408_while_other_clients_are_served(server):
    # Each says its body is 100000 bytes, sends 10 of them, and sends nothing more.
    stalled_head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    stalls = []
    try:
        for _ in range(STALLED):
            stalls.append(connect(server, stalled_head + b'{"model": '))
        body = {"model": "smol", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        status, reply = server.json("POST", CHAT, body)
        assert status == 200, reply
        assert server.request("GET", "/v1/models")[0] == 200
        answers = [until_closed(sock) for sock in stalls]
    finally:
        for sock in stalls:
            sock.close()
    for raw in answers:
        status, headers, error = parse(raw)
        assert status == 408
        assert headers["connection"] == "close"
        assert error == {
            "error": {
                "message": f"the request body stopped arriving: nothing more came for {BODY_TIMEOUT_S} s",
                "type": "invalid_request_error",
                "param": None,
                "code": "request_timeout",
            }
        }


def test_headers_that_stop_arriving_get_408(server):
    with connect(server, f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()) as sock:
        status, headers, error = parse(until_closed(sock))
    assert status == 408
    assert headers["connection"] == "close"
    assert error["error"]["code"] == "request_timeout"
    assert error["error"]["type"] == "invalid_request_error"


def test_idle_keep_alive_connections_are_closed_after_the_keep_alive_timeout(server):
    with connect(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") as sock:
        # The answer, then the server's close once the connection has idled its keep-alive time.
        status, headers, reply = parse(until_closed(sock))
    assert (status, reply) == (200, {"status": "ok"})
    assert headers["connection"] == "keep-alive"
    with connect(server, b"") as sock:  # a connection that never sends a byte
        assert until_closed(sock) == b""
