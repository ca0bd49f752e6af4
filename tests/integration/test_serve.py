"""`allm serve` as a user runs it: start-up checks, clean stop, no orphans."""

from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest

from .gateway_server import ALLM, ROOT, running_server


def test_a_bad_catalog_stops_start_up_naming_the_entry_and_field(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[models]]\nid = "m"\npath = "/x.gguf"\nformat = "onnx"\n')
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
    for _ in range(100):
        if not any(psutil.pid_exists(pid) for pid in managers):
            break
        time.sleep(0.05)
    assert not any(psutil.pid_exists(pid) for pid in managers)
