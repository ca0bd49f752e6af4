"""Supervisor decisions are pure functions of state and time: tested on a hand-made clock."""

import signal

import pytest

from kernel.codes import Code
from kernel.registry import MANAGERS, module_for
from kernel.supervisor import KillReason, RestartPolicy, classify_exit, next_restart_delay_s

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
    ("returncode", "kill", "code", "needle"),
    [
        (-signal.SIGSEGV, None, Code.INTERNAL, "died of SIGSEGV (signal 11)"),
        (-signal.SIGABRT, None, Code.INTERNAL, "died of SIGABRT (signal 6)"),
        (-signal.SIGKILL, None, Code.INTERNAL, "died of SIGKILL (signal 9)"),
        (3, None, Code.INTERNAL, "exited with status 3"),
        (0, None, Code.INTERNAL, "exited with status 0"),
        (-signal.SIGKILL, KillReason.MEMORY, Code.OOM_RAM, "memory cap (rss)"),
        (-signal.SIGKILL, KillReason.HUNG, Code.TIMEOUT, "stopped answering (rss)"),
        (-signal.SIGKILL, KillReason.START, Code.TIMEOUT, "did not become ready (rss)"),
    ],
)
def test_every_death_is_classified(returncode, kill, code, needle):
    death = classify_exit("text#0", returncode, kill, "rss")
    assert death is not None
    assert death.code is code
    assert needle in death.message
    assert "text#0" in death.message


@pytest.mark.parametrize("returncode", [0, -signal.SIGTERM, -signal.SIGKILL, 1])
def test_a_stop_we_asked_for_is_never_a_crash(returncode):
    assert classify_exit("text#0", returncode, KillReason.STOP) is None


def test_registry_is_static_and_names_real_modules():
    assert module_for("text") == MANAGERS["text"]
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        module_for("video")
