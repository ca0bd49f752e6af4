"""A process that hosts a supervisor, for tests that signal or kill the host itself.

Usage: python -m tests.faults.supervisor_host RUNTIME_DIR
Prints one line "ready <pid> <pid>..." once every manager answers, then runs
until SIGTERM or SIGINT, which stop the supervisor the way ``allm serve`` does.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from allm.kernel.client import KernelClient
from allm.kernel.supervisor import ManagerSpec, Supervisor

MODULE = "tests.faults.fault_manager"


async def main(runtime_dir: str) -> None:
    specs = [ManagerSpec(m, MODULE, f"ipc://{runtime_dir}/{m}-0.sock") for m in ("fault", "other")]
    client = KernelClient({s.modality: [s.endpoint] for s in specs}, hello_interval_s=0.1)
    supervisor = Supervisor(specs, client, heartbeat_interval_s=0.1, drain_timeout_s=5)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await client.start()
    await supervisor.start()
    await client.wait_live(timeout_s=30)
    pids = [s.pid for s in supervisor.status()]
    print("ready", *pids, flush=True)
    await stop.wait()
    await supervisor.stop()
    await client.close()
    print("stopped", *(s.last_exit or "-" for s in supervisor.status()), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
