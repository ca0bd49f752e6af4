"""SIGTERM drains what runs, then stops; SIGHUP reloads the catalog without dropping requests.

Real `allm serve` processes, real signals, real streams of SmolLM2.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import psutil

from tests.model_files import smollm2_path
from tests.waits import wait_for

from .gateway_server import Server, running_server
from .test_metrics_logs import scrape, value

CHAT = "/v1/chat/completions"


def catalog(tmp_path, ids, extra: str = "") -> str:
    gguf = smollm2_path()
    models = "".join(f'\n[[models]]\nid = "{i}"\npath = "{gguf}"\n' for i in ids)
    return f'[server]\ndata_dir = "{tmp_path}"\n{extra}{models}'


class Reader(threading.Thread):
    """One streamed chat, read to its end in the background: its events, its error, its end."""

    def __init__(self, server: Server, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.body = {
            "model": model,
            "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        self.events: list[dict] = []
        self.errors: list[dict] = []
        self.done = False  # [DONE] came
        self.failure: BaseException | None = None
        self.first = threading.Event()
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=120)
            conn.request(
                "POST", CHAT, body=json.dumps(self.body), headers={"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            assert response.status == 200, response.read()
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    self.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    self.errors.append(event["error"])
                else:
                    self.events.append(event)
                    self.first.set()
            conn.close()
        except BaseException as exc:  # handed to the test thread
            self.failure = exc
        finally:
            self.finished_at = time.monotonic()
            self.first.set()

    def finish_reason(self) -> str | None:
        reasons = [e["choices"][0]["finish_reason"] for e in self.events if e["choices"]]
        return next((r for r in reversed(reasons) if r), None)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_sigterm_lets_a_running_stream_finish_then_stops(tmp_path):
    with running_server(catalog(tmp_path, ["smol"], "drain_timeout_s = 60\n"), tmp_path) as server:
        reader = Reader(server, "smol", 150)
        reader.start()
        assert reader.first.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        # It stops listening at once, and still serves the stream it has.
        wait_for(lambda: refused(server.port), 10, "the port to close")
        assert server.proc.poll() is None
        reader.join(90)
        assert reader.failure is None
        assert reader.errors == []
        assert reader.done
        assert reader.finish_reason() == "length"
        assert server.proc.wait(60) == 0
        stopped_at = time.monotonic()
        assert stopped_at >= reader.finished_at


def test_a_stream_longer_than_the_drain_ends_with_a_coded_error_then_the_server_stops(tmp_path):
    with running_server(catalog(tmp_path, ["smol"], "drain_timeout_s = 2\n"), tmp_path) as server:
        reader = Reader(server, "smol", 4000)  # far longer than two seconds of tokens
        reader.start()
        assert reader.first.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert reader.failure is None
        assert reader.done  # the stream ended in order, not cut
        [error] = reader.errors
        assert error["code"] == "draining"
        assert "shutting down" in error["message"]
        assert len(reader.events) < 4000  # cut short by the drain, not run to its length
        assert server.proc.wait(30) == 0


def test_a_sigterm_to_the_whole_process_group_restarts_no_manager(tmp_path):
    """systemd (or ``kill -- -PGID``) signals the server and its managers at once: an idle
    manager drains and exits 0 while the server still drains a stream, and stays down."""
    log = tmp_path / "serve.log"
    config = catalog(tmp_path, ["smol"], "drain_timeout_s = 5\n\n[text]\ninstances = 2\n")
    with running_server(config, tmp_path, log=log, own_group=True) as server:
        pids = {m["name"]: m["pid"] for m in server.managers() if m["modality"] == "text"}
        assert sorted(pids) == ["text#0", "text#1"]
        reader = Reader(server, "smol", 4000)  # longer than the drain: it holds the drain open
        reader.start()
        assert reader.first.wait(60)
        os.killpg(server.proc.pid, signal.SIGTERM)
        # Reaped by the supervisor (not a zombie any more): it has read that exit.
        wait_for(
            lambda: any(not psutil.pid_exists(pid) for pid in pids.values()),
            30,
            "the idle manager to drain and exit",
        )
        assert reader.is_alive(), "the stream ended before the manager: the drain was not open"
        reader.join(60)
        assert reader.failure is None
        assert reader.done
        assert server.proc.wait(30) == 0
    lines = log.read_text()
    assert "restarting in" not in lines
    for name, pid in pids.items():
        assert f"started {name} (pid {pid})" in lines
        assert lines.count(f"started {name} (pid") == 1, lines


def chat(server: Server, model: str):
    return server.request(
        "POST", CHAT, {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    )


def reload_result(server: Server, after: float):
    def done():
        reload = server.json("GET", "/status")[1]["server"]["reload"]
        return reload if reload and reload["at"] > after else None

    return wait_for(done, 30, "the reload to be reported")


def test_sighup_reloads_the_catalog_while_a_stream_of_an_unchanged_model_runs_on(tmp_path):
    config = tmp_path / "allm.toml"
    with running_server(catalog(tmp_path, ["smol", "old"]), tmp_path) as server:
        assert chat(server, "old")[0] == 200
        [text] = [m for m in server.managers() if m["name"] == "text#0"]
        reader = Reader(server, "smol", 120)
        reader.start()
        assert reader.first.wait(60)
        # "smol" stays as it is, "old" leaves, "new" comes; a key is now needed.
        config.write_text(catalog(tmp_path, ["smol", "new"], 'api_keys = ["sk-reloaded"]\n'))
        server.api_key = "sk-reloaded"  # sent from now on; needed once the reload lands
        before = time.time()
        server.proc.send_signal(signal.SIGHUP)
        result = reload_result(server, before)
        assert result["ok"], result
        assert result["problems"] == []
        assert any("added new" in line and "removed old" in line for line in result["applied"]), result
        assert "setting api_keys" in result["applied"]
        reader.join(90)
        # The running stream never noticed.
        assert reader.failure is None
        assert reader.errors == []
        assert reader.done
        assert reader.finish_reason() == "length"
        assert chat(server, "new")[0] == 200
        status, _headers, body = chat(server, "old")
        assert status == 404
        assert json.loads(body)["error"]["code"] == "model_not_found"
        # The same process, and "smol" was never loaded again.
        [after] = [m for m in server.managers() if m["name"] == "text#0"]
        assert after["pid"] == text["pid"]
        samples = scrape(server)
        assert value(samples, "allm_model_loads_total", manager="text#0", model="smol") == 1
        assert value(samples, "allm_model_unloads_total", manager="text#0", model="old") == 1
        assert "old" not in after["models"]
        server.api_key = None
        assert chat(server, "smol")[0] == 401


def test_a_bad_new_file_is_reported_and_nothing_of_it_applied(tmp_path):
    config = tmp_path / "allm.toml"
    with running_server(catalog(tmp_path, ["smol"]), tmp_path) as server:
        # A good change (a new model) beside two bad ones: none of it may land.
        bad = catalog(tmp_path, ["smol", "extra"], "request_timeout_s = -5\n")
        bad += '\n[[models]]\nid = "broken"\npath = "/x.gguf"\nformat = "pytorch"\n'
        config.write_text(bad)
        before = time.time()
        server.proc.send_signal(signal.SIGHUP)
        result = reload_result(server, before)
        assert not result["ok"]
        assert result["applied"] == []
        problems = " | ".join(result["problems"])
        assert "request_timeout_s" in problems
        assert "'broken'" in problems
        assert "format" in problems
        status, _headers, _body = chat(server, "extra")
        assert status == 404
        assert chat(server, "smol")[0] == 200
        # Not TOML at all: the same.
        config.write_text("[server\n")
        before = time.time()
        server.proc.send_signal(signal.SIGHUP)
        result = reload_result(server, before)
        assert not result["ok"]
        assert result["problems"]
        assert chat(server, "smol")[0] == 200


def test_a_setting_only_a_restart_can_change_is_named_and_kept(tmp_path):
    config = tmp_path / "allm.toml"
    with running_server(catalog(tmp_path, ["smol"]), tmp_path) as server:
        config.write_text(catalog(tmp_path, ["smol"], "heartbeat_timeout_s = 9\n\n[text]\ninstances = 2\n"))
        before = time.time()
        server.proc.send_signal(signal.SIGHUP)
        result = reload_result(server, before)
        assert result["ok"]
        needed = " | ".join(result["restart_needed"])
        assert "heartbeat_timeout_s: 5.0 → 9.0" in needed
        assert "[text] instances: 1 → 2" in needed
        assert [m["name"] for m in server.managers() if m["modality"] == "text"] == ["text#0"]
        assert chat(server, "smol")[0] == 200
