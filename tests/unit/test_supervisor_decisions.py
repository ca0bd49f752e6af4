"""Supervisor decisions are pure functions of state and time: tested on a hand-made clock."""

import signal

import pytest

from allm.kernel.codes import Code
from allm.kernel.process import EXIT_RESTART, EXIT_STUCK
from allm.kernel.registry import MANAGERS, module_for
from allm.kernel.restarts import (
    KillReason,
    RestartPolicy,
    after_death,
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


def test_what_follows_a_death_backoff_giving_up_or_at_once():
    policy = RestartPolicy(backoff_initial_s=0.5, crash_window_s=60, max_crashes=1, healthy_after_s=10)
    crash = classify_exit("text#0", -signal.SIGSEGV, None)
    assert crash is not None
    first = after_death(crash, [], 100.0, 1.0, policy)
    assert (first.crashes, first.restart_in_s, first.failed) == ([100.0], 0.5, False)
    second = after_death(crash, first.crashes, 101.0, 1.0, policy)
    assert (second.crashes, second.restart_in_s, second.failed) == ([100.0, 101.0], None, True)
    # After a healthy run: at once, a new streak.
    healthy = after_death(crash, second.crashes, 200.0, 30.0, policy)
    assert (healthy.crashes, healthy.restart_in_s, healthy.failed) == ([200.0], 0.0, False)
    # It asked for a fresh process: at once, not counted.
    asked = classify_exit("text#0", EXIT_RESTART, None)
    assert asked is not None
    again = after_death(asked, [100.0], 102.0, 1.0, policy)
    assert (again.crashes, again.restart_in_s, again.failed) == ([100.0], 0.0, False)


@pytest.mark.parametrize("returncode", [0, -signal.SIGTERM])
def test_a_manager_that_drains_away_once_the_stop_began_is_no_death(returncode):
    """A SIGTERM sent to the server's whole process group reaches the managers as the
    server starts its drain: each drains and exits by itself before the supervisor signals."""
    assert classify_exit("text#0", returncode, None, stopping=True) is None
    # Outside a stop, the same exit is a death, and the manager comes back, but only after the
    # first backoff even after a healthy run: the group's stop may reach the manager a moment
    # before the server's own begins, and begin_stop then finds the restart pending.
    death = classify_exit("text#0", returncode, None)
    assert death is not None
    assert after_death(death, [], 100.0, 30.0, POLICY).restart_in_s == POLICY.backoff_initial_s > 0
    # A crash after a healthy run still comes back at once.
    crash = classify_exit("text#0", -signal.SIGKILL, None)
    assert crash is not None
    assert after_death(crash, [], 100.0, 30.0, POLICY).restart_in_s == 0.0


def test_nothing_is_restarted_once_the_stop_began():
    crash = classify_exit("text#0", -signal.SIGSEGV, None, stopping=True)
    assert crash is not None  # a crash during the drain is still reported, with its code
    assert crash.code is Code.INTERNAL
    for uptime_s in (None, 1.0, 30.0):
        verdict = after_death(crash, [90.0], 100.0, uptime_s, POLICY, stopping=True)
        assert (verdict.restart_in_s, verdict.failed, verdict.crashes) == (None, False, [90.0])
