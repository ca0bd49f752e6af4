"""A manager answers malformed frames, unknown kinds and versions with errors, and keeps serving."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq
import zmq.asyncio

from allm.kernel import protocol as p
from allm.kernel.codes import Code

from .conftest import Cluster


async def _exchange(sock: zmq.asyncio.Socket, frames: list[bytes]) -> p.Message:
    """Send raw frames; return the first reply that is not a heartbeat."""
    await sock.send_multipart(frames)
    while True:
        reply = await asyncio.wait_for(sock.recv_multipart(), timeout=10)
        msg = p.decode(reply)
        if not isinstance(msg, p.Heartbeat | p.Started):
            return msg


@pytest.fixture
async def raw_dealer(cluster: Cluster):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.endpoint("fault"))
    yield sock
    sock.close()
    ctx.term()


@pytest.mark.parametrize(
    ("frames", "reason", "needle"),
    [
        ([b"\xc1\xc1 not msgpack"], "bad_frame", "not msgpack"),
        ([msgpack.packb(["a", "list"])], "bad_frame", "not a map"),
        ([msgpack.packb({"v": p.VERSION, "k": "teleport", "rid": 9})], "bad_frame", "unknown message kind"),
        ([msgpack.packb({"v": 99, "k": "req", "rid": 9})], "bad_version", "protocol version 99"),
        ([msgpack.packb({"v": p.VERSION, "k": "req", "rid": 9, "op": "echo"})], "bad_frame", "lacks field"),
        ([msgpack.packb({"v": p.VERSION, "k": "hb", "pid": 1})], "bad_frame", "lacks field"),
    ],
)
async def test_bad_frames_get_an_error_reply_and_the_manager_keeps_serving(
    cluster: Cluster, raw_dealer, frames, reason, needle
):
    before = cluster.pid()
    reply = await _exchange(raw_dealer, frames)
    assert isinstance(reply, p.Error)
    assert reply.code is Code.UNSUPPORTED
    assert reply.reason == reason
    assert needle in reply.message
    # The same raw peer, then the kernel client, are still served by the same process.
    good = p.Request(rid=10, op="echo", params={"ok": True}, timeout_ms=5000)
    answer = await _exchange(raw_dealer, p.encode(good))
    assert isinstance(answer, p.Result)
    assert answer.data["echo"] == {"ok": True}
    assert await cluster.serves_again() == before


async def test_a_result_sent_to_a_manager_is_refused(cluster: Cluster, raw_dealer):
    reply = await _exchange(raw_dealer, p.encode(p.Result(rid=3, data={})))
    assert isinstance(reply, p.Error)
    assert reply.code is Code.UNSUPPORTED
    assert "does not accept Result" in reply.message


async def test_duplicate_request_id_in_flight_is_refused(cluster: Cluster, raw_dealer, tmp_path):
    done = tmp_path / "done"  # the first runs until the test creates it
    held = p.Request(rid=11, op="hold", params={"until": str(done)}, timeout_ms=30_000)
    await raw_dealer.send_multipart(p.encode(held))
    reply = await _exchange(raw_dealer, p.encode(held))
    assert isinstance(reply, p.Error)
    assert reply.rid == 11
    assert "already in flight" in reply.message
    done.touch()
    # The first one still completes: exactly one terminal each.
    while True:
        msg = p.decode(await asyncio.wait_for(raw_dealer.recv_multipart(), timeout=10))
        if isinstance(msg, p.Result):
            break
    assert msg.data["held"] is True
