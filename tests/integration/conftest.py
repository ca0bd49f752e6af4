"""The real text manager under the real supervisor, on SmolLM2 and files the tests write."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from kernel.client import KernelClient
from kernel.supervisor import ManagerSpec, Supervisor

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def text_manager(settings: Mapping[str, Any]) -> AsyncIterator[tuple[KernelClient, Supervisor]]:
    runtime_dir = Path(tempfile.mkdtemp(prefix="allm-x-"))
    endpoint = f"ipc://{runtime_dir}/text-0.sock"
    spec = ManagerSpec("text", "managers.text.manager", endpoint, settings=settings, queue_size=8)
    client = KernelClient({"text": [endpoint]}, hello_interval_s=0.1)
    supervisor = Supervisor([spec], client, heartbeat_interval_s=0.1, cwd=str(ROOT))
    await client.start()
    await supervisor.start()
    try:
        await client.wait_live(timeout_s=60)
        yield client, supervisor
    finally:
        await supervisor.stop()
        await client.close()
        shutil.rmtree(runtime_dir, ignore_errors=True)
