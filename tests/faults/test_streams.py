"""Long streams arrive whole or end with a coded error: no frame is lost silently."""

from __future__ import annotations

import asyncio
import time

import pytest

from allm.kernel.client import KernelClient
from allm.kernel.codes import REASON_QUEUE_FULL, REASON_SLOW_CONSUMER, AllmError, Code

from .conftest import Cluster, running_cluster

N_FRAMES = 100_000


async def test_100k_frame_stream_arrives_whole_past_a_stalled_reader(cluster: Cluster):
    seen = 0
    async with cluster.client.stream("fault", "stream", params={"n": N_FRAMES}, timeout_s=300) as s:
        async for chunk in s:
            assert chunk.data["i"] == seen
            seen += 1
            if seen % 20_000 == 0:
                # Block the whole event loop: nothing reads the socket, ZeroMQ's
                # queues fill to their high-water mark and the manager must hold back.
                time.sleep(0.3)
    assert seen == N_FRAMES
    assert s.result is not None
    assert s.result.data == {"sent": N_FRAMES}


async def test_a_reader_that_falls_too_far_behind_gets_a_coded_error():
    async with running_cluster(max_buffered_chunks=500) as cluster:
        received = 0
        with pytest.raises(AllmError) as info:
            async with cluster.client.stream("fault", "stream", params={"n": N_FRAMES}) as s:
                async for _chunk in s:
                    received += 1
                    if received == 1:
                        await asyncio.sleep(1.0)  # the loop runs, the reader does not
        assert info.value.code is Code.INTERNAL
        assert info.value.reason == REASON_SLOW_CONSUMER
        assert received < N_FRAMES
        assert await cluster.serves_again() > 0


async def test_a_full_queue_is_refused_at_once_with_queue_full(tmp_path):
    async with running_cluster(queue_size=2) as cluster:
        client = cluster.client
        done = tmp_path / "done"  # the three hold the manager until the test creates it
        holders = [
            asyncio.create_task(client.call("fault", "hold", params={"until": str(done)}, timeout_s=30))
            for _ in range(3)
        ]
        await cluster.beat(lambda hb: (hb.active, hb.queued) == (1, 2), "one running, two in line")
        # This client already has 3 outstanding = capacity: refused before sending.
        with pytest.raises(AllmError) as info:
            await client.call("fault", "echo", timeout_s=30)
        assert info.value.reason == REASON_QUEUE_FULL
        # A second client does not know: the manager itself refuses.
        second = KernelClient({"fault": [cluster.endpoint("fault")]}, hello_interval_s=0.1)
        await second.start()
        try:
            await second.wait_live(timeout_s=10)
            with pytest.raises(AllmError) as info:
                await second.call("fault", "echo", timeout_s=30)
            assert info.value.code is Code.TIMEOUT
            assert info.value.reason == REASON_QUEUE_FULL
            assert "queue is full" in info.value.message
        finally:
            await second.close()
        done.touch()
        assert [r.data["held"] for r in await asyncio.gather(*holders)] == [True] * 3
        assert await cluster.serves_again() > 0
