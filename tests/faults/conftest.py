"""A real supervisor and kernel client running the fault manager as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import pytest
import zmq

from allm.kernel import protocol as p
from allm.kernel.client import KernelClient
from allm.kernel.restarts import RestartPolicy
from allm.kernel.supervisor import InstanceStatus, ManagerSpec, Supervisor
from tests.waits import until, wait_for

ROOT = Path(__file__).resolve().parents[2]
FAULT_MODULE = "tests.faults.fault_manager"
MEMORY_CAP_BYTES = 400 * 1024 * 1024
HEARTBEAT_TIMEOUT_S = 1.5
FAST_RESTARTS = RestartPolicy(backoff_initial_s=0.05, backoff_max_s=0.2, crash_window_s=60, max_crashes=20)


@dataclasses.dataclass
class OtherStream:
    """A stream on the manager a test leaves alone, running until ``whole()``."""

    task: asyncio.Task[list[int]]
    gate: Path  # the manager streams until this file exists

    async def whole(self) -> list[int]:
        """End it, and check it arrived whole: every chunk in order, then its result."""
        self.gate.touch()
        seen = await self.task
        assert seen == list(range(len(seen)))
        return seen


@dataclasses.dataclass
class Cluster:
    client: KernelClient
    supervisor: Supervisor
    runtime_dir: Path
    _gates: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def pid(self, name: str = "fault#0") -> int:
        pid = self.supervisor.pid_of(name)
        assert pid is not None, f"{name} is not running"
        return pid

    def endpoint(self, modality: str) -> str:
        return f"ipc://{self.runtime_dir}/{modality}-0.sock"

    def status(self, name: str = "fault#0") -> InstanceStatus:
        return {s.name: s for s in self.supervisor.status()}[name]

    async def beat(
        self, holds: Callable[[p.Heartbeat], bool], what: str, modality: str = "fault"
    ) -> p.Heartbeat:
        """Until the manager's latest heartbeat shows what ``holds`` asks (``active``,
        ``queued``, ``running``); returns that heartbeat."""

        def seen() -> p.Heartbeat | None:
            [view] = [v for v in self.client.instances() if v.modality == modality]
            return view.heartbeat if view.heartbeat is not None and holds(view.heartbeat) else None

        return await until(seen, 30, what)

    async def running(self, other_than: int | None = None, name: str = "fault#0") -> InstanceStatus:
        """Until the supervisor has heard from its process (one other than the pid ``other_than``)."""

        def up() -> InstanceStatus | None:
            status = self.status(name)
            return status if status.state == "running" and status.pid not in (None, other_than) else None

        return await until(up, 30, f"{name} to run (other than pid {other_than})")

    async def serves_again(self, modality: str = "fault") -> int:
        """The manager answers a request again; returns the pid that answered."""
        result = await self.client.call(modality, "echo", params={"x": 1}, timeout_s=20)
        assert result.data["echo"] == {"x": 1}
        return int(result.data["pid"])

    async def other_stream(self) -> OtherStream:
        """A stream on the other manager, running (its first chunk is in) until the test ends it
        with ``whole()``: it spans whatever the test does in between."""
        gate = self.runtime_dir / f"other-{next(self._gates)}"
        first = asyncio.Event()

        async def run() -> list[int]:
            seen = []
            params = {"until": str(gate), "interval_s": 0.02}
            async with self.client.stream("other", "stream", params=params) as s:
                async for chunk in s:
                    seen.append(chunk.data["i"])
                    first.set()
            assert s.result is not None
            assert s.result.data == {"sent": len(seen)}
            return seen

        task = asyncio.create_task(run())
        await until(lambda: first.is_set() or task.done(), 30, "the other stream's first chunk")
        return OtherStream(task, gate)


@contextlib.asynccontextmanager
async def running_cluster(
    policy: RestartPolicy = FAST_RESTARTS,
    *,
    queue_size: int = 16,
    step_limit_s: float | None = None,
    **client_options: int,
) -> AsyncIterator[Cluster]:
    runtime_dir = Path(tempfile.mkdtemp(prefix="allm-t-"))
    env = {"PYTHONPATH": str(ROOT)}
    specs = [
        ManagerSpec(
            "fault",
            FAULT_MODULE,
            f"ipc://{runtime_dir}/fault-0.sock",
            queue_size=queue_size,
            memory_cap_bytes=MEMORY_CAP_BYTES,
            step_limit_s=step_limit_s,
            env=env,
        ),
        ManagerSpec("other", FAULT_MODULE, f"ipc://{runtime_dir}/other-0.sock", env=env),
    ]
    routes = {s.modality: [s.endpoint] for s in specs}
    client = KernelClient(
        routes, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, hello_interval_s=0.1, **client_options
    )
    supervisor = Supervisor(
        specs,
        client,
        policy=policy,
        heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S,
        heartbeat_interval_s=0.1,
        drain_timeout_s=5.0,
        check_interval_s=0.05,
        cwd=str(ROOT),
    )
    await client.start()
    await supervisor.start()
    try:
        await client.wait_live(timeout_s=30)
        yield Cluster(client, supervisor, runtime_dir)
    finally:
        await supervisor.stop()
        await client.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as c:
        yield c


def lone_manager(
    endpoint: str, log: Path, *args: str, env: Mapping[str, str] | None = None, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    """The fault manager under the real runtime with no supervisor (``python -m
    allm.kernel.runtime``, as a process manager runs it); its log at DEBUG in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "allm.kernel.runtime", "fault", "--module", FAULT_MODULE,
             "--endpoint", endpoint, *args],
            cwd=ROOT,
            env={**(os.environ if env is None else env), "PYTHONPATH": str(ROOT), "ALLM_LOG_LEVEL": "DEBUG"},
            stdout=out,
            stderr=out,
            pass_fds=pass_fds,
        )  # fmt: skip


def receive(dealer: zmq.Socket[bytes], manager: subprocess.Popen[bytes]) -> p.Message:
    """The next message a raw DEALER gets from ``manager``; fails if the manager exits first."""
    wait_for(lambda: dealer.poll(0) or manager.poll() is not None, 30, "the manager's answer")
    assert manager.poll() is None, f"the manager exited with status {manager.returncode}"
    return p.decode(dealer.recv_multipart())


def ask(endpoint: str, msg: p.Message, manager: subprocess.Popen[bytes]) -> p.Message:
    """One exchange from a new raw DEALER (a new peer: a hello gets a heartbeat at once); a
    request's answer is its terminal, past its ``start``."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(endpoint)  # ZeroMQ connects whenever the manager binds
    try:
        dealer.send_multipart(p.encode(msg))
        while isinstance(reply := receive(dealer, manager), p.Started):
            pass
        return reply
    finally:
        dealer.close()
        ctx.term()


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
