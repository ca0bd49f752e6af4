"""A crash costs only what was running, recovery is quick, and memory kills tell the truth.

Real manager processes, killed from outside: by SIGKILL while requests wait
in line behind a running one, and by the kernel's own out-of-memory killer
inside a memory cgroup the test makes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import uuid
from pathlib import Path

import pytest

from allm.kernel.codes import AllmError, Code
from allm.kernel.restarts import RestartPolicy
from tests.waits import until

from .conftest import Cluster, running_cluster

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


async def test_sigkill_fails_only_the_running_request_and_resends_the_queued_ones(cluster: Cluster, tmp_path):
    before = cluster.pid()
    never = str(tmp_path / "never")  # the running request holds until it is killed
    running = asyncio.create_task(cluster.client.call("fault", "hold", params={"until": never}, timeout_s=60))
    await cluster.beat(lambda hb: hb.active == 1, "the request to run")
    queued = [
        asyncio.create_task(cluster.client.call("fault", "echo", params={"i": i}, timeout_s=60))
        for i in range(8)
    ]
    await cluster.beat(lambda hb: hb.queued == 8, "eight requests in line behind it")
    os.kill(before, signal.SIGKILL)
    with pytest.raises(AllmError) as info:
        await running
    assert info.value.code is Code.INTERNAL
    assert "SIGKILL" in info.value.message
    results = await asyncio.gather(*queued)
    assert [r.data["echo"] for r in results] == [{"i": i} for i in range(8)]
    assert {r.data["pid"] for r in results} == {cluster.pid()} != {before}


async def test_a_manager_killed_after_a_healthy_run_restarts_at_once():
    # The backoff would hold it for a minute; a healthy run means no crash loop. Here a run is
    # healthy as soon as the supervisor has heard the manager (how long a run must last is a
    # decision on a hand-set clock: tests/unit/test_supervisor_decisions.py).
    policy = RestartPolicy(backoff_initial_s=60, backoff_max_s=60, healthy_after_s=0)
    async with running_cluster(policy) as cluster:
        before = cluster.pid()
        await cluster.running()  # heard, so from now on its run counts as healthy
        for _ in range(3):  # each kill follows a healthy run: none waits for the backoff
            pid = cluster.pid()
            os.kill(pid, signal.SIGKILL)
            async with asyncio.timeout(20):  # far below the minute of backoff
                await cluster.running(other_than=pid)
                assert await cluster.serves_again() != pid
        status = cluster.status()
        assert status.restarts == 3
        assert status.state == "running"
        assert cluster.pid() != before


async def test_a_quick_crash_after_a_restart_still_backs_off(caplog):
    caplog.set_level(logging.WARNING, logger="allm.supervisor")
    policy = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=60, healthy_after_s=30)
    async with running_cluster(policy) as cluster:
        for _ in range(3):
            pid = cluster.pid()
            os.kill(pid, signal.SIGKILL)
            await cluster.running(other_than=pid)
            await cluster.serves_again()
        # Three crashes inside the window, none after a healthy run: 0.5, 1, then 2 s; the
        # fourth doubles again.
        os.kill(cluster.pid(), signal.SIGKILL)
        delays = await until(lambda: len(_backoffs(caplog)) == 4 and _backoffs(caplog), 20, "four deaths")
        assert delays == ["0.5", "1.0", "2.0", "4.0"]
        status = cluster.status()
        assert status.state == "backoff"
        assert status.retry_in_s is not None


def _backoffs(caplog) -> list[str]:
    """The delays the supervisor chose, in order, from its "…; restarting in N s" lines."""
    return re.findall(r"restarting in ([\d.]+) s", "\n".join(r.getMessage() for r in caplog.records))


def _memory_cgroup(limit_bytes: int) -> Path | None:
    """A cgroup v1 memory group with a hard limit, where this machine lets us make one."""
    if not os.access(CGROUP_V1_MEMORY, os.W_OK):
        return None
    group = CGROUP_V1_MEMORY / f"allm-test-{uuid.uuid4().hex[:8]}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
    except OSError:
        return None
    return group


async def test_a_manager_killed_by_the_oom_killer_is_oom_ram(cluster: Cluster, caplog):
    caplog.set_level(logging.INFO, logger="allm.supervisor")
    group = _memory_cgroup(200 * 1024 * 1024)  # below the supervisor's own 400 MiB cap
    if group is None:
        if os.environ.get("CI"):
            pytest.fail(
                "CI must be able to make a memory cgroup (cgroup v1 at /sys/fs/cgroup/memory, as root)"
            )
        pytest.skip("no writable cgroup v1 memory controller here")
    try:
        before = cluster.pid()
        (group / "cgroup.procs").write_text(str(before))
        counter = str(group / "memory.oom_control")
        await until(  # a health check reads where its OOM kills are counted now
            lambda: any(counter in r.getMessage() for r in caplog.records),
            30,
            f"the supervisor to read {counter}",
        )
        with pytest.raises(AllmError) as info:
            await cluster.client.call("fault", "allocate", timeout_s=60)
        assert info.value.code is Code.OOM_RAM
        assert "out-of-memory killer" in info.value.message
        assert cluster.status().last_code == "OOM_RAM"
        assert await cluster.serves_again() != before
    finally:
        # Empty once the killed process is reaped: the supervisor has restarted it by now.
        await until(lambda: _removed(group), 10, f"{group} to be removed")


def _removed(group: Path) -> bool:
    try:
        group.rmdir()
    except OSError:
        return False
    return True


async def test_an_engine_error_that_taints_the_process_restarts_it_once_idle(tmp_path):
    # Not a crash: even with no crash allowed, the manager is not marked failed.
    policy = RestartPolicy(backoff_initial_s=60, max_crashes=0, failed_retry_s=3600)
    async with running_cluster(policy) as cluster:
        before = cluster.pid()
        fail = tmp_path / "fail"  # the engine error comes when the test creates this file
        suspect = asyncio.create_task(
            cluster.client.call("fault", "suspect", params={"until": str(fail)}, timeout_s=60)
        )
        await cluster.beat(lambda hb: hb.active == 1, "the tainting request to run")
        queued = [
            asyncio.create_task(cluster.client.call("fault", "echo", params={"i": i}, timeout_s=60))
            for i in range(4)
        ]
        await cluster.beat(lambda hb: hb.queued == 4, "four requests in line behind it")
        fail.touch()
        with pytest.raises(AllmError) as info:
            await suspect
        assert info.value.code is Code.INTERNAL
        # Its own answer, not the supervisor's word for the restart: the manager's bye handshake
        # keeps the answer from being lost as it exits (tests/faults/test_exit_answers.py).
        assert info.value.message == "the engine failed in C"
        results = await asyncio.gather(*queued)  # handed back unstarted, served by the next process
        assert [r.data["echo"] for r in results] == [{"i": i} for i in range(4)]
        assert {r.data["pid"] for r in results} == {cluster.pid()} != {before}
        status = await cluster.running(other_than=before)  # the supervisor's next health check sees it up
        assert status.restarts == 1
        assert "restarted itself after an engine error" in status.last_exit
