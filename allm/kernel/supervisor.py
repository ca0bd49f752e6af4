"""Start, watch and restart the manager processes; report every death as a code.

Each manager instance is a fresh interpreter (``python -m allm.kernel.runtime
<modality> …``), never a fork of this process.  The supervisor runs in the
same event loop as the kernel client and tells it about each death, so the
requests in flight there end with the code of the fault table (docs/reliability.md):

    exit by signal / status          INTERNAL, message names the signal or status
    allocated memory over its cap    OOM_RAM (the supervisor kills it)
    SIGKILL by the kernel's OOM killer  OOM_RAM (a kill we did not send, while the
                                     system or the manager's cgroup counts an OOM kill)
    heartbeats stopped (hung)        TIMEOUT (the supervisor kills it)
    its watchdog found a stuck call  TIMEOUT (it exits EXIT_STUCK by itself)
    an engine error left it suspect  restarted at once once idle (EXIT_RESTART)

Restarts back off exponentially up to a cap.  Too many crashes within a window
mark the instance failed: its requests fail at once, and it is tried again after
a cool-down.  The decisions (what a death means, whether and when to restart) are
pure functions of state and time in allm/kernel/restarts.py.  A stop the supervisor
asked for is marked before the signal is sent, so it is never reported as a crash;
once a stop has begun (``begin_stop``, when the server starts draining) no manager
is started again, whatever ends it.  The watch loop survives its own errors: a
spawn that fails (EMFILE, ENOMEM, a missing interpreter) counts as a crash.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from allm.kernel.client import KernelClient
from allm.kernel.codes import Code, error_for
from allm.kernel.process import (
    LIFELINE_ENV,
    PARENT_ENV,
    SETTINGS_ENV,
    oom_counters,
    oom_kill_count,
    tree_memory_bytes,
)
from allm.kernel.restarts import Death, KillReason, RestartPolicy, after_death, classify_exit
from allm.kernel.stderr_relay import StderrRelay
from allm.kernel.transport import check_endpoint

log = logging.getLogger("allm.supervisor")

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class ManagerSpec:
    """One manager instance to run."""

    modality: str
    module: str
    endpoint: str
    instance: int = 0
    slots: int = 1
    queue_size: int = 16
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    memory_cap_bytes: int | None = None  # allocated (anonymous) memory, not mapped model files
    step_limit_s: float | None = None  # the runtime's watchdog: longest a request may go without progress
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_message_bytes: int | None = None  # a bigger message from a peer closes its connection
    curve_secret: str | None = None  # tcp://: the manager's .key_secret file (allm keys)
    curve_allow: tuple[str, ...] = ()  # tcp://: the client public keys (or key files) let in

    @property
    def name(self) -> str:
        return f"{self.modality}#{self.instance}"


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclasses.dataclass(frozen=True, slots=True)
class InstanceStatus:
    name: str
    modality: str
    instance: int
    endpoint: str
    pid: int | None
    state: str
    restarts: int
    last_exit: str
    last_code: str
    memory_bytes: int | None
    retry_in_s: float | None = None  # when a failed or backing-off instance is started again
    last_lines: tuple[str, ...] = ()  # what its last process wrote to stderr before it died
    deaths: tuple[tuple[str, int], ...] = ()  # (cause, count) since the supervisor started


class _Child:
    def __init__(self, spec: ManagerSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.state = State.STOPPED
        self.started_at = 0.0
        self.kill: KillReason | None = None
        self.kill_detail = ""
        self.crashes: list[float] = []
        self.restarts = 0
        self.restart_at = 0.0
        self.running_since: float | None = None
        # Every file that counted OOM kills for it (its cgroups, as it moved), with the
        # count when first seen; never re-read while it lives: the count rises while a
        # killed process tears down (then /proc/<pid>/cgroup already shows the root).
        self.oom_counts: dict[Path, int] = {}
        self.last_exit = ""
        self.last_code = ""
        self.stderr = StderrRelay(spec.name)
        self.last_lines: tuple[str, ...] = ()
        self.deaths: collections.Counter[str] = collections.Counter()


def runtime_command(
    spec: ManagerSpec, python: str, heartbeat_interval_s: float, drain_timeout_s: float
) -> list[str]:
    """The command that runs one manager instance: ours, or supervisord's through ``allm manager``."""
    return [
        python,
        "-m",
        "allm.kernel.runtime",
        spec.modality,
        "--module",
        spec.module,
        "--endpoint",
        spec.endpoint,
        "--instance",
        str(spec.instance),
        "--slots",
        str(spec.slots),
        "--queue-size",
        str(spec.queue_size),
        "--heartbeat-interval-s",
        str(heartbeat_interval_s),
        "--drain-timeout-s",
        str(drain_timeout_s),
        "--step-limit-s",
        str(spec.step_limit_s or 0),
        *(["--max-message-bytes", str(spec.max_message_bytes)] if spec.max_message_bytes else []),
        *(["--curve-secret", spec.curve_secret] if spec.curve_secret else []),
        *(arg for key in spec.curve_allow for arg in ("--curve-allow", key)),
    ]


class Supervisor:
    """Runs manager subprocesses in the caller's event loop."""

    def __init__(
        self,
        specs: Sequence[ManagerSpec],
        client: KernelClient,
        *,
        policy: RestartPolicy | None = None,
        heartbeat_timeout_s: float = 5.0,
        heartbeat_interval_s: float = 0.5,
        start_timeout_s: float = 120.0,
        drain_timeout_s: float = 10.0,
        check_interval_s: float = 0.1,
        python: str = sys.executable,
        cwd: str | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"manager instances must be unique: {names}")
        for spec in specs:
            check_endpoint(spec.endpoint)
        self._children = [_Child(spec) for spec in specs]
        self.client = client
        self.policy = policy or RestartPolicy()
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.check_interval_s = check_interval_s
        self.python = python
        self.cwd = cwd
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        # The lifeline: every manager holds the read end; our exit closes the write
        # end, which each sees as EOF (where prctl's death signal does not exist).
        self._lifeline_r, self._lifeline_w = os.pipe()

    async def start(self) -> None:
        for child in self._children:
            self._start(child)
        self._watcher = asyncio.create_task(self._watch(), name="supervisor-watch")

    def begin_stop(self) -> None:
        """A stop is asked for: from now on no manager is started again, whatever ends it.

        Called as the server starts draining (allm/gateway/app.py), well before ``stop``
        signals the managers: a SIGTERM sent to the whole process group (systemd, a shell's
        ``kill -- -PGID``, ``timeout``) reaches them at once, and each exits 0 as soon as it
        has drained, while the gateway still serves what runs elsewhere.
        """
        if self._stopping:
            return
        self._stopping = True
        for child in self._children:
            if child.state in (State.BACKOFF, State.FAILED):
                child.state = State.STOPPED  # its restart was due after the stop began

    async def stop(self) -> None:
        """SIGTERM every manager, wait for it to drain, SIGKILL what is left."""
        self.begin_stop()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        running = [c for c in self._children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            self._signal(child, signal.SIGTERM, KillReason.STOP, "")
        deadline = time.monotonic() + self.drain_timeout_s + 2.0
        while any(c.proc is not None and c.proc.poll() is None for c in running):
            if time.monotonic() > deadline:
                for child in running:
                    self._signal(child, signal.SIGKILL, KillReason.STOP, "")
                break
            await asyncio.sleep(0.02)
        for child in self._children:
            if child.proc is not None:
                child.proc.wait()
                self._reap(child)
            child.state = State.STOPPED
        for fd in (self._lifeline_r, self._lifeline_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def update_settings(self, modality: str, settings: Mapping[str, Any]) -> None:
        """Start this modality's instances with these settings from their next start on (a
        reload: the running ones are told over the protocol)."""
        for child in self._children:
            if child.spec.modality == modality:
                child.spec = dataclasses.replace(child.spec, settings=dict(settings))

    def status(self) -> list[InstanceStatus]:
        now = time.monotonic()
        return [
            InstanceStatus(
                name=c.spec.name,
                modality=c.spec.modality,
                instance=c.spec.instance,
                endpoint=c.spec.endpoint,
                pid=c.proc.pid if c.proc is not None else None,
                state=c.state.value,
                restarts=c.restarts,
                last_exit=c.last_exit,
                last_code=c.last_code,
                last_lines=c.last_lines,
                deaths=tuple(sorted(c.deaths.items())),
                memory_bytes=tree_memory_bytes(c.proc.pid) if c.proc is not None else None,
                retry_in_s=(
                    round(max(0.0, c.restart_at - now), 1)
                    if c.state in (State.BACKOFF, State.FAILED)
                    else None
                ),
            )
            for c in self._children
        ]

    def pid_of(self, name: str) -> int | None:
        for child in self._children:
            if child.spec.name == name and child.proc is not None:
                return child.proc.pid
        return None

    # -- internals -------------------------------------------------------------

    def _command(self, spec: ManagerSpec) -> list[str]:
        return runtime_command(spec, self.python, self.heartbeat_interval_s, self.drain_timeout_s)

    def _spawn(self, child: _Child) -> None:
        spec = child.spec
        env = {
            **os.environ,
            # OMP_WAIT_POLICY is each engine's to choose (whisper.cpp's and stable-diffusion.cpp's
            # managers set PASSIVE; llama.cpp is fastest with OpenMP's default): see their modules.
            # Otherwise an abort inside ggml starts gdb to print a backtrace.
            "GGML_NO_BACKTRACE": "1",
            "PYTHONUNBUFFERED": "1",
            **spec.env,
            SETTINGS_ENV: json.dumps(dict(spec.settings)),
            PARENT_ENV: str(os.getpid()),
            LIFELINE_ENV: str(self._lifeline_r),
        }
        # Popen forks and execs at once: a fresh interpreter, no inherited sockets.
        child.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            self._command(spec),
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,  # passed on to ours, the last lines kept for /status
            cwd=self.cwd,
            close_fds=True,
            pass_fds=(self._lifeline_r,),
        )
        assert child.proc.stderr is not None
        child.stderr.attach(child.proc.stderr)
        child.state = State.STARTING
        child.started_at = time.monotonic()
        child.running_since = None
        child.oom_counts = {f: oom_kill_count(f) for f in oom_counters(child.proc.pid)}
        child.kill = None
        child.kill_detail = ""
        try:
            child.pidfd = os.pidfd_open(child.proc.pid)
        except (AttributeError, OSError):
            child.pidfd = None  # the watcher's poll() still notices the exit
        else:
            asyncio.get_running_loop().add_reader(child.pidfd, self._check_exit, child)
        log.info("started %s (pid %d)", spec.name, child.proc.pid)

    def _start(self, child: _Child) -> None:
        """Spawn, or count a spawn that failed (EMFILE, ENOMEM, no interpreter) as a crash."""
        try:
            self._spawn(child)
        except OSError as exc:
            child.proc = None
            could_not = f"the {child.spec.name} manager could not start: {exc}"
            self._died(child, Death(Code.INTERNAL, could_not, "spawn_failed"))

    def _reap(self, child: _Child) -> None:
        child.stderr.read()  # its last words, then the pipe is done with
        child.stderr.close()
        if child.pidfd is not None:
            asyncio.get_running_loop().remove_reader(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None

    def _signal(self, child: _Child, signum: int, reason: KillReason, detail: str) -> None:
        # Mark first: the exit that follows must be read as what we did.
        if child.kill is None or reason is KillReason.STOP:
            child.kill = reason
            child.kill_detail = detail
        if child.proc is not None and child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, signum)

    def _check_exit(self, child: _Child) -> None:
        proc = child.proc
        if proc is None:
            return
        returncode = proc.poll()
        if returncode is None:
            return
        self._reap(child)
        child.proc = None
        oom_killed = (
            returncode == -signal.SIGKILL
            and child.kill is None
            and any(oom_kill_count(f) > seen for f, seen in child.oom_counts.items())
        )
        death = classify_exit(
            child.spec.name,
            returncode,
            child.kill,
            child.kill_detail,
            oom_killed=oom_killed,
            stopping=self._stopping,
        )
        if death is None:
            child.state = State.STOPPED
            return
        self._died(child, death)

    def _died(self, child: _Child, death: Death) -> None:
        now = time.monotonic()
        child.stderr.read()  # what it wrote last may still be in the pipe
        child.last_lines = tuple(child.stderr.tail)
        child.last_exit = death.message
        child.last_code = death.code.name
        child.deaths[death.cause] += 1
        uptime_s = None if child.running_since is None else now - child.running_since
        verdict = after_death(death, child.crashes, now, uptime_s, self.policy, stopping=self._stopping)
        child.crashes = verdict.crashes
        if verdict.failed:
            child.state = State.FAILED
            child.restart_at = now + self.policy.failed_retry_s
            window = self.policy.crash_window_s
            message = (
                f"{death.message}; {len(child.crashes)} crashes in {window:g} s, more than "
                f"{self.policy.max_crashes}: next try in {self.policy.failed_retry_s:g} s"
            )
            log.error("%s", message)
            self.client.report_down(child.spec.endpoint, error_for(death.code, message), failed=True)
            return
        self.client.report_down(child.spec.endpoint, error_for(death.code, death.message))
        if verdict.restart_in_s is None:
            log.warning("%s; not restarted: the supervisor is stopping", death.message)
            child.state = State.STOPPED
            return
        log.warning("%s; restarting in %.1f s", death.message, verdict.restart_in_s)
        child.state = State.BACKOFF
        child.restart_at = now + verdict.restart_in_s

    async def _watch(self) -> None:
        while True:
            now = time.monotonic()
            for child in self._children:
                try:
                    self._watch_one(child, now)
                except Exception:  # supervision must outlive any one mistake
                    log.exception("supervising %s failed; going on", child.spec.name)
            await asyncio.sleep(self.check_interval_s)

    def _watch_one(self, child: _Child, now: float) -> None:
        if child.state in (State.BACKOFF, State.FAILED) and now >= child.restart_at:
            if child.state is State.FAILED:
                log.info("trying the failed %s again after its cool-down", child.spec.name)
                child.crashes = []
            child.restarts += 1
            self._start(child)
        elif child.proc is not None:
            self._check_exit(child)
            if child.proc is not None:
                self._check_health(child, now)

    def _check_health(self, child: _Child, now: float) -> None:
        proc = child.proc
        if proc is None or child.kill is not None:
            return
        cap = child.spec.memory_cap_bytes
        if cap is not None:
            used = tree_memory_bytes(proc.pid)  # the manager and any worker it started
            if used is not None and used > cap:
                detail = f"allocated {used / MIB:.0f} MiB > cap {cap / MIB:.0f} MiB"
                self._signal(child, signal.SIGKILL, KillReason.MEMORY, detail)
                return
        for file in oom_counters(proc.pid):  # it may have been moved to another cgroup
            if file not in child.oom_counts:
                child.oom_counts[file] = oom_kill_count(file)
                log.info("%s's OOM kills are counted in %s", child.spec.name, file)
        heard = self.client.last_heard(child.spec.endpoint)
        if heard is not None and heard >= child.started_at:
            if child.running_since is None:
                child.running_since = now
            child.state = State.RUNNING
            silent_s = now - heard
            if silent_s > self.heartbeat_timeout_s:
                detail = f"no heartbeat for {silent_s:.1f} s"
                self._signal(child, signal.SIGKILL, KillReason.HUNG, detail)
        elif now - child.started_at > self.start_timeout_s:
            detail = f"no heartbeat {self.start_timeout_s:g} s after start"
            self._signal(child, signal.SIGKILL, KillReason.START, detail)
