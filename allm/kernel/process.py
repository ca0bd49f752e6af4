"""A manager process as an OS process: bound to its parent, its memory counted, its exit described.

Both sides import this: the supervisor (spawning, measuring, reading exits) and the manager
processes (the runtime's entry point, the image engine's worker), which must not load the
parent-side supervisor.  Linux only where /proc or prctl(2) is needed; elsewhere each
function says what it does instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

# The environment a supervisor starts a manager with (allm/kernel/supervisor.py _spawn).
SETTINGS_ENV = "ALLM_MANAGER_SETTINGS"  # the manager module's settings, as JSON
PARENT_ENV = "ALLM_PARENT_PID"  # set: a supervisor is the parent; the manager dies with it
LIFELINE_ENV = "ALLM_LIFELINE_FD"  # the read end of the supervisor's lifeline pipe

# Exit statuses a manager chooses and the supervisor reads (allm/kernel/restarts.py classify_exit).
EXIT_STUCK = 70  # the watchdog found a worker stuck; its request was answered TIMEOUT
EXIT_RESTART = 71  # an engine error left the process suspect; it stopped once idle

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


def linux_prctl(option: int, arg: int | bytes) -> None:
    """prctl(2) where there is one (Linux); elsewhere nothing."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, arg, 0, 0, 0)


def bind_to_parent() -> None:
    """Die with the supervisor, so no manager outlives it (Linux: PR_SET_PDEATHSIG).

    Elsewhere (macOS) the lifeline pipe's EOF tells the same (Runtime._check_lifeline).
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return
    linux_prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if str(os.getppid()) != parent:  # it died before the line above took effect
        sys.exit(0)


def lifeline_fd() -> int | None:
    """The lifeline pipe's read end this process was given, if any."""
    raw = os.environ.get(LIFELINE_ENV, "")
    return int(raw) if raw.isdigit() else None


def exit_cause(returncode: int) -> str:
    """A death's label from its return code: "SIGSEGV", "exit_3"."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal_{-returncode}"
    return f"exit_{returncode}"


def describe_exit(returncode: int) -> str:
    """How a process ended, from its return code: "died of SIGSEGV (signal 11)", "exited with status 3"."""
    if returncode < 0:
        signum = -returncode
        try:
            signame = signal.Signals(signum).name
        except ValueError:
            signame = f"signal {signum}"
        return f"died of {signame} (signal {signum})"
    return f"exited with status {returncode}"


def anonymous_memory_bytes(pid: int | str = "self") -> int | None:
    """Memory the process really allocated: resident anonymous pages (Linux ``RssAnon``).

    Pages of a memory-mapped model file are left out: the kernel can drop and
    re-read them, so they never make a process run out of memory.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return found


def tree_memory_bytes(pid: int) -> int | None:
    """Allocated memory of a process and every process it started (a manager's engine worker).

    A manager is one unit under its memory cap, however many processes it runs its engine in.
    """
    total = anonymous_memory_bytes(pid)
    if total is None:
        return None
    todo, seen = _children(pid), {pid}
    while todo:
        child = todo.pop()
        if child in seen:
            continue
        seen.add(child)
        total += anonymous_memory_bytes(child) or 0
        todo.extend(_children(child))
    return total


def memory_in_use_bytes() -> int:
    """This process's allocated memory (anonymous RSS; peak RSS where /proc is missing)."""
    anon = anonymous_memory_bytes()
    if anon is not None:
        return anon
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def oom_counters(pid: int) -> tuple[Path, ...]:
    """The files that count OOM kills for a process: its memory cgroup's, else the system's.

    The system's count (/proc/vmstat) includes kills in every other cgroup of the
    host: it is read only where the process's own cgroup keeps no count.
    """
    files: list[Path] = []
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2, mounted alone or beside v1
            files += [Path("/sys/fs/cgroup", rel, "memory.events")]
            files += [Path("/sys/fs/cgroup/unified", rel, "memory.events")]
        elif "memory" in controllers.split(","):
            files.append(Path("/sys/fs/cgroup/memory", rel, "memory.oom_control"))
    return tuple(f for f in files if f.is_file()) or (Path("/proc/vmstat"),)


def oom_kill_count(file: Path) -> int:
    """The OOM kills one of ``oom_counters``' files has counted (0 where unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        for line in file.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    return 0
