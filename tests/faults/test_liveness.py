"""Long operations never look like a hang, and a stuck one is found and coded.

The fault manager's ``load`` runs a model load as a real runtime phase with
progress, longer than the heartbeat timeout; ``block_in_c`` and a load that
stalls block inside C with the GIL released, so heartbeats keep leaving and
only the runtime's own watchdog can see them.  Each ends with the fault
table's code and a fresh manager that serves.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from allm.kernel import process
from allm.kernel import protocol as p
from allm.kernel.codes import AllmError, Code
from tests.waits import until

from .conftest import HEARTBEAT_TIMEOUT_S, Cluster, ask, lone_manager, process_gone, running_cluster


async def test_a_load_longer_than_the_heartbeat_timeout_succeeds_and_shows_its_progress():
    async with running_cluster(step_limit_s=1.0) as cluster:
        before = cluster.pid()
        seconds = HEARTBEAT_TIMEOUT_S * 3  # several heartbeat timeouts, and past the step limit
        load = asyncio.create_task(
            cluster.client.call(
                "fault", "load", params={"seconds": seconds, "stall_limit_s": 1.0}, timeout_s=60
            )
        )
        seen: list[dict[str, object]] = []
        while not load.done():
            view = next(v for v in cluster.client.instances() if v.modality == "fault")
            if view.heartbeat is not None:
                seen.extend(view.heartbeat.extra.get("running", []))
            await asyncio.sleep(0.1)
        result = await load
        assert result.data == {"loaded": True, "pid": before}  # the same process: never killed
        activities = {r["activity"] for r in seen}
        assert "load of model 'fault-model'" in activities
        assert activities <= {"load of model 'fault-model'", "operation 'load'"}  # the instant before
        fractions = [r["fraction"] for r in seen if r["fraction"] is not None]
        assert fractions, "the heartbeats carried no load progress"
        assert fractions == sorted(fractions)
        assert 0 < fractions[0] < fractions[-1] <= 1
        status = {s.name: s for s in cluster.supervisor.status()}["fault#0"]
        assert status.restarts == 0
        assert status.state == "running"


async def test_a_load_whose_progress_stops_is_timeout_naming_the_load_and_restarts():
    async with running_cluster() as cluster:
        before = cluster.pid()
        other = await cluster.other_stream()
        with pytest.raises(AllmError) as info:
            await cluster.client.call(
                "fault", "load", params={"seconds": 0.3, "stall": True, "stall_limit_s": 1.0}, timeout_s=60
            )
        assert info.value.code is Code.TIMEOUT
        assert "load of model 'fault-model' made no progress" in info.value.message
        assert "limit 1 s" in info.value.message
        await other.whole()
        status = await cluster.running(other_than=before)
        assert await cluster.serves_again() != before
        assert status.last_code == "TIMEOUT"
        assert "watchdog" in status.last_exit


async def test_a_call_stuck_in_c_is_timeout_naming_the_operation_and_restarts():
    async with running_cluster(step_limit_s=1.0) as cluster:
        before = cluster.pid()
        queued = [
            asyncio.create_task(cluster.client.call("fault", "echo", params={"i": i}, timeout_s=60))
            for i in range(3)
        ]
        with pytest.raises(AllmError) as info:
            await cluster.client.call("fault", "block_in_c", timeout_s=60)
        assert info.value.code is Code.TIMEOUT
        assert "operation 'block_in_c' made no progress" in info.value.message
        # The requests queued behind it never started: they are served by the new process.
        results = await asyncio.gather(*queued)
        assert [r.data["echo"] for r in results] == [{"i": i} for i in range(3)]
        assert {r.data["pid"] for r in results} != {before}
        assert process_gone(before)


async def test_drain_ends_even_when_a_handler_ignores_cancel(cluster: Cluster):
    before = cluster.pid()
    deaf = asyncio.create_task(cluster.client.call("fault", "sleep", params={"seconds": 600}, timeout_s=600))
    await cluster.beat(lambda hb: hb.active == 1, "the deaf request to run")
    os.kill(before, signal.SIGTERM)  # drain time 5 s in these tests, plus the grace
    await until(lambda: process_gone(before), 30, f"pid {before} to end its drain")
    with pytest.raises(AllmError):
        await deaf
    assert await cluster.serves_again() != before


def test_a_manager_exits_when_its_lifeline_closes_without_prctl(tmp_path):
    """Where no parent-death signal exists (macOS), EOF on the lifeline pipe ends the manager."""
    read_end, write_end = os.pipe()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in (process.PARENT_ENV, process.LIFELINE_ENV)
    }
    env[process.LIFELINE_ENV] = str(read_end)  # no PARENT_ENV: no prctl
    endpoint = f"ipc://{tmp_path}/fault.sock"
    manager = lone_manager(endpoint, tmp_path / "manager.log", env=env, pass_fds=(read_end,))
    os.close(read_end)
    try:
        # Alive and serving while the lifeline holds: it answers a hello with its heartbeat.
        hb = ask(endpoint, p.Hello(client="test"), manager)
        assert isinstance(hb, p.Heartbeat)
        assert hb.pid == manager.pid
        os.close(write_end)
        assert manager.wait(timeout=30) == 0
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait()
