"""Start a real `allm serve` (gateway, supervisor, managers) on a free port, for tests and benches."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ALLM = Path(sys.executable).parent / "allm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, api_key: str | None) -> None:
        self.proc = proc
        self.port = port
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{port}"

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if self.api_key and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.api_key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        status, _headers, data = self.request(method, path, body, **kw)
        return status, json.loads(data)

    def managers(self) -> list[dict[str, Any]]:
        return self.json("GET", "/status")[1]["managers"]


@contextlib.contextmanager
def running_server(
    config_toml: str,
    tmp: Path,
    *,
    api_key: str | None = None,
    allm: Path | None = None,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    args: tuple[str, ...] = (),
    own_group: bool = False,
) -> Iterator[Server]:
    """``allm serve`` (by default this environment's) on a free port, ready; stopped with SIGTERM after.

    ``log``: write its stdout and stderr there, at INFO (access lines included), instead of
    passing WARNING and worse through. ``own_group``: in a session and process group of its
    own (pgid = its pid), which its managers share, so a test can signal them all at once.
    """
    config = tmp / "allm.toml"
    config.write_text(config_toml)
    port = free_port()
    env = {**(os.environ if env is None else env), "ALLM_LOG_LEVEL": "INFO" if log else "WARNING"}
    out = open(log, "ab") if log else None  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen(
        [str(allm or ALLM), "serve", "--config", str(config), "--port", str(port), *args],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=out,
        start_new_session=own_group,
    )
    server = Server(proc, port, api_key)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"allm serve exited with status {proc.returncode}")
            with contextlib.suppress(OSError):
                if server.request("GET", "/ready")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"allm serve did not become ready in 60 s: {server.request('GET', '/ready')}"
                )
            time.sleep(0.1)
        yield server
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if out is not None:
            out.close()
