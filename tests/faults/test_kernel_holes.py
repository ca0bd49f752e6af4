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
from collections.abc import AsyncIterator

import msgpack
import pytest
import zmq
import zmq.asyncio

from allm.kernel import protocol as p
from allm.kernel.client import KernelClient
from allm.kernel.codes import REASON_MANAGER_FAILED, AllmError, Code
from allm.kernel.restarts import RestartPolicy
from tests.waits import until, wait_for

from .conftest import ask, lone_manager, receive, running_cluster

GONE_PEER = b"gone-peer"
DEADLINE_MS = 2000  # of the requests left in line: long past the ping that shows them queued


@pytest.mark.parametrize("how", ["expire", "drain"])
def test_answering_the_queue_of_a_peer_that_left_keeps_the_loop_alive(tmp_path, how):
    """The first answer finds the peer gone and forgets its queue under the loop (a KeyError once).

    A lone manager with a heartbeat a minute apart, so that only that answer can find the peer
    gone: its loop wakes for the probes (each a new peer's hello) and for SIGTERM."""
    endpoint, log = f"ipc://{tmp_path}/m.sock", tmp_path / "manager.log"
    manager = lone_manager(endpoint, log, "--heartbeat-interval-s", "60", "--drain-timeout-s", "30")
    ctx = zmq.Context()
    try:
        peer = ctx.socket(zmq.DEALER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.setsockopt(zmq.IDENTITY, GONE_PEER)
        peer.connect(endpoint)
        peer.send_multipart(p.encode(p.Request(rid=1, op="hold", params={"until": str(tmp_path / "never")})))
        assert receive(peer, manager) == p.Started(1)  # the one worker is busy: what follows waits
        timeout_ms = DEADLINE_MS if how == "expire" else 0
        for rid in (2, 3, 4):
            peer.send_multipart(p.encode(p.Request(rid=rid, op="echo", timeout_ms=timeout_ms)))
        peer.send_multipart(p.encode(p.Request(rid=5, op="ping")))  # inline: answered in order
        assert isinstance(receive(peer, manager), p.Result)  # so the three are in line
        peer.close()
        hello = p.Hello(client="probe")
        if how == "expire":  # each probe wakes the loop, which answers what passed its deadline
            wait_for(lambda: ask(endpoint, hello, manager).queued == 0, 30, "the deadlines to pass")
            # Forgetting the peer cancelled its running request too; the loop serves on.
            wait_for(lambda: ask(endpoint, hello, manager).active == 0, 30, "the worker to be free")
            reply = ask(endpoint, p.Request(rid=1, op="echo", params={"x": 1}), manager)
            assert isinstance(reply, p.Result)
            assert reply.data["echo"] == {"x": 1}
            manager.send_signal(signal.SIGTERM)
        else:
            assert ask(endpoint, hello, manager).queued == 3  # a round trip after the peer left
            manager.send_signal(signal.SIGTERM)  # the drain answers the three
        assert manager.wait(timeout=60) == 0
    finally:
        if manager.poll() is None:
            manager.kill()
            manager.wait()
        ctx.term()
    lines = log.read_text()
    assert f"peer {GONE_PEER.hex()} is gone" in lines  # an answer found it gone: what is tested
    assert "Traceback" not in lines


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
        [view] = await until(  # the client read a heartbeat of version 99
            lambda: [v for v in client.instances() if "protocol version 99" in v.failed],
            10,
            "the client to read the manager's heartbeat",
        )
        # A frame it cannot read proves nothing: it is not alive to the client.
        assert not view.live
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
        status = await until(
            lambda: "could not start" in cluster.status().last_exit and cluster.status(), 30, "a failed spawn"
        )
        assert "No such file or directory" in status.last_exit
        assert status.state in ("backoff", "failed")
        # Supervision goes on: the other manager is watched, and the interpreter's return is noticed.
        assert await cluster.serves_again("other") > 0
        cluster.supervisor.python = python
        assert await cluster.serves_again() != before
