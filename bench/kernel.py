"""Kernel overhead: round trip and frame relay through the kernel vs bare pyzmq, in one run.

    .venv/bin/python -m bench.kernel [--requests N] [--frames N] [--rounds N]

Round trip: one small request at a time, p50/p99 in µs:
  bare     pyzmq asyncio DEALER → ROUTER echo process (msgpack, nothing else)
  kernel   KernelClient.call → manager runtime, op on a worker thread (the engine path)
  kernel*  KernelClient.call → manager runtime, inline op on the I/O thread
  tcp      the same worker-thread op to a manager on tcp://127.0.0.1 with CURVE (another host's path)
Relay: one stream of token-sized frames, frames/s received by the caller:
  bare     one `await recv_multipart()` per frame
  kernel   KernelClient.stream, chunks produced on the worker thread
  tcp      the same over tcp:// with CURVE
Rounds alternate the contenders so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import uvloop
import zmq
import zmq.asyncio

from allm.kernel import curve
from allm.kernel.client import KernelClient
from allm.kernel.supervisor import ManagerSpec, Supervisor
from tests.integration.gateway_server import free_port

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = {"model": "m", "input": "x" * 150}


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def bare_round_trips(sock: zmq.asyncio.Socket, n: int) -> list[float]:
    out = []
    frame = msgpack.packb({"op": "echo", **PAYLOAD})
    for _ in range(n):
        t0 = time.perf_counter()
        await sock.send_multipart([frame])
        msgpack.unpackb((await sock.recv_multipart())[0])
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def bare_relay(sock: zmq.asyncio.Socket, n: int) -> float:
    t0 = time.perf_counter()
    await sock.send_multipart([msgpack.packb({"op": "stream", "n": n})])
    count = 0
    while True:
        msg = msgpack.unpackb((await sock.recv_multipart())[0])
        if "done" in msg:
            break
        count += 1
    assert count == n
    return n / (time.perf_counter() - t0)


async def kernel_round_trips(client: KernelClient, op: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.call("echo", op, params=PAYLOAD, timeout_s=10)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


async def kernel_relay(client: KernelClient, n: int) -> float:
    t0 = time.perf_counter()
    count = 0
    async with client.stream("echo", "stream", params={"n": n}, timeout_s=120) as s:
        async for _chunk in s:
            count += 1
    assert count == n
    return n / (time.perf_counter() - t0)


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="allm-b-"))
    bare_ep, kernel_ep = f"ipc://{tmp}/bare.sock", f"ipc://{tmp}/echo-0.sock"
    bare = subprocess.Popen(
        [sys.executable, "-m", "bench.bare_echo", bare_ep], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert bare.stdout is not None
    assert bare.stdout.readline().strip() == "ready"
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(bare_ep)

    spec = ManagerSpec("echo", "bench.echo_manager", kernel_ep, env={"PYTHONPATH": str(ROOT)})
    client = KernelClient({"echo": [kernel_ep]})
    supervisor = Supervisor([spec], client, cwd=str(ROOT))
    await client.start()
    await supervisor.start()
    await client.wait_live(timeout_s=30)
    # The same manager on tcp:// with CURVE, as a gateway reaches one on another host.
    curve.make_keys(tmp, "gateway")
    _public, host_secret = curve.make_keys(tmp, "host")
    tcp_ep = f"tcp://127.0.0.1:{free_port()}"
    tcp_spec = ManagerSpec(
        "echo",
        "bench.echo_manager",
        tcp_ep,
        env={"PYTHONPATH": str(ROOT)},
        curve_secret=str(host_secret),
        curve_allow=(str(tmp / "gateway.key"),),
    )
    tcp_client = KernelClient(
        {"echo": [tcp_ep]},
        keys=curve.load_pair(tmp / "gateway.key_secret"),
        server_keys={tcp_ep: curve.load_public(str(tmp / "host.key"))},
    )
    tcp_supervisor = Supervisor([tcp_spec], tcp_client, cwd=str(ROOT))
    await tcp_client.start()
    await tcp_supervisor.start()
    await tcp_client.wait_live(timeout_s=30)

    rt: dict[str, list[float]] = {"bare": [], "kernel": [], "kernel*": [], "tcp": []}
    relay: dict[str, list[float]] = {"bare": [], "kernel": [], "tcp": []}
    try:
        await bare_round_trips(sock, 200)
        await kernel_round_trips(client, "echo", 200)
        await kernel_round_trips(tcp_client, "echo", 200)
        for _ in range(args.rounds):
            rt["bare"] += await bare_round_trips(sock, args.requests)
            rt["kernel"] += await kernel_round_trips(client, "echo", args.requests)
            rt["kernel*"] += await kernel_round_trips(client, "ping", args.requests)
            rt["tcp"] += await kernel_round_trips(tcp_client, "echo", args.requests)
            relay["bare"].append(await bare_relay(sock, args.frames))
            relay["kernel"].append(await kernel_relay(client, args.frames))
            relay["tcp"].append(await kernel_relay(tcp_client, args.frames))
    finally:
        await sock.send_multipart([msgpack.packb({"op": "quit"})])
        await sock.recv_multipart()
        sock.close()
        ctx.term()
        bare.wait(timeout=10)
        await supervisor.stop()
        await client.close()
        await tcp_supervisor.stop()
        await tcp_client.close()

    bare_p50 = pct(rt["bare"], 0.5)
    print(f"round trip, {args.rounds}×{args.requests} sequential small requests (µs)")
    print(f"  {'':28} {'p50':>8} {'p99':>8} {'p50 vs bare':>12}")
    labels = {
        "bare": "bare pyzmq asyncio echo",
        "kernel": "kernel, worker-thread op",
        "kernel*": "kernel, inline op",
        "tcp": "kernel, tcp:// + CURVE",
    }
    for key, label in labels.items():
        p50, p99 = pct(rt[key], 0.5), pct(rt[key], 0.99)
        print(f"  {label:28} {p50:8.0f} {p99:8.0f} {p50 / bare_p50:11.2f}×")
    print(f"relay, {args.rounds} streams of {args.frames} token frames (frames/s, median)")
    bare_rate = statistics.median(relay["bare"])
    for key, label in (
        ("bare", "bare pyzmq, await per frame"),
        ("kernel", "kernel client stream"),
        ("tcp", "kernel stream, tcp:// + CURVE"),
    ):
        rate = statistics.median(relay[key])
        print(f"  {label:28} {rate:10,.0f}   {rate / bare_rate:5.2f}×")
    print(f"(python {sys.version.split()[0]}, {os.cpu_count()} cores, pyzmq {zmq.__version__})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
