"""The supervisor as a process: names its children, stops cleanly, leaves no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.waits import wait_for

from .conftest import ROOT, Cluster, process_gone


def test_ps_shows_which_manager_is_which(cluster: Cluster):
    for name, modality in (("fault#0", "fault"), ("other#0", "other")):
        proc = psutil.Process(cluster.pid(name))
        cmdline = proc.cmdline()
        assert cmdline[1:4] == ["-m", "allm.kernel.runtime", modality]
        assert proc.name() == f"allm-{modality}-0"


def _start_host(runtime_dir: Path) -> tuple[subprocess.Popen[str], list[int]]:
    host = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.supervisor_host", str(runtime_dir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert host.stdout is not None
    line = host.stdout.readline().split()
    assert line[:1] == ["ready"], line
    pids = [int(pid) for pid in line[1:]]
    assert len(pids) == 2
    assert all(psutil.Process(pid).ppid() == host.pid for pid in pids)
    return host, pids


def _wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    wait_for(lambda: all(process_gone(pid) for pid in pids), timeout_s, f"managers {pids} to end")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_supervisor_stops_cleanly_on_signal_with_no_orphans(signum, tmp_path):
    host, pids = _start_host(tmp_path)
    host.send_signal(signum)
    out, _ = host.communicate(timeout=60)
    assert host.returncode == 0
    # A stop we asked for is not a crash: no manager has a last exit to report.
    assert out.split() == ["stopped", "-", "-"]
    _wait_gone(pids)
    assert psutil.Process().children(recursive=True) == []


def test_managers_die_with_a_killed_supervisor(tmp_path):
    host, pids = _start_host(tmp_path)
    host.kill()
    host.communicate(timeout=30)
    _wait_gone(pids)


def test_a_manager_busy_in_a_deaf_handler_still_exits_after_its_supervisor_is_killed(tmp_path):
    """Nobody is left to escalate: the drain's own grace ends the manager."""
    import zmq

    from allm.kernel import protocol as p

    host, pids = _start_host(tmp_path)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"ipc://{tmp_path}/fault-0.sock")
    try:
        deaf = p.Request(rid=1, op="sleep", params={"seconds": 600}, timeout_ms=600_000)
        dealer.send_multipart(p.encode(deaf))
        wait_for(  # a worker has taken it (heartbeats may come first)
            lambda: dealer.poll(0) and isinstance(p.decode(dealer.recv_multipart()), p.Started),
            10,
            "the deaf request to start",
        )
        host.kill()
        host.communicate(timeout=30)
        # The drain time of the host's managers is 5 s; then the grace, then exit.
        _wait_gone(pids, timeout_s=30)
    finally:
        dealer.close()
        ctx.term()
