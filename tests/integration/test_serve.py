"""`allm serve` as a user runs it: start-up checks, clean stop, no orphans."""

from __future__ import annotations

import signal
import subprocess
import threading

import psutil
import pytest

from tests.waits import wait_for

from .gateway_server import ALLM, ROOT, running_server


def test_a_bad_catalog_stops_start_up_naming_the_entry_and_field(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[models]]\nid = "m"\npath = "/x.gguf"\nformat = "pytorch"\n')
    done = subprocess.run(
        [str(ALLM), "serve", "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "model 'm': field 'format'" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_on_signal_and_leaves_no_process(tmp_path, signum):
    with running_server(f'[server]\ndata_dir = "{tmp_path}"\n', tmp_path) as server:
        managers = [m["pid"] for m in server.managers()]
        assert managers
        assert all(psutil.Process(pid).ppid() == server.proc.pid for pid in managers)
        server.proc.send_signal(signum)
        assert server.proc.wait(timeout=60) == 0
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in managers), 10, f"managers {managers} to end")


def test_several_text_instances_share_the_work(tmp_path):
    config = f'[server]\ndata_dir = "{tmp_path}"\n\n[text]\ninstances = 2\n'
    with running_server(config, tmp_path) as server:
        # /ready needs one live text instance: wait for both, or the first takes both requests
        wait_for(
            lambda: len([m for m in server.managers() if m["name"].startswith("text") and m["live"]]) == 2,
            60,
            "both text instances to be heard from",
        )
        managers = [m for m in server.managers() if m["name"].startswith("text")]
        assert sorted(m["name"] for m in managers) == ["text#0", "text#1"]
        assert len({m["pid"] for m in managers}) == 2
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Write a long essay."}],
            "max_tokens": 300,
            "temperature": 0,  # greedy: runs to the limit, both stay busy a while
        }
        results = []
        threads = [
            threading.Thread(
                target=lambda: results.append(server.request("POST", "/v1/chat/completions", body)[0])
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        busy: set[str] = set()

        def both_busy() -> bool:  # each seen busy at some poll
            busy.update(m["name"] for m in server.managers() if m["active"])
            return len(busy) == 2

        wait_for(both_busy, 30, "both instances to be busy")
        for t in threads:
            t.join()
        # Each instance took one of the two requests: least outstanding work first.
        assert busy == {"text#0", "text#1"}
        assert results == [200, 200]


def test_a_conversations_later_turn_goes_to_the_instance_holding_its_prefix(tmp_path):
    """Chat Completions resends the history: its opening names the conversation, so the next
    turn goes to the instance that served the last, not to the first idle one."""
    config = f'[server]\ndata_dir = "{tmp_path}"\n\n[text]\ninstances = 2\n'
    with running_server(config, tmp_path) as server:
        wait_for(
            lambda: len([m for m in server.managers() if m["name"].startswith("text") and m["live"]]) == 2,
            60,
            "both text instances to be heard from",
        )
        model = "smollm2-135m-instruct"
        essay = {"model": model, "messages": [{"role": "user", "content": "Write a long essay."}],
                 "max_tokens": 200, "temperature": 0}  # fmt: skip
        busy = threading.Thread(target=lambda: server.request("POST", "/v1/chat/completions", essay))
        busy.start()
        wait_for(lambda: any(m["active"] for m in server.managers()), 30, "the essay to be running")
        [holder] = [m["name"] for m in server.managers() if m["active"]]
        assert holder == "text#0"  # the first of equals: the conversation goes to the second
        turn = [{"role": "system", "content": "You are a lighthouse keeper who answers briefly. " * 12},
                {"role": "user", "content": "What do you do at night?"}]  # fmt: skip
        status, first = server.json(
            "POST",
            "/v1/chat/completions",
            {"model": model, "messages": turn, "max_tokens": 4, "temperature": 0},
        )
        assert status == 200, first
        busy.join()  # both idle now: without the conversation's key, the first instance takes it
        wait_for(lambda: not any(m["active"] for m in server.managers()), 30, "both instances to be idle")
        later = [*turn, first["choices"][0]["message"], {"role": "user", "content": "And by day?"}]
        status, second = server.json(
            "POST", "/v1/chat/completions", {"model": model, "messages": later, "max_tokens": 4}
        )
        assert status == 200, second
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= first["usage"]["prompt_tokens"], (holder, cached, first["usage"])
