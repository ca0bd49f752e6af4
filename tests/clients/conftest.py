"""One `allm serve` on the embedded SmolLM2 for the client-library tests, and no way out to the internet.

These tests run in .venv-clients (requirements-clients.lock), not .venv: instructor caps jiter below
what the main lock's openai needs, and the Agents SDK caps websockets below what sanic has. The
server therefore runs from the main environment's `allm`, and the test process only speaks HTTP to it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration import gateway_server
from tests.integration.gateway_server import ROOT, Server, running_server

#: the main environment's CLI: allm's own dependencies are not in this environment
ALLM = ROOT / ".venv" / "bin" / "allm"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})

# Set when pytest loads this file, before it imports the test module and with it the libraries:
# no trace export, no LangSmith, no telemetry.
os.environ["OPENAI_AGENTS_DISABLE_TRACING"] = "1"
os.environ["LANGSMITH_TRACING"] = "false"
os.environ["LANGCHAIN_TRACING_V2"] = "false"
os.environ.pop("OPENAI_BASE_URL", None)


@pytest.fixture(autouse=True, scope="session")
def loopback_only() -> Iterator[None]:
    """Fail any name lookup beyond this machine: a library that phones home (a tokenizer
    download, a trace exporter, telemetry) fails its test instead of reaching out."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK:
            raise OSError(f"tests/clients: a client library tried to reach {name!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """`allm serve` with an empty catalog, so it serves the embedded SmolLM2."""
    if not ALLM.is_file():
        raise RuntimeError(f"{ALLM} is missing: run scripts/setup")
    tmp = tmp_path_factory.mktemp("clients")
    config = f'[server]\ndata_dir = "{tmp / "data"}"\n'
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gateway_server, "ALLM", Path(ALLM))
        with running_server(config, tmp) as srv:
            yield srv


@pytest.fixture(scope="module")
def base_url(server: Server) -> str:
    return f"{server.base_url}/v1"
