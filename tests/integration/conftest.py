"""The real managers under the real supervisor, on packaged models and files the tests write."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from allm.kernel.client import KernelClient
from allm.kernel.registry import module_for
from allm.kernel.supervisor import ManagerSpec, Supervisor

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def text_manager(
    settings: Mapping[str, Any],
    *,
    heartbeat_timeout_s: float = 5.0,
    heartbeat_interval_s: float = 0.1,
    step_limit_s: float | None = None,
    slots: int = 1,
) -> AsyncIterator[tuple[KernelClient, Supervisor]]:
    async with manager(
        "text",
        settings,
        heartbeat_timeout_s=heartbeat_timeout_s,
        heartbeat_interval_s=heartbeat_interval_s,
        slots=slots,
        step_limit_s=step_limit_s,
    ) as pair:
        yield pair


@contextlib.asynccontextmanager
async def manager(
    modality: str,
    settings: Mapping[str, Any],
    *,
    heartbeat_timeout_s: float = 5.0,
    heartbeat_interval_s: float = 0.1,
    step_limit_s: float | None = None,
    memory_cap_bytes: int | None = None,
    slots: int = 1,
) -> AsyncIterator[tuple[KernelClient, Supervisor]]:
    """One instance of a registered manager, supervised, with a client connected to it."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="allm-x-"))
    endpoint = f"ipc://{runtime_dir}/{modality}-0.sock"
    spec = ManagerSpec(
        modality,
        module_for(modality),
        endpoint,
        settings=settings,
        slots=slots,
        queue_size=8,
        step_limit_s=step_limit_s,
        memory_cap_bytes=memory_cap_bytes,
    )
    client = KernelClient(
        {modality: [endpoint]}, heartbeat_timeout_s=heartbeat_timeout_s, hello_interval_s=heartbeat_interval_s
    )
    supervisor = Supervisor(
        [spec],
        client,
        heartbeat_timeout_s=heartbeat_timeout_s,
        heartbeat_interval_s=heartbeat_interval_s,
        cwd=str(ROOT),
    )
    await client.start()
    await supervisor.start()
    try:
        await client.wait_live(timeout_s=60)
        yield client, supervisor
    finally:
        await supervisor.stop()
        await client.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
