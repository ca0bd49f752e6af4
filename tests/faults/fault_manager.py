"""A manager for fault tests: on command it crashes, hangs, leaks or streams slowly.

It is handed to the supervisor explicitly by the tests and runs as a real
subprocess under the real runtime; nothing in it is a mock.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import signal
import threading
import time

from allm.kernel.codes import InternalError, UnsupportedError
from allm.kernel.contract import ManagerInfo, Reply, RequestContext


class FaultManager:
    inline_ops = frozenset({"ping"})

    def __init__(self, info: ManagerInfo) -> None:
        self.info = info
        self._lock = threading.Lock()
        self.stream_log: dict[str, int] = {}  # stream tag → chunks sent before it stopped

    def models(self) -> tuple[str, ...]:
        return ("fault-model",)

    def close(self) -> None:
        pass

    def handle(self, ctx: RequestContext) -> Reply:
        params = ctx.params
        match ctx.op:
            case "ping":
                return Reply({"pong": True, "pid": os.getpid()})
            case "echo":
                return Reply({"echo": params, "pid": os.getpid()}, ctx.blobs)
            case "stream":
                return self._stream(ctx, int(params.get("n", 10)), float(params.get("interval_s", 0)))
            case "stream_log":
                with self._lock:
                    return Reply({"log": dict(self.stream_log)})
            case "segfault":
                ctypes.string_at(0)
            case "abort":
                if params.get("say"):  # an engine's last words, as ggml writes them before it aborts
                    os.write(2, str(params["say"]).encode() + b"\n")
                os.abort()
            case "exit":
                os._exit(int(params.get("status", 3)))
            case "memory_error":
                raise MemoryError("test allocation refused")
            case "allocate":
                hoard = []
                while True:  # until the supervisor's memory cap kills us
                    hoard.append(b"\x01" * (16 * 1024 * 1024))
                    time.sleep(0.002)
            case "hang_gil":
                # Catastrophic backtracking holds the GIL: no heartbeat can leave.
                re.match(r"(a+)+$", "a" * 64 + "b")
            case "sigstop":
                os.kill(os.getpid(), signal.SIGSTOP)
            case "sleep":
                time.sleep(float(params.get("seconds", 1.0)))  # deaf to cancel on purpose
                return Reply({"slept": True})
            case "hold":
                _hold(ctx)
                return Reply({"held": True, "pid": os.getpid()})
            case "map_file":
                # Touch every page of a mapped file, as llama.cpp does with a GGUF: resident,
                # but the kernel's to drop, not memory this process allocated.
                with (
                    open(str(params["path"]), "rb") as f,
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m,
                ):
                    size = len(m)
                    total = sum(m[i] for i in range(0, size, mmap.PAGESIZE))
                    time.sleep(0.5)  # several health checks with every page resident
                return Reply({"mapped": size, "sum": total, "pid": os.getpid()})
            case "suspect":
                # An engine error after which the process cannot be trusted (a damaged heap).
                _hold(ctx)
                raise InternalError("the engine failed in C", restart=True)
            case "block_in_c":
                # A call into C that never returns and lets the GIL go: heartbeats keep
                # leaving, so only the watchdog can tell the request is stuck.
                ctypes.CDLL(None).sleep(3600)
            case "load":
                return self._load(ctx, float(params.get("seconds", 1.0)), bool(params.get("stall")))
        raise UnsupportedError(f"the fault manager has no operation {ctx.op!r}")

    def _load(self, ctx: RequestContext, seconds: float, stall: bool) -> Reply:
        """A model load that takes ``seconds``, reporting progress, then hangs in C if ``stall``."""
        stall_limit_s = float(ctx.params.get("stall_limit_s", 1.0))
        with ctx.phase("load of model 'fault-model'", stall_limit_s):
            steps = max(1, int(seconds / 0.05))
            for i in range(steps):
                time.sleep(seconds / steps)
                ctx.progress((i + 1) / steps)
            if stall:
                ctypes.CDLL(None).sleep(3600)
        return Reply({"loaded": True, "pid": os.getpid()})

    def _stream(self, ctx: RequestContext, n: int, interval_s: float) -> Reply:
        tag = str(ctx.params.get("tag", ""))
        gate = ctx.params.get("until")  # if named: stream until the test creates it, not n chunks
        sent = 0
        try:
            while sent < n if gate is None else not os.path.exists(str(gate)):
                ctx.emit({"i": sent})
                sent += 1
                if interval_s:
                    time.sleep(interval_s)
        finally:
            if tag:
                with self._lock:
                    self.stream_log[tag] = sent
        return Reply({"sent": sent})


def _hold(ctx: RequestContext) -> None:
    """Stay busy until the test creates the file ``until`` (if named): the test says when the
    request ends, so what it sets up behind it is in place first, however slow the machine."""
    gate = ctx.params.get("until")
    while gate is not None and not os.path.exists(str(gate)):
        ctx.check()
        time.sleep(0.01)


def create(info: ManagerInfo) -> FaultManager:
    return FaultManager(info)
