"""One soak run: a real `allm serve` on SmolLM2, many clients, the fault schedule, then the figures.

``run_soak`` starts the server the way tests/integration/gateway_server.py does
(real gateway, supervisor, text manager and llama.cpp; nothing mocked), drives it
for a bounded time, stops it, looks for orphans, and kills whatever is left.
The invariants and the summary are report.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

from tests.integration.gateway_server import running_server
from tests.model_files import smollm2_path
from tests.soak.faults import BIG_MODEL, Fault, Monitor, schedule
from tests.soak.traffic import MODEL, SUCCESS, Record, Traffic, client_loop, probe

MIB = 1024 * 1024
QUIESCE_BOUND_S = 30.0  # after the clients stop, the manager reports nothing running within this
PROGRESS_EVERY_S = 30.0
SUMMARIES: list[str] = []  # conftest.py prints them at the end of the pytest run


@dataclasses.dataclass(frozen=True)
class Settings:
    duration_s: float = 90.0
    clients: int = 16
    seed: int = 1
    heartbeat_timeout_s: float = 3.0
    first_fault_s: float = 10.0  # also when the gateway's memory is first sampled
    fault_interval_s: float = 15.0  # at most 4 crashes a minute: under the supervisor's crash-loop limit
    request_timeout_s: float = 90.0  # the server's deadline of each request
    client_timeout_s: float = 120.0  # the clients' own bound: well under the test's timeout
    memory_cap_mib: int = 640  # SmolLM2's manager runs at ~150-300 MiB
    big_n_ctx: int = 32768  # a ~750 MiB key/value cache: loading it breaks the cap

    @property
    def queue_size(self) -> int:
        return self.clients + 8  # every client, the probes and cancelled leftovers: never queue_full

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            duration_s=float(env.get("ALLM_SOAK_S", cls.duration_s)),
            clients=int(env.get("ALLM_SOAK_CLIENTS", cls.clients)),
            seed=int(env.get("ALLM_SOAK_SEED", cls.seed)),
        )


def config_toml(settings: Settings, tmp: Path, runtime_dir: Path) -> str:
    model = smollm2_path()
    return f"""
[server]
data_dir = "{tmp / "data"}"
runtime_dir = "{runtime_dir}"
request_timeout_s = {settings.request_timeout_s}
heartbeat_timeout_s = {settings.heartbeat_timeout_s}

[text]
queue_size = {settings.queue_size}
memory_cap_mib = {settings.memory_cap_mib}

[[models]]
id = "{MODEL}"
path = "{model}"

[[models]]
id = "{BIG_MODEL}"
path = "{model}"
options = {{ n_ctx = {settings.big_n_ctx} }}
"""


@dataclasses.dataclass
class Report:
    settings: Settings
    runtime_dir: Path
    records: list[Record] = dataclasses.field(default_factory=list)
    faults: list[Fault] = dataclasses.field(default_factory=list)
    instances: int = 0
    slots: int = 0
    gateway_pid: int = 0
    manager_processes: dict[int, float] = dataclasses.field(default_factory=dict)
    rss_early: int = 0
    rss_end: int = 0
    rss_max: int = 0
    fds_early: int = 0
    fds_end: int = 0
    quiesce: list[str] = dataclasses.field(default_factory=list)  # traces left after the clients stopped
    final: Record | None = None
    orphans: list[str] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0


def progress(line: str) -> None:
    print(f"soak: {line}", file=sys.stderr, flush=True)


async def _sample_gateway(gateway: psutil.Process, traffic: Traffic, report: Report) -> None:
    """The gateway's RSS: once after warm-up, its maximum throughout; a progress line now and then."""
    settings = report.settings
    next_progress = PROGRESS_EVERY_S
    while True:
        rss = gateway.memory_info().rss
        report.rss_max = max(report.rss_max, rss)
        if not report.rss_early and traffic.now() >= settings.first_fault_s - 0.5:
            report.rss_early, report.fds_early = rss, gateway.num_fds()
        if traffic.now() >= next_progress:
            next_progress += PROGRESS_EVERY_S
            done = [r for r in traffic.records if r.end_s is not None]
            ok = sum(r.outcome == SUCCESS for r in done)
            progress(
                f"t={traffic.now():.0f}s requests {len(done)} ({ok} ok), faults {len(report.faults)}, "
                f"gateway RSS {rss / MIB:.1f} MiB"
            )
        await asyncio.sleep(0.5)


async def _quiet(monitor: Monitor, traffic: Traffic) -> list[str]:
    """After the clients stop: nothing left running or queued in the manager, nothing in the client."""
    deadline = traffic.now() + QUIESCE_BOUND_S
    while True:
        text = await monitor.text()
        if text["live"] and text["active"] == 0 and text["queued"] == 0:
            return []
        if traffic.now() > deadline:
            return [
                f"{QUIESCE_BOUND_S:g} s after the clients stopped the text manager still reports "
                f"live={text['live']} active={text['active']} queued={text['queued']}"
            ]
        await asyncio.sleep(0.2)


async def _lingering_connections(gateway: psutil.Process, port: int) -> list[str]:
    """Connections to the gateway's port still open on its side after every client closed."""
    deadline = time.monotonic() + 15.0
    while True:
        left = [
            f"{c.raddr} {c.status}"
            for c in gateway.net_connections(kind="tcp")
            if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN
        ]
        if not left or time.monotonic() > deadline:
            return [f"the gateway still holds connections after every client closed: {left}"] if left else []
        await asyncio.sleep(0.2)


async def _drive(port: int, gateway: psutil.Process, report: Report) -> None:
    settings = report.settings
    traffic = Traffic(f"http://127.0.0.1:{port}", time.monotonic(), settings.client_timeout_s)
    report.records = traffic.records
    monitor = Monitor(traffic, report.runtime_dir)
    report.manager_processes = monitor.processes  # the finalizer kills what is left of them
    stop = asyncio.Event()
    helpers: list[asyncio.Task[None]] = []
    try:
        texts = [m for m in await monitor.managers() if m["modality"] == "text"]
        assert texts, "/status lists no text manager"
        report.instances = len(texts)
        report.slots = texts[0]["capacity"] - settings.queue_size  # capacity = slots + queue_size
        assert report.slots >= 1, f"unexpected capacity in /status: {texts}"
        helpers.append(asyncio.create_task(monitor.poll(stop)))
        helpers.append(asyncio.create_task(_sample_gateway(gateway, traffic, report)))
        clients = [
            asyncio.create_task(client_loop(traffic, i, settings.seed, settings.duration_s))
            for i in range(settings.clients)
        ]
        helpers += clients  # cancelled in the finally if anything goes wrong before they end
        faults = schedule(
            report.faults,
            traffic,
            monitor,
            first_s=settings.first_fault_s,
            interval_s=settings.fault_interval_s,
            last_s=settings.duration_s - 10.0,
            heartbeat_timeout_s=settings.heartbeat_timeout_s,
        )
        await asyncio.gather(faults, *clients)
        progress(f"clients stopped at t={traffic.now():.0f}s; checking the server is quiet")
        report.quiesce = await _quiet(monitor, traffic)
        report.final = await probe(traffic, "final")
        report.rss_end, report.fds_end = gateway.memory_info().rss, gateway.num_fds()
        report.elapsed_s = traffic.now()
    finally:
        stop.set()
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await traffic.close()
    report.quiesce += await _lingering_connections(gateway, port)


def _survivors(report: Report) -> list[psutil.Process]:
    """Processes of this run still alive: a manager pid it saw, or anything naming its runtime dir."""
    found: dict[int, psutil.Process] = {}
    for pid, created in report.manager_processes.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                found[pid] = proc
    for proc in psutil.process_iter(["pid", "ppid", "cmdline", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE or info["pid"] == os.getpid():
            continue
        mine = str(report.runtime_dir) in " ".join(info["cmdline"] or ())
        if mine or (report.gateway_pid and info["ppid"] == report.gateway_pid):
            found[info["pid"]] = proc
    return list(found.values())


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return str(proc.pid)


def _orphans(report: Report) -> list[str]:
    deadline = time.monotonic() + 5.0  # a process the supervisor just killed may be exiting
    while (left := _survivors(report)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [_describe(p) for p in left]


def _kill_leftovers(report: Report) -> None:
    for proc in _survivors(report):
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)


def run_soak(settings: Settings, tmp: Path) -> Report:
    """Serve, soak, stop; the report holds every request, fault and figure. Kills all it started."""
    runtime_dir = Path(tempfile.mkdtemp(prefix="allm-soak-"))
    report = Report(settings, runtime_dir)
    progress(
        f"{settings.duration_s:g} s, {settings.clients} clients, "
        f"a fault every {settings.fault_interval_s:g} s from t={settings.first_fault_s:g}s "
        f"(seed {settings.seed})"
    )
    try:
        with running_server(config_toml(settings, tmp, runtime_dir), tmp) as server:
            report.gateway_pid = server.proc.pid
            gateway = psutil.Process(server.proc.pid)
            asyncio.run(_drive(server.port, gateway, report))
            progress("stopping the server")
        report.orphans = _orphans(report)
    finally:
        _kill_leftovers(report)
        shutil.rmtree(runtime_dir, ignore_errors=True)
    return report
