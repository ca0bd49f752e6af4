"""The manager processes of a running `allm serve`, and the native libraries each has mapped."""

from __future__ import annotations

from pathlib import Path

import psutil

from tests.integration.gateway_server import Server


def manager_processes(server: Server) -> list[psutil.Process]:
    """The manager subprocesses the server's supervisor runs (``python -m allm.kernel.runtime``)."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return [p for p in children if "allm.kernel.runtime" in p.cmdline()]


def manager_process(server: Server, modality: str) -> psutil.Process:
    """The one manager subprocess of ``modality`` (``python -m allm.kernel.runtime MODALITY ...``)."""
    [found] = [p for p in manager_processes(server) if modality in p.cmdline()[3:4]]
    return found


def mapped_libraries(pid: int) -> set[str]:
    """The file names of the shared libraries a process has mapped."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and ".so" in parts[5]:
            names.add(Path(parts[5]).name)
    return names
