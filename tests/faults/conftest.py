"""A real supervisor and kernel client running the fault manager as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from allm.kernel.client import KernelClient
from allm.kernel.supervisor import ManagerSpec, RestartPolicy, Supervisor

ROOT = Path(__file__).resolve().parents[2]
FAULT_MODULE = "tests.faults.fault_manager"
MEMORY_CAP_BYTES = 400 * 1024 * 1024
HEARTBEAT_TIMEOUT_S = 1.5
FAST_RESTARTS = RestartPolicy(backoff_initial_s=0.05, backoff_max_s=0.2, crash_window_s=60, max_crashes=20)


@dataclasses.dataclass
class Cluster:
    client: KernelClient
    supervisor: Supervisor
    runtime_dir: Path

    def pid(self, name: str = "fault#0") -> int:
        pid = self.supervisor.pid_of(name)
        assert pid is not None, f"{name} is not running"
        return pid

    def endpoint(self, modality: str) -> str:
        return f"ipc://{self.runtime_dir}/{modality}-0.sock"

    async def serves_again(self, modality: str = "fault") -> int:
        """The manager answers a request again; returns the pid that answered."""
        result = await self.client.call(modality, "echo", params={"x": 1}, timeout_s=20)
        assert result.data["echo"] == {"x": 1}
        return int(result.data["pid"])

    def other_stream(self, n: int = 40) -> asyncio.Task[list[int]]:
        """A stream on the other manager, running through whatever the test does."""

        async def run() -> list[int]:
            seen = []
            async with self.client.stream("other", "stream", params={"n": n, "interval_s": 0.02}) as s:
                async for chunk in s:
                    seen.append(chunk.data["i"])
            assert s.result is not None
            assert s.result.data == {"sent": n}
            return seen

        return asyncio.create_task(run())


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


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
