"""Supervisor decisions are pure functions of state and time: tested on a hand-made clock."""

import signal

import pytest

from allm.kernel.codes import Code
from allm.kernel.registry import MANAGERS, module_for
from allm.kernel.runtime import EXIT_RESTART, EXIT_STUCK
from allm.kernel.supervisor import (
    KillReason,
    RestartPolicy,
    classify_exit,
    crash_history,
    next_restart_delay_s,
)

POLICY = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4.0, crash_window_s=60.0, max_crashes=5)


def test_backoff_doubles_per_recent_crash_up_to_the_cap():
    crashes: list[float] = []
    delays = []
    for now in (0.0, 1.0, 2.0, 3.0, 4.0):
        crashes.append(now)
        delays.append(next_restart_delay_s(crashes, now, POLICY))
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_more_crashes_than_allowed_within_the_window_gives_up():
    crashes = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert next_restart_delay_s(crashes, 5.0, POLICY) is None


def test_crashes_older_than_the_window_are_forgotten():
    crashes = [0.0, 1.0, 2.0, 3.0, 4.0, 100.0]
    assert next_restart_delay_s(crashes, 100.0, POLICY) == 0.5


@pytest.mark.parametrize(
    ("returncode", "kill", "code", "needle", "cause"),
    [
        (-signal.SIGSEGV, None, Code.INTERNAL, "died of SIGSEGV (signal 11)", "SIGSEGV"),
        (-signal.SIGABRT, None, Code.INTERNAL, "died of SIGABRT (signal 6)", "SIGABRT"),
        (-signal.SIGKILL, None, Code.INTERNAL, "died of SIGKILL (signal 9)", "SIGKILL"),
        (3, None, Code.INTERNAL, "exited with status 3", "exit_3"),
        (0, None, Code.INTERNAL, "exited with status 0", "exit_0"),
        (-signal.SIGKILL, KillReason.MEMORY, Code.OOM_RAM, "memory cap (rss)", "memory_cap"),
        (-signal.SIGKILL, KillReason.HUNG, Code.TIMEOUT, "stopped answering (rss)", "hung"),
        (-signal.SIGKILL, KillReason.START, Code.TIMEOUT, "did not become ready (rss)", "start"),
    ],
)
def test_every_death_is_classified(returncode, kill, code, needle, cause):
    death = classify_exit("text#0", returncode, kill, "rss")
    assert death is not None
    assert death.code is code
    assert death.cause == cause
    assert needle in death.message
    assert "text#0" in death.message


@pytest.mark.parametrize("returncode", [0, -signal.SIGTERM, -signal.SIGKILL, 1])
def test_a_stop_we_asked_for_is_never_a_crash(returncode):
    assert classify_exit("text#0", returncode, KillReason.STOP) is None


def test_registry_is_static_and_names_real_modules():
    assert module_for("text") == MANAGERS["text"]
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        module_for("video")


def test_a_crash_after_a_healthy_run_starts_a_new_streak():
    policy = RestartPolicy(crash_window_s=60, healthy_after_s=10)
    streak = [100.0, 101.0, 102.0]
    assert crash_history(streak, 103.0, 0.5, policy) == [100.0, 101.0, 102.0, 103.0]
    assert crash_history(streak, 200.0, 30.0, policy) == [200.0]
    # Never became ready: counts like a quick crash.
    assert crash_history(streak, 104.0, None, policy) == [100.0, 101.0, 102.0, 104.0]


def test_only_crashes_inside_the_window_count():
    policy = RestartPolicy(crash_window_s=60, healthy_after_s=10)
    assert crash_history([0.0, 10.0, 50.0], 65.0, 1.0, policy) == [10.0, 50.0, 65.0]


def test_exits_the_runtime_chooses_are_classified():
    stuck = classify_exit("text#0", EXIT_STUCK, None)
    assert stuck is not None
    assert stuck.code is Code.TIMEOUT
    assert stuck.crash
    assert stuck.cause == "watchdog"
    restart = classify_exit("text#0", EXIT_RESTART, None)
    assert restart is not None
    assert not restart.crash
    oom = classify_exit("text#0", -9, None, oom_killed=True)
    assert oom is not None
    assert oom.code is Code.OOM_RAM
    assert "out-of-memory killer" in oom.message
    assert oom.cause == "oom_killer"
    # A SIGKILL we sent for the memory cap stays the cap's, whatever the counters say.
    capped = classify_exit("text#0", -9, KillReason.MEMORY, "x", oom_killed=True)
    assert capped is not None
    assert "memory cap" in capped.message
