"""The fault schedule: the text manager failed from outside, found by its pid in GET /status.

Kinds, in turn, one every ``interval_s``:

    sigkill        SIGKILL                                  supervisor: INTERNAL, restart
    sigstop-hung   SIGSTOP held until the supervisor kills it (past the heartbeat timeout): TIMEOUT
    memory-cap     a request for a model whose key/value cache takes the manager past its
                   ``[text] memory_cap_mib``: the supervisor kills it, OOM_RAM
    sigstop-cont   SIGSTOP, then SIGCONT well before the heartbeat timeout: nothing should fail

After each, the schedule waits for the manager to be live again (a new pid for the
kinds that kill it) and sends a probe request that must succeed: service resumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
from pathlib import Path
from typing import Any

import httpx2
import psutil

from tests.soak.traffic import ERROR, SUCCESS, Record, Traffic, probe

KINDS = ("sigkill", "sigstop-hung", "memory-cap", "sigstop-cont")
#: the supervisor's diagnosis (GET /status last_code) each killing fault must produce
EXPECTED_CODE = {"sigkill": "INTERNAL", "sigstop-hung": "TIMEOUT", "memory-cap": "OOM_RAM"}
BIG_MODEL = "smollm2-bigctx"  # the same SmolLM2 with a context whose cache breaks the memory cap
CONT_HOLD_FRACTION = 0.4  # sigstop-cont holds the manager this share of the heartbeat timeout
HUNG_KILL_SLACK_S = 20.0  # the supervisor kills a stopped manager within timeout + this
RESTART_BOUND_S = 60.0  # a killed manager is live again within this
MIN_GAP_S = 3.0  # between one fault's recovery and the next fault
POLL_S = 0.5


@dataclasses.dataclass
class Fault:
    kind: str
    start_s: float  # the schedule began injecting it
    pid: int
    restarts: int  # the manager's restart count before it
    active: int  # the manager's last heartbeat before it: running, waiting
    queued: int
    at_s: float = 0.0  # the moment it hit: the signal, or the memory-cap kill
    in_flight: int = 0  # requests the clients had open at at_s
    killed: bool = False  # the manager process died of it
    new_pid: int | None = None
    last_code: str | None = None
    back_s: float | None = None  # the manager was live again
    served_s: float | None = None  # the probe after it succeeded
    trigger: Record | None = None  # memory-cap: the request that breached the cap
    problems: list[str] = dataclasses.field(default_factory=list)
    note: str = ""

    @property
    def window_end_s(self) -> float | None:
        """Until when failures are this fault's doing: its recovery, plus a little."""
        end = self.served_s if self.served_s is not None else self.back_s
        return None if end is None else end + 2.0


def is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Monitor:
    """Polls GET /status; remembers every manager process of the run (pid → its start time)."""

    def __init__(self, traffic: Traffic, runtime_dir: Path) -> None:
        self.traffic = traffic
        self.runtime_dir = str(runtime_dir)
        self.processes: dict[int, float] = {}
        self.last: dict[str, Any] = {}

    async def managers(self) -> list[dict[str, Any]]:
        resp = await self.traffic.http.get("/status", timeout=10)
        resp.raise_for_status()
        managers: list[dict[str, Any]] = resp.json()["managers"]
        for m in managers:
            if m["pid"] and m["pid"] not in self.processes:
                try:
                    proc = psutil.Process(m["pid"])
                    if self.runtime_dir in " ".join(proc.cmdline()):
                        self.processes[m["pid"]] = proc.create_time()
                except psutil.Error:
                    pass
        return managers

    async def text(self) -> dict[str, Any]:
        [text] = [m for m in await self.managers() if m["name"] == "text#0"]
        self.last = text
        return text

    async def poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx2.HTTPError):  # a missed poll is made up by the next
                await self.managers()
            await asyncio.sleep(POLL_S)

    def ours(self, pid: int) -> bool:
        """The pid is still the manager process this run saw (not a reused pid)."""
        try:
            proc = psutil.Process(pid)
            return self.processes.get(pid) == proc.create_time() or self.runtime_dir in " ".join(
                proc.cmdline()
            )
        except psutil.Error:
            return False


async def inject(kind: str, traffic: Traffic, monitor: Monitor, heartbeat_timeout_s: float) -> Fault:
    text = await monitor.text()
    pid = int(text["pid"])
    fault = Fault(kind, traffic.now(), pid, text["restarts"], text["active"], text["queued"])
    if kind != "memory-cap" and not monitor.ours(pid):
        fault.problems.append(f"pid {pid} from /status is not this run's manager")
        return fault
    if kind == "sigkill":
        os.kill(pid, signal.SIGKILL)
        fault.at_s = traffic.now()
    elif kind == "sigstop-cont":
        os.kill(pid, signal.SIGSTOP)
        fault.at_s = traffic.now()
        try:
            await asyncio.sleep(heartbeat_timeout_s * CONT_HOLD_FRACTION)
        finally:
            os.kill(pid, signal.SIGCONT)
    elif kind == "sigstop-hung":
        os.kill(pid, signal.SIGSTOP)
        fault.at_s = traffic.now()
        limit_s = heartbeat_timeout_s + HUNG_KILL_SLACK_S
        try:
            while not is_gone(pid) and traffic.now() - fault.at_s < limit_s:
                await asyncio.sleep(0.1)
        finally:
            if not is_gone(pid):
                os.kill(pid, signal.SIGCONT)
                fault.problems.append(f"the supervisor did not kill the stopped manager within {limit_s:g} s")
    elif kind == "memory-cap":
        trigger = await probe(traffic, "fault", model=BIG_MODEL, max_tokens=4)
        fault.trigger = trigger
        fault.at_s = trigger.end_s or traffic.now()
        if trigger.outcome == SUCCESS:
            fault.problems.append(f"the memory cap was not breached: {BIG_MODEL} loaded and answered")
        elif trigger.outcome != ERROR or trigger.code != "oom_ram":
            fault.problems.append(
                f"the request that breaks the memory cap ended {trigger.outcome} {trigger.code}, not oom_ram"
            )
        elif "memory cap" not in trigger.detail:
            # The manager's own check refused the load (too little free memory on this host).
            fault.note = "refused before loading (host short of memory): no cap breach"
    else:
        raise ValueError(kind)
    fault.killed = is_gone(pid)
    fault.in_flight = traffic.in_flight_at(fault.at_s)
    return fault


async def recover(fault: Fault, traffic: Traffic, monitor: Monitor) -> None:
    """Wait for the manager to be live again, then check that a request succeeds."""
    killed = fault.killed or (fault.kind in EXPECTED_CODE and not fault.note and not fault.problems)
    while traffic.now() - fault.at_s < RESTART_BOUND_S:
        text = await monitor.text()
        moved = text["pid"] is not None and text["pid"] != fault.pid
        if text["live"] and text["state"] == "running" and (moved or not killed):
            fault.back_s = traffic.now()
            fault.new_pid = text["pid"]
            fault.last_code = text["last_code"]
            if moved and text["restarts"] <= fault.restarts:
                fault.problems.append(f"pid changed but restarts stayed {text['restarts']}")
            break
        await asyncio.sleep(0.1)
    else:
        fault.problems.append(f"the text manager was not live again within {RESTART_BOUND_S:g} s")
        return
    if fault.new_pid != fault.pid:
        fault.killed = True
        expected = EXPECTED_CODE.get(fault.kind)
        if expected is None:
            fault.note = "the stop outlasted the heartbeat timeout on this host: killed and restarted"
        elif fault.last_code != expected:
            fault.problems.append(f"/status last_code is {fault.last_code}, expected {expected}")
    elif fault.kind in EXPECTED_CODE and not fault.note:
        fault.problems.append("the manager was not restarted")
    check = await probe(traffic, "probe")
    if check.outcome == SUCCESS:
        fault.served_s = check.end_s
    else:
        fault.problems.append(
            f"the first request after it ended {check.outcome} {check.status} {check.code}: {check.detail}"
        )


async def schedule(
    faults: list[Fault],
    traffic: Traffic,
    monitor: Monitor,
    *,
    first_s: float,
    interval_s: float,
    last_s: float,
    heartbeat_timeout_s: float,
) -> None:
    """Inject faults in turn from first_s, one per interval, none after last_s."""
    kinds = itertools.cycle(KINDS)
    next_s = first_s
    while next_s <= last_s:
        await asyncio.sleep(max(0.0, next_s - traffic.now()))
        fault = await inject(next(kinds), traffic, monitor, heartbeat_timeout_s)
        faults.append(fault)
        await recover(fault, traffic, monitor)
        next_s = max(next_s + interval_s, traffic.now() + MIN_GAP_S)
