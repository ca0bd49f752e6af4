"""Real manager processes failed from outside and inside: each failure is a coded answer.

Every case asserts the exact code on the in-flight request, that a stream on
another manager runs through untouched, and that the failed manager serves again.
"""

from __future__ import annotations

import os
import signal

import pytest

from allm.kernel.codes import (
    REASON_MANAGER_FAILED,
    AllmError,
    Code,
)
from allm.kernel.restarts import RestartPolicy
from tests.waits import until

from .conftest import Cluster, process_gone, running_cluster


@pytest.mark.parametrize(
    ("op", "params", "needle"),
    [
        ("segfault", {}, "died of SIGSEGV (signal 11)"),
        ("abort", {}, "died of SIGABRT (signal 6)"),
        ("exit", {"status": 3}, "exited with status 3"),
    ],
)
async def test_engine_crash_yields_internal_and_restarts(cluster: Cluster, op, params, needle):
    before = cluster.pid()
    other = await cluster.other_stream()
    with pytest.raises(AllmError) as info:
        await cluster.client.call("fault", op, params=params, timeout_s=20)
    assert info.value.code is Code.INTERNAL
    assert needle in info.value.message
    assert "fault#0" in info.value.message
    await other.whole()
    assert await cluster.serves_again() != before
    status = cluster.status()
    assert status.restarts == 1
    assert status.last_code == "INTERNAL"
    assert needle in status.last_exit


async def test_a_managers_last_words_before_it_dies_are_kept_with_its_death(cluster: Cluster):
    words = "ggml.c:1234: GGML_ASSERT(ne0 % 32 == 0) failed"
    with pytest.raises(AllmError) as info:
        await cluster.client.call("fault", "abort", params={"say": words}, timeout_s=20)
    assert info.value.code is Code.INTERNAL
    await cluster.serves_again()
    status = cluster.status()
    assert "SIGABRT" in status.last_exit
    assert status.last_lines[-1] == words  # the last line it wrote, shown beside the cause


async def test_memory_error_yields_oom_ram_and_the_manager_lives_on(cluster: Cluster):
    before = cluster.pid()
    other = await cluster.other_stream()
    with pytest.raises(AllmError) as info:
        await cluster.client.call("fault", "memory_error", timeout_s=20)
    assert info.value.code is Code.OOM_RAM
    assert "out of host memory" in info.value.message
    await other.whole()
    assert await cluster.serves_again() == before


async def test_allocation_past_the_memory_cap_yields_oom_ram(cluster: Cluster):
    before = cluster.pid()
    other = await cluster.other_stream()
    with pytest.raises(AllmError) as info:
        await cluster.client.call("fault", "allocate", timeout_s=60)
    assert info.value.code is Code.OOM_RAM
    assert "memory cap" in info.value.message
    assert "cap 400 MiB" in info.value.message
    await other.whole()
    assert await cluster.serves_again() != before
    assert process_gone(before)


async def test_sigstop_past_the_heartbeat_limit_yields_timeout_and_restart(cluster: Cluster):
    before = cluster.pid()
    other = await cluster.other_stream()
    async with cluster.client.stream("fault", "stream", params={"n": 10_000, "interval_s": 0.01}) as s:
        with pytest.raises(AllmError) as info:
            async for chunk in s:
                if chunk.data["i"] == 5:
                    os.kill(before, signal.SIGSTOP)
    assert info.value.code is Code.TIMEOUT
    assert "stopped answering" in info.value.message
    await other.whole()
    assert await cluster.serves_again() != before
    assert process_gone(before)


async def test_busy_loop_holding_the_gil_yields_timeout_and_restart(cluster: Cluster):
    before = cluster.pid()
    other = await cluster.other_stream()
    with pytest.raises(AllmError) as info:
        await cluster.client.call("fault", "hang_gil", timeout_s=60)
    assert info.value.code is Code.TIMEOUT
    assert "stopped answering" in info.value.message
    await other.whole()
    assert await cluster.serves_again() != before


async def test_sigkill_mid_stream_yields_internal(cluster: Cluster):
    before = cluster.pid()
    other = await cluster.other_stream()
    received = []
    async with cluster.client.stream("fault", "stream", params={"n": 10_000, "interval_s": 0.005}) as s:
        with pytest.raises(AllmError) as info:
            async for chunk in s:
                received.append(chunk.data["i"])
                if len(received) == 10:
                    os.kill(before, signal.SIGKILL)
    assert info.value.code is Code.INTERNAL
    assert "SIGKILL" in info.value.message
    assert received[:10] == list(range(10))
    await other.whole()
    assert await cluster.serves_again() != before


async def test_sleep_past_the_deadline_yields_timeout_and_the_manager_serves_on(cluster: Cluster):
    before = cluster.pid()
    other = await cluster.other_stream()
    with pytest.raises(AllmError) as info:
        await cluster.client.call("fault", "sleep", params={"seconds": 1.0}, timeout_s=0.2)
    assert info.value.code is Code.TIMEOUT
    assert "deadline of 0.2 s" in info.value.message
    await other.whole()
    assert await cluster.serves_again() == before


async def test_cancel_stops_a_stream_between_chunks(cluster: Cluster):
    before = cluster.pid()
    other = await cluster.other_stream()
    async with cluster.client.stream(
        "fault", "stream", params={"n": 100_000, "interval_s": 0.005, "tag": "c1"}
    ) as s:
        async for chunk in s:
            if chunk.data["i"] == 3:
                break  # leaving the block cancels

    async def logged() -> int | None:  # what the handler sent, once it stopped
        return (await cluster.client.call("fault", "stream_log", timeout_s=10)).data["log"].get("c1")

    sent = await until(logged, 30, "the cancelled handler to stop")
    # The handler stopped long before the end: the cancel reached it between chunks.
    assert 4 <= sent < 1_000
    await other.whole()
    assert await cluster.serves_again() == before


async def test_sigterm_drains_the_stream_in_flight(cluster: Cluster):
    before = cluster.pid()
    seen = []
    async with cluster.client.stream("fault", "stream", params={"n": 30, "interval_s": 0.02}) as s:
        async for chunk in s:
            seen.append(chunk.data["i"])
            if chunk.data["i"] == 2:
                os.kill(before, signal.SIGTERM)
    assert seen == list(range(30))
    assert s.result is not None
    assert s.result.data == {"sent": 30}
    assert await cluster.serves_again() != before


async def test_crash_loop_marks_the_manager_failed_and_requests_fail_fast():
    policy = RestartPolicy(
        backoff_initial_s=0.05, backoff_max_s=0.1, crash_window_s=600, max_crashes=1, failed_retry_s=3600
    )
    async with running_cluster(policy) as cluster:
        for _ in range(2):
            with pytest.raises(AllmError) as info:
                await cluster.client.call("fault", "segfault", timeout_s=20)
            assert info.value.code is Code.INTERNAL
            if "next try in" not in info.value.message:
                await cluster.serves_again()
        assert "2 crashes in 600 s, more than 1: next try in 3600 s" in info.value.message
        with pytest.raises(AllmError) as info:
            await cluster.client.call("fault", "echo", timeout_s=600)
        assert info.value.code is Code.INTERNAL
        assert info.value.reason == REASON_MANAGER_FAILED
        assert "SIGSEGV" in info.value.message
        assert cluster.status().state == "failed"
        assert cluster.status().retry_in_s is not None  # the cool-down (3600 s, as the message says)
        assert cluster.status("other#0").state == "running"
        assert await cluster.serves_again("other") > 0


async def test_a_failed_manager_is_tried_again_after_its_cool_down():
    policy = RestartPolicy(
        backoff_initial_s=0.05, backoff_max_s=0.1, crash_window_s=600, max_crashes=0, failed_retry_s=1.0
    )
    async with running_cluster(policy) as cluster:
        before = cluster.pid()
        with pytest.raises(AllmError) as info:
            await cluster.client.call("fault", "segfault", timeout_s=20)
        assert "next try in 1 s" in info.value.message
        assert cluster.status().state == "failed"
        # Failed is not forever: after the cool-down it starts afresh and serves.
        status = await cluster.running(other_than=before)
        assert await cluster.serves_again() != before
        assert status.restarts == 1
        assert status.retry_in_s is None


async def test_a_mapped_model_file_does_not_count_against_the_memory_cap(cluster: Cluster, tmp_path):
    model = tmp_path / "big.gguf"
    with model.open("wb") as f:
        f.truncate(600 * 1024 * 1024)  # above the 400 MiB cap once every page is resident
    before = cluster.pid()
    result = await cluster.client.call("fault", "map_file", params={"path": str(model)}, timeout_s=60)
    assert result.data["mapped"] == 600 * 1024 * 1024
    assert await cluster.serves_again() == before
    assert {s.name: s for s in cluster.supervisor.status()}["fault#0"].restarts == 0
