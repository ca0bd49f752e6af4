"""Places where a fault used to end in silence: each now ends in a coded answer, at once.

The peers here are real sockets driven from outside: a raw DEALER that
disconnects under the manager, and a raw ROUTER that plays a broken manager
to the real kernel client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import msgpack
import pytest
import zmq
import zmq.asyncio

from allm.kernel import protocol as p
from allm.kernel.client import KernelClient
from allm.kernel.codes import REASON_MANAGER_FAILED, AllmError, Code
from allm.kernel.runtime import ManagerInfo, Runtime
from allm.kernel.supervisor import RestartPolicy
from allm.kernel.transport import Router

from .conftest import running_cluster
from .fault_manager import FaultManager


@pytest.mark.parametrize("how", ["expire", "drain"])
def test_answering_the_queue_of_a_peer_that_left_keeps_the_loop_alive(tmp_path, how):
    """The first answer finds the peer gone and forgets its queue under the loop (a KeyError once)."""
    router = Router(f"ipc://{tmp_path}/m.sock")
    runtime = Runtime(
        FaultManager(ManagerInfo("fault", 0, 1, {})),
        router,
        modality="fault",
        instance=0,
        heartbeat_interval_s=60,
    )
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"ipc://{tmp_path}/m.sock")
    try:
        for rid in range(1, 4):  # no worker runs: all three wait in line
            dealer.send_multipart(p.encode(p.Request(rid=rid, op="echo", timeout_ms=1)))
        while len(runtime._waiting) < 3:
            assert router.poll(5000), "the requests did not arrive"
            runtime._receive_all()
        dealer.close()
        time.sleep(0.5)  # the disconnect reaches the ROUTER; the deadlines pass
        if how == "expire":
            runtime._expire_queued()
        else:
            runtime.begin_drain()
            runtime._start_drain()  # what the I/O thread does at its next turn
        assert runtime._waiting == {}
        assert runtime._peers == {}
    finally:
        runtime.close()
        router.close(linger_ms=0)
        ctx.term()


@contextlib.asynccontextmanager
async def fake_manager(tmp_path, answer, beat: list[bytes] | None = None) -> AsyncIterator[KernelClient]:
    """A raw ROUTER that heartbeats like a manager (or as ``beat``) and answers each request
    with ``answer(rid)``."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    ctx = zmq.asyncio.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    beat = beat or p.encode(
        p.Heartbeat(
            pid=1, incarnation="fake", modality="fake", instance=0, models=(), active=0, queued=0,
            capacity=8, memory_bytes=0,
        )
    )  # fmt: skip

    async def serve() -> None:
        while True:
            peer, *frames = await router.recv_multipart()
            head = msgpack.unpackb(frames[0])
            if head.get("k") == "hello":
                await router.send_multipart([peer, *beat])
            elif head.get("k") == "req":
                await router.send_multipart([peer, *answer(head["rid"])])

    task = asyncio.create_task(serve())
    client = KernelClient({"fake": [endpoint]}, heartbeat_timeout_s=60, hello_interval_s=0.1)
    await client.start()
    try:
        yield client
    finally:
        await client.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        router.close()
        ctx.term()


def _frame(**fields: object) -> list[bytes]:
    return [msgpack.packb({"v": p.VERSION, **fields})]


@pytest.mark.parametrize(
    ("answer", "needle"),
    [
        (lambda rid: _frame(k="result", rid=rid), "lacks field 'data'"),
        (lambda rid: _frame(k="error", rid=rid, code=0, message="", reason="", param=""), "code 0 (OK)"),
        (lambda rid: _frame(k="chunk", rid=rid, seq="one", data={}), "field 'seq' is str"),
    ],
)
async def test_a_bad_frame_for_a_request_ends_it_at_once(tmp_path, answer, needle):
    async with fake_manager(tmp_path, answer) as client:
        await client.wait_live(timeout_s=10)
        async with asyncio.timeout(10):  # far below the request's own deadline
            with pytest.raises(AllmError) as info:
                await client.call("fake", "echo", timeout_s=600)
        assert info.value.code is Code.INTERNAL
        assert info.value.reason == "bad_frame"
        assert needle in info.value.message


async def test_a_manager_of_another_protocol_version_fails_requests_at_once(tmp_path):
    def answer(rid: int) -> list[bytes]:
        return [msgpack.packb({"v": 99, "k": "result", "rid": rid, "data": {}})]

    beat = [msgpack.packb({"v": 99, "k": "hb", "pid": 1})]
    async with fake_manager(tmp_path, answer, beat) as client:
        await asyncio.sleep(0.5)
        # A frame it cannot read proves nothing: it is not alive to the client.
        assert client.last_heard(f"ipc://{tmp_path}/fake.sock") is None
        async with asyncio.timeout(10):
            with pytest.raises(AllmError) as info:
                await client.call("fake", "echo", timeout_s=600)
        assert info.value.reason == REASON_MANAGER_FAILED
        assert "protocol version 99" in info.value.message


async def test_supervision_survives_a_spawn_that_fails():
    """Popen raising (EMFILE, ENOMEM, a removed interpreter) used to end supervision silently."""
    policy = RestartPolicy(backoff_initial_s=0.05, backoff_max_s=0.1, max_crashes=3, failed_retry_s=0.5)
    async with running_cluster(policy) as cluster:
        before = cluster.pid()
        python = cluster.supervisor.python
        cluster.supervisor.python = "/nonexistent/python3"  # the interpreter went away
        os.kill(before, signal.SIGKILL)
        async with asyncio.timeout(30):
            while (
                "could not start" not in {s.name: s for s in cluster.supervisor.status()}["fault#0"].last_exit
            ):
                await asyncio.sleep(0.05)
        status = {s.name: s for s in cluster.supervisor.status()}["fault#0"]
        assert "No such file or directory" in status.last_exit
        assert status.state in ("backoff", "failed")
        # Supervision goes on: the other manager is watched, and the interpreter's return is noticed.
        assert await cluster.serves_again("other") > 0
        cluster.supervisor.python = python
        assert await cluster.serves_again() != before
