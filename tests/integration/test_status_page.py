"""The status page at GET / in a real headless Chromium, driven over the DevTools protocol."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from .gateway_server import Server, running_server

CHROMIUM = shutil.which("chromium")  # Debian's package, which scripts/setup installs
KEY = "page-test-key"

# The fields of one manager row, by data-field, or null while the row is not there.
ROW = """(() => {
  const row = document.querySelector('tr[data-manager="%s"]');
  if (!row) return null;
  const cells = [...row.querySelectorAll("[data-field]")];
  return Object.fromEntries(cells.map((c) => [c.dataset.field, c.textContent]));
})()"""


class Page:
    """One Chromium tab, spoken to with the DevTools protocol's JSON messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") != call_id:
                continue  # an event: none is subscribed to, but some come anyway
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            return message["result"]

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", 30)

    def eval(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 60) -> Any:
        """The expression's value once it is truthy; fails with the page's text if it never is."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.eval("document.body ? document.body.innerText : ''")
                pytest.fail(
                    f"page never satisfied {expression!r} in {timeout_s} s; last {value!r}; page:\n{text}"
                )
            time.sleep(0.1)

    def row(self, manager: str) -> dict[str, str] | None:
        return self.eval(ROW % manager)


@contextlib.contextmanager
def chromium(tmp: Path) -> Iterator[Page]:
    """A headless Chromium with one blank tab; the whole process group is killed after."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: scripts/setup installs it (Debian's chromium package)")
    profile = tmp / "chromium-profile"
    profile.mkdir()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its renderers and helpers share one group, killed together
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and active.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"chromium exited with status {proc.returncode} before it listened")
            if time.monotonic() > deadline:
                pytest.fail("chromium did not write DevToolsActivePort in 30 s")
            time.sleep(0.05)
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        tab = next(t for t in targets if t["type"] == "page")
        with connect(tab["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def text_manager(server: Server) -> dict[str, Any]:
    return next(m for m in server.managers() if m["name"] == "text#0")


def test_page_shows_the_running_text_manager_and_keeps_it_when_the_server_goes(tmp_path):
    with chromium(tmp_path) as page:
        with running_server(f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path) as server:
            status, headers, body = server.request("GET", "/")
            assert status == 200
            assert headers["content-type"] == "text/html; charset=utf-8"
            assert headers["cache-control"] == "no-store"
            assert b'data-updated="0"' in body
            pid = text_manager(server)["pid"]
            page.open(server.base_url + "/")
            row = page.wait_for(f"(r => r && r.state === 'running' && r)({ROW % 'text#0'})")
            assert row["pid"] == str(pid)
            assert row["restarts"] == "0"
            assert page.eval("document.getElementById('error').hidden") is True
            # It polls: the refresh counter keeps going up on the same page.
            seen = int(page.eval("document.body.dataset.updated"))
            page.wait_for(f"Number(document.body.dataset.updated) >= {seen + 2}", timeout_s=10)
        # The server is gone: a banner says so, and the last state it knew stays on the page.
        banner = page.wait_for("(e => !e.hidden && e.textContent)(document.getElementById('error'))")
        assert "/status" in banner
        kept = page.row("text#0")
        assert kept is not None
        assert kept["name"] == "text#0"


def test_page_follows_a_sigkilled_manager_through_its_restart_without_reloading(tmp_path):
    with (
        running_server(f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path) as server,
        chromium(tmp_path) as page,
    ):
        page.open(server.base_url + "/")
        row = page.wait_for(f"(r => r && r.state === 'running' && r.pid !== '–' && r)({ROW % 'text#0'})")
        assert row["restarts"] == "0"
        pid = int(row["pid"])
        assert pid == text_manager(server)["pid"]
        page.eval("window.sameLoad = true")  # gone if the page were loaded again
        os.kill(pid, signal.SIGKILL)
        after = page.wait_for(
            f"(r => r && r.restarts === '1' && r.state === 'running' && r.pid !== '–' && r.pid !== '{pid}'"
            f" && r)({ROW % 'text#0'})"
        )
        assert page.eval("window.sameLoad") is True
        assert "SIGKILL" in after["last_exit"]
        assert after["last_code"] == "INTERNAL"
        now = text_manager(server)
        assert (now["pid"], now["restarts"]) == (int(after["pid"]), 1)


def test_page_needs_no_key_and_asks_for_one_when_status_does(tmp_path):
    config = f'[server]\ndata_dir = "{tmp_path}"\napi_keys = ["{KEY}"]\n'
    with running_server(config, tmp_path) as server, chromium(tmp_path) as page:
        assert server.request("GET", "/")[0] == 200
        assert server.request("GET", "/status")[0] == 401
        page.open(server.base_url + "/")
        page.wait_for("!document.getElementById('key-form').hidden")
        assert page.row("text#0") is None
        assert "401" in page.eval("document.getElementById('error').textContent")
        page.eval(
            f"document.getElementById('key').value = '{KEY}';"
            "document.getElementById('key-form').requestSubmit()"
        )
        page.wait_for(f"(r => r && r.state === 'running')({ROW % 'text#0'})")
        assert page.eval("sessionStorage.getItem('allm.api_key')") == KEY
        assert page.eval("document.getElementById('key-form').hidden") is True
        assert page.eval("document.getElementById('error').hidden") is True
