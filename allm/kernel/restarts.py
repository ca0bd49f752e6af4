"""The supervisor's decisions, pure functions of state and time: what a death means, what follows it.

``classify_exit`` reads a manager's exit as a code of the fault table (docs/reliability.md),
or as no death at all for a stop we asked for; ``after_death`` decides what follows: a
restart after a backoff, giving up for a cool-down, or nothing while the supervisor stops.
Restarts back off exponentially up to a cap, counting only the crashes within a window; a
manager that had run healthy for a while restarts at once (an outside kill of a good
process is no crash loop).  tests/unit/test_supervisor_decisions.py runs them on a
hand-set clock.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from collections.abc import Sequence

from allm.kernel.codes import Code
from allm.kernel.process import EXIT_RESTART, EXIT_STUCK, describe_exit, exit_cause


@dataclasses.dataclass(frozen=True, slots=True)
class RestartPolicy:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    crash_window_s: float = 60.0
    max_crashes: int = 5  # more crashes than this within the window: failed
    healthy_after_s: float = 10.0  # a death after running this long ends any crash streak
    failed_retry_s: float = 300.0  # a failed manager is tried again after this cool-down


class KillReason(enum.Enum):
    STOP = "stop"  # we asked it to stop
    MEMORY = "memory"  # resident memory over the cap
    HUNG = "hung"  # heartbeats stopped
    START = "start"  # never became ready


@dataclasses.dataclass(frozen=True, slots=True)
class Death:
    code: Code
    message: str
    cause: str  # a short label for metrics: memory_cap, hung, start, oom_killer, watchdog, ...
    crash: bool = True  # False: it asked to be restarted; no backoff, not counted


def classify_exit(
    name: str,
    returncode: int,
    kill: KillReason | None,
    detail: str = "",
    *,
    oom_killed: bool = False,
    stopping: bool = False,
) -> Death | None:
    """What a manager's exit means; None for a stop we asked for.

    ``stopping``: the supervisor's stop has begun (the server drains).  A manager that then
    exits as a drain ends (status 0), or of SIGTERM before it could drain, ended by that stop,
    whoever sent its signal: a SIGTERM to the whole process group reaches the managers too.
    """
    if kill is KillReason.STOP or (stopping and returncode in (0, -signal.SIGTERM)):
        return None
    if kill is KillReason.MEMORY:
        return Death(
            Code.OOM_RAM,
            f"the {name} manager ran out of its memory cap ({detail}) and was killed",
            "memory_cap",
        )
    if kill is KillReason.HUNG:
        return Death(Code.TIMEOUT, f"the {name} manager stopped answering ({detail}) and was killed", "hung")
    if kill is KillReason.START:
        return Death(
            Code.TIMEOUT, f"the {name} manager did not become ready ({detail}) and was killed", "start"
        )
    if returncode == -signal.SIGKILL and oom_killed:
        return Death(
            Code.OOM_RAM,
            f"the {name} manager was killed by the kernel's out-of-memory killer (SIGKILL, signal 9)",
            "oom_killer",
        )
    if returncode == EXIT_STUCK:
        return Death(
            Code.TIMEOUT, f"the {name} manager's watchdog found a stuck operation; it exited", "watchdog"
        )
    if returncode == EXIT_RESTART:
        return Death(
            Code.INTERNAL,
            f"the {name} manager restarted itself after an engine error",
            "engine_error",
            crash=False,
        )
    return Death(
        Code.INTERNAL, f"the {name} manager process {describe_exit(returncode)}", exit_cause(returncode)
    )


def crash_history(
    crashes: Sequence[float], now: float, uptime_s: float | None, policy: RestartPolicy
) -> list[float]:
    """The crashes that count after one at ``now``: those in the window, and none before
    a run that lasted ``healthy_after_s`` (uptime None: it never became ready)."""
    if uptime_s is not None and uptime_s >= policy.healthy_after_s:
        return [now]
    return [t for t in crashes if now - t <= policy.crash_window_s] + [now]


def next_restart_delay_s(crashes: Sequence[float], now: float, policy: RestartPolicy) -> float | None:
    """Seconds to wait before restarting after the crashes at these times; None: give up."""
    recent = [t for t in crashes if now - t <= policy.crash_window_s]
    if len(recent) > policy.max_crashes:
        return None
    exponent = max(0, len(recent) - 1)
    return float(min(policy.backoff_max_s, policy.backoff_initial_s * 2**exponent))


#: the causes of a drained end: a manager that exits so was asked to stop by someone
CLEAN_ENDS = frozenset({"exit_0", "SIGTERM"})


@dataclasses.dataclass(frozen=True, slots=True)
class Verdict:
    """What follows a death: the crashes that count from now on, and when to start again."""

    crashes: list[float]
    restart_in_s: float | None  # None: not started again (failed, or the supervisor stops)
    failed: bool = False  # too many crashes in the window: tried again after the cool-down


def after_death(
    death: Death,
    crashes: Sequence[float],
    now: float,
    uptime_s: float | None,
    policy: RestartPolicy,
    *,
    stopping: bool = False,
) -> Verdict:
    """Restart (after how long), give up, or, once the supervisor's stop has begun, neither:
    a manager that dies while the server drains stays down (its death is still reported)."""
    if stopping:
        return Verdict(list(crashes), None)
    if not death.crash:
        return Verdict(list(crashes), 0.0)  # it asked for a fresh process: no backoff, not counted
    history = crash_history(crashes, now, uptime_s, policy)
    if uptime_s is not None and uptime_s >= policy.healthy_after_s:
        # It was serving well: someone killed it, not a crash loop. A clean end (drained: status
        # 0, or SIGTERM) is someone's stop, most often of the whole process group, which reaches
        # the managers a moment before the server's own stop begins: its restart waits the first
        # backoff, so that ``begin_stop`` finds it still pending and cancels it.
        return Verdict(history, policy.backoff_initial_s if death.cause in CLEAN_ENDS else 0.0)
    delay = next_restart_delay_s(history, now, policy)
    return Verdict(history, delay, failed=delay is None)
