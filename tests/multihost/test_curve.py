"""tcp:// is CURVE: only known gateways get in, nobody else can read a frame, big frames are refused.

A real `allm manager text --bind tcp://…` process; the peers are plain ZeroMQ sockets, the
way an intruder on the network would speak to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest
import zmq

from allm.kernel import curve
from allm.kernel import protocol as p
from tests.integration.gateway_server import free_port
from tests.model_files import smollm2_path

from .hosts import ALLM, Host

MARKER = "Zebra-Quartz-Marker"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    where = tmp_path_factory.mktemp("keys")
    for name in ("gateway", "host", "intruder"):
        done = subprocess.run([str(ALLM), "keys", name, "--dir", str(where)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert oct(os.stat(where / "gateway.key_secret").st_mode & 0o777) == "0o600"
    return where


@pytest.fixture(scope="module")
def manager(keys, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("host")
    config = tmp / "host.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp}"\n\n[[models]]\nid = "smol"\npath = "{smollm2_path()}"\n')
    host = Host(0, None, "127.0.0.1", None)
    host.start_manager(config, keys / "host.key_secret", keys / "gateway.key", tmp / "manager.log")
    try:
        yield host
    finally:
        host.stop_manager()


def dealer(ctx, endpoint: str, client: curve.KeyPair | None, server_key: bytes | None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 1000)  # with no finished handshake there is no peer to queue for
    if client is not None and server_key is not None:
        curve.connect_with(sock, client, server_key)
    sock.connect(endpoint)
    return sock


def answer(sock: zmq.Socket, timeout_s: float) -> list[p.Message]:
    """Every message that arrives within the time."""
    got = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            got.append(p.decode(sock.recv_multipart()))
    return got


def send(sock: zmq.Socket, msg: p.Message) -> bool:
    """Queue a message; False when it could not even be queued (no connection came up)."""
    try:
        sock.send_multipart(p.encode(msg))
    except zmq.Again:
        return False
    return True


def heard(sock: zmq.Socket, timeout_s: float = 10.0) -> bool:
    if not send(sock, p.Hello(client="probe")):
        return False
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)) and isinstance(p.decode(sock.recv_multipart()), p.Heartbeat):
            return True
    return False


def chat(sock: zmq.Socket, rid: int, content: str) -> p.Result | p.Error:
    params = {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}
    assert send(sock, p.Request(rid=rid, op="chat", model="smol", params=params, timeout_ms=60_000))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sock.poll(1000):
            msg = p.decode(sock.recv_multipart())
            if isinstance(msg, p.Result | p.Error) and msg.rid == rid:
                return msg
    raise AssertionError("no answer")


def test_the_allowed_gateway_is_served(keys, manager):
    ctx = zmq.Context()
    sock = dealer(
        ctx,
        manager.endpoint,
        curve.load_pair(keys / "gateway.key_secret"),
        curve.load_public(str(keys / "host.key")),
    )
    try:
        assert heard(sock)
        result = chat(sock, 1, "Say hello.")
        assert isinstance(result, p.Result), result
        assert result.data["usage"]["completion_tokens"] > 0
    finally:
        sock.close()
        ctx.term()


@pytest.mark.parametrize("who", ["an unknown key", "no CURVE at all", "the wrong server key"])
def test_a_peer_without_the_right_keys_gets_nothing(keys, manager, who):
    ctx = zmq.Context()
    host_key = curve.load_public(str(keys / "host.key"))
    if who == "an unknown key":
        sock = dealer(ctx, manager.endpoint, curve.load_pair(keys / "intruder.key_secret"), host_key)
    elif who == "no CURVE at all":
        sock = dealer(ctx, manager.endpoint, None, None)
    else:  # it believes the intruder's key is the manager's: the handshake cannot succeed
        intruder = curve.load_public(str(keys / "intruder.key"))
        sock = dealer(ctx, manager.endpoint, curve.load_pair(keys / "gateway.key_secret"), intruder)
    try:
        assert not heard(sock, timeout_s=2)
        params = {"messages": [{"role": "user", "content": MARKER}], "max_tokens": 4}
        send(sock, p.Request(rid=9, op="chat", model="smol", params=params, timeout_ms=5000))
        assert answer(sock, 2) == []
    finally:
        sock.close()
        ctx.term()
    assert manager.manager.poll() is None
    if who == "an unknown key":
        assert "refused a client whose public key" in manager.log.read_text()


class Relay(threading.Thread):
    """A TCP relay between a client and the manager that keeps every byte it passes."""

    def __init__(self, target: tuple[str, int]) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.sockets = [self.listener]

    def run(self) -> None:
        client, _ = self.listener.accept()
        upstream = socket.create_connection(self.target)
        self.sockets += [client, upstream]

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    self.seen += data
                    dst.sendall(data)
            except OSError:
                pass  # closed under it at the end

        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        pump(upstream, client)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_nobody_between_gateway_and_manager_can_read_a_frame(keys, manager):
    host, port = manager.endpoint.removeprefix("tcp://").rsplit(":", 1)
    relay = Relay((host, int(port)))
    relay.start()
    ctx = zmq.Context()
    sock = dealer(
        ctx,
        f"tcp://127.0.0.1:{relay.port}",
        curve.load_pair(keys / "gateway.key_secret"),
        curve.load_public(str(keys / "host.key")),
    )
    try:
        result = chat(sock, 2, f"Repeat after me: {MARKER}")
        assert isinstance(result, p.Result), result
        assert len(relay.seen) > 200  # the exchange went through the relay
        assert MARKER.encode() not in relay.seen
        assert b"smol" not in relay.seen  # not even the model's name
        assert b"messages" not in relay.seen  # nor a field's
        assert result.data["text"].encode() not in relay.seen
    finally:
        sock.close()
        ctx.term()
        relay.close()


def test_an_oversized_frame_is_refused_and_the_manager_serves_on(keys, manager):
    pid = manager.manager.pid
    gateway = curve.load_pair(keys / "gateway.key_secret")
    host_key = curve.load_public(str(keys / "host.key"))
    ctx = zmq.Context()
    big = dealer(ctx, manager.endpoint, gateway, host_key)
    try:
        assert heard(big)
        # 40 MiB: more than the largest body (32 MiB) and its margin.
        request = p.Request(rid=3, op="chat", model="smol", params={}, blobs=(b"\0" * (40 << 20),))
        assert send(big, request)
        assert [m for m in answer(big, 3) if not isinstance(m, p.Heartbeat)] == []
    finally:
        big.close()
    fresh = dealer(ctx, manager.endpoint, gateway, host_key)
    try:
        assert heard(fresh)
        assert isinstance(chat(fresh, 4, "Hi"), p.Result)
    finally:
        fresh.close()
        ctx.term()
    assert manager.manager.pid == pid
    assert manager.manager.poll() is None


def test_allm_manager_refuses_tcp_without_keys(tmp_path):
    config = tmp_path / "host.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [str(ALLM), "manager", "text", "--config", str(config), "--bind", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--secret-key" in done.stderr


def test_the_audio_manager_binds_tcp_with_curve_too(keys, tmp_path):
    # No catalog: allm's defaults, whisper tiny.en for audio.
    config = tmp_path / "host.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [str(ALLM), "manager", "audio", "--config", str(config), "--bind", "tcp://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2  # no keys: refused before it binds
    proc = subprocess.Popen(
        [
            str(ALLM),
            "manager",
            "audio",
            "--config",
            str(config),
            "--bind",
            endpoint,
            "--secret-key",
            str(keys / "host.key_secret"),
            "--allow",
            str(keys / "gateway.key"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx = zmq.Context()
    sock = dealer(
        ctx,
        endpoint,
        curve.load_pair(keys / "gateway.key_secret"),
        curve.load_public(str(keys / "host.key")),
    )
    try:
        sock.send_multipart(p.encode(p.Hello(client="probe")))
        deadline = time.monotonic() + 30
        modality = None
        while time.monotonic() < deadline and modality is None:
            if sock.poll(500):
                msg = p.decode(sock.recv_multipart())
                if isinstance(msg, p.Heartbeat):
                    modality = msg.modality
            else:
                send(sock, p.Hello(client="probe"))
        assert modality == "audio"
    finally:
        sock.close()
        ctx.term()
        proc.terminate()
        proc.wait(30)
