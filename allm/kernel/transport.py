"""ZeroMQ sockets: the manager's ROUTER, the client's DEALER, framing and polling.

This module and curve.py (CURVE keys and who may connect) are the only ones that touch
zmq.  A tcp:// endpoint is always CURVE: a Router or Dealer refuses one without keys.
Two traps this module exists to avoid, both measured with pyzmq 27:

- A ROUTER silently drops messages for a peer whose queue is full.  The
  manager's ROUTER sets ROUTER_MANDATORY, so a full peer answers ``FULL`` and
  the caller holds the frame back instead of losing it.
- One ``await recv()`` per frame is slow.  The client's DEALER is a plain
  socket whose file descriptor is watched by the asyncio loop; each wake-up
  drains every ready message with non-blocking receives.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import zmq
from zmq.utils.monitor import recv_monitor_message

from allm.kernel import curve

# Requests flow in freely; replies are held to a small window so that a slow
# reader pushes back on the manager (which then holds frames, never drops them).
REQUEST_HWM = 100_000
REPLY_HWM = 1_000


class Sent(enum.Enum):
    OK = "ok"
    FULL = "full"  # the peer's queue is at its high-water mark: try again later
    GONE = "gone"  # no such peer (it disconnected)


def _ipc_path(endpoint: str) -> Path | None:
    return Path(endpoint.removeprefix("ipc://")) if endpoint.startswith("ipc://") else None


def check_endpoint(endpoint: str) -> str:
    """Validate an endpoint string; returns it, or raises ValueError saying why."""
    if endpoint.startswith("ipc://"):
        path = endpoint.removeprefix("ipc://")
        if not path:
            raise ValueError(f"endpoint {endpoint!r} has no path")
        if len(path.encode()) > 107:
            raise ValueError(f"ipc path of {endpoint!r} is longer than the 107 bytes Linux allows")
        return endpoint
    if endpoint.startswith("tcp://"):
        host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"endpoint {endpoint!r} must look like tcp://host:port")
        return endpoint
    raise ValueError(f"endpoint {endpoint!r} must start with ipc:// or tcp://")


class Router:
    """The manager's socket: receives from many clients, answers each by peer id.

    ``keys`` and ``allowed``: serve CURVE with this key pair to the clients with these
    public keys only (required for tcp://). ``max_message_bytes``: a peer that sends a
    bigger message is disconnected by ZeroMQ before any of it is read.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        keys: curve.KeyPair | None = None,
        allowed: Sequence[bytes] = (),
        max_message_bytes: int | None = None,
    ) -> None:
        self.endpoint = check_endpoint(endpoint)
        if endpoint.startswith("tcp://") and keys is None:
            raise ValueError(f"{endpoint}: a tcp:// endpoint needs a CURVE key pair (allm keys)")
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
        sock.setsockopt(zmq.RCVHWM, REQUEST_HWM)
        if max_message_bytes is not None:
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self._gate: curve.Gate | None = None
        if keys is not None:
            self._gate = curve.Gate(self._ctx, allowed)
            curve.serve_with(sock, keys)
        path = _ipc_path(endpoint)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A socket file left by a killed predecessor would make bind fail.
            path.unlink(missing_ok=True)
        sock.bind(endpoint)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)

    def watch_fd(self, fd: int) -> None:
        """Make ``poll`` also return when ``fd`` becomes readable."""
        self._poller.register(fd, zmq.POLLIN)

    def unwatch_fd(self, fd: int) -> None:
        self._poller.unregister(fd)

    def poll(self, timeout_ms: int) -> set[int | zmq.Socket[bytes]]:
        """Wait for input; returns what is readable (this socket and/or watched fds)."""
        try:
            ready = self._poller.poll(timeout_ms)
        except zmq.ZMQError as exc:
            if exc.errno == errno.EINTR:
                return set()
            raise
        return {item for item, _ in ready}

    @property
    def socket(self) -> zmq.Socket[bytes]:
        return self._sock

    def recv(self) -> tuple[bytes, list[bytes]] | None:
        """One waiting message as (peer id, frames), or None when none waits."""
        try:
            parts = self._sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        return parts[0], parts[1:]

    def send(self, peer: bytes, frames: Sequence[bytes]) -> Sent:
        try:
            self._sock.send_multipart([peer, *frames], zmq.NOBLOCK)
        except zmq.Again:
            return Sent.FULL
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return Sent.GONE
            raise
        return Sent.OK

    def close(self, linger_ms: int = 1000) -> None:
        """Close, first giving queued replies up to ``linger_ms`` to leave."""
        self._sock.close(linger=linger_ms)
        if self._gate is not None:
            self._gate.stop()
        self._ctx.term()
        path = _ipc_path(self.endpoint)
        if path is not None:
            path.unlink(missing_ok=True)


class Dealer:
    """The client's socket to one manager instance, driven by the asyncio loop.

    ``on_message`` is called in the loop for every message received, in order.
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        routing_id: bytes,
        on_message: Callable[[list[bytes]], None],
        *,
        on_disconnect: Callable[[], None] | None = None,
        keys: curve.KeyPair | None = None,
        server_key: bytes | None = None,
    ) -> None:
        """``on_disconnect``: called when the connection to the manager closes (its process
        ended, or closed its socket); a hung manager keeps its connection and is not reported.
        ``keys`` and ``server_key``: talk CURVE, to the manager with that public key only
        (required for tcp://)."""
        self.endpoint = check_endpoint(endpoint)
        if endpoint.startswith("tcp://") and (keys is None or server_key is None):
            raise ValueError(f"{endpoint}: a tcp:// endpoint needs CURVE keys: ours and the manager's")
        sock = ctx.socket(zmq.DEALER)
        if keys is not None and server_key is not None:
            curve.connect_with(sock, keys, server_key)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue only on a finished connection: a send to a manager that is down
        # fails at once instead of waiting to reach its successor, stale.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        # A stable identity lets the manager keep answering us across reconnects.
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        sock.setsockopt(zmq.SNDHWM, REQUEST_HWM)
        sock.setsockopt(zmq.RCVHWM, REPLY_HWM)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.connect(endpoint)
        self._sock = sock
        self._on_message = on_message
        self._loop = asyncio.get_running_loop()
        self._fd = cast(int, sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._drain)
        self._closed = False
        # The fd is edge-triggered: messages may already be waiting.
        self._loop.call_soon(self._drain)
        self._monitor: zmq.Socket[bytes] | None = None
        self._on_disconnect = on_disconnect
        if on_disconnect is not None:
            self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._monitor_fd = cast(int, self._monitor.getsockopt(zmq.FD))
            self._loop.add_reader(self._monitor_fd, self._drain_monitor)
            self._loop.call_soon(self._drain_monitor)

    def send(self, frames: Sequence[bytes]) -> bool:
        """Queue a message; False when the manager is not connected or not keeping up."""
        if self._closed:
            return False
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            return False
        finally:
            # A send can consume the fd's edge; look for input we would miss.
            if not self._closed and cast(int, self._sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._loop.call_soon(self._drain)
        return True

    def drain(self) -> None:
        """Deliver every message already waiting, now."""
        self._drain()

    def _drain(self) -> None:
        sock = self._sock
        while not self._closed:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._on_message(frames)

    def _drain_monitor(self) -> None:
        monitor = self._monitor
        while not self._closed and monitor is not None:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED and self._on_disconnect is not None:
                self._on_disconnect()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._monitor is not None:
            self._loop.remove_reader(self._monitor_fd)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close(linger=0)


def client_context() -> zmq.Context[zmq.Socket[bytes]]:
    return zmq.Context()


def new_routing_id() -> bytes:
    return b"c" + os.urandom(7)
