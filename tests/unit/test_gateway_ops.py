"""/status's manager rows (one the supervisor runs, one only heard of: one shape) and model states."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from allm.gateway.ops import instance_row, model_state
from allm.kernel.instances import InstanceView
from allm.kernel.protocol import Heartbeat
from allm.kernel.supervisor import InstanceStatus

KEYS = [
    "name",
    "modality",
    "instance",
    "endpoint",
    "pid",
    "state",
    "live",
    "restarts",
    "last_exit",
    "last_code",
    "last_lines",
    "deaths",
    "retry_in_s",
    "models",
    "loading",
    "pinned",
    "model_stats",
    "running",
    "active",
    "queued",
    "capacity",
    "memory_bytes",
    "remote",
]


class Target(NamedTuple):
    """What names an instance something else runs (a ManagerSpec, a Remote)."""

    name: str
    modality: str
    instance: int
    endpoint: str


def view(endpoint: str, *, live: bool = True, **extra: object) -> InstanceView:
    heartbeat = Heartbeat(
        pid=42,
        incarnation="i",
        modality="text",
        instance=0,
        models=("m",),
        active=1,
        queued=2,
        capacity=20,
        memory_bytes=1000,
        extra=extra,
    )
    return InstanceView("text", endpoint, live, "", 0, 0.1234, heartbeat, restarts_seen=3)


def test_a_supervised_instance_shows_the_supervisors_record_and_its_heartbeat():
    kept = InstanceStatus(
        "text#0",
        "text",
        0,
        "ipc:///run/text-0.sock",
        pid=41,
        state="running",
        restarts=1,
        last_exit="exited with status 1",
        last_code="",
        memory_bytes=2000,
        last_lines=("boom",),
        deaths=(("crash", 1),),
    )
    row = instance_row(kept, view(kept.endpoint, loading={"n": 0.5}), kept)
    assert list(row) == KEYS
    assert row == {
        "name": "text#0",
        "modality": "text",
        "instance": 0,
        "endpoint": "ipc:///run/text-0.sock",
        "pid": 41,
        "state": "running",
        "live": True,
        "restarts": 1,
        "last_exit": "exited with status 1",
        "last_code": None,
        "last_lines": ["boom"],
        "deaths": {"crash": 1},
        "retry_in_s": None,
        "models": ["m"],
        "loading": {"n": 0.5},
        "pinned": [],
        "model_stats": {},
        "running": [],
        "active": 1,
        "queued": 2,
        "capacity": 20,
        "memory_bytes": 2000,
        "remote": False,
    }


def test_an_instance_only_heard_of_is_running_while_heard_and_absent_after():
    target = Target("text@h:5555", "text", 0, "tcp://h:5555")
    row = instance_row(target, view(target.endpoint, loading={"n": 0.5}))
    assert list(row) == [*KEYS[:-1], "heard_s_ago", "remote"]
    assert (row["pid"], row["state"], row["restarts"], row["memory_bytes"]) == (42, "running", 3, 1000)
    assert (row["loading"], row["heard_s_ago"], row["remote"]) == ({"n": 0.5}, 0.123, True)
    assert (row["last_exit"], row["last_lines"], row["deaths"]) == (None, [], {})
    absent = instance_row(target, view(target.endpoint, live=False, loading={"n": 0.5}))
    assert (absent["state"], absent["live"], absent["loading"]) == ("absent", False, {})
    unheard = instance_row(Target("text#0", "text", 0, "ipc:///run/text-0.sock"), None)
    assert (unheard["pid"], unheard["state"], unheard["models"], unheard["remote"]) == (
        None,
        "absent",
        [],
        False,
    )


@pytest.mark.parametrize(
    ("loaded", "loading", "live", "state"),
    [
        (True, True, True, "loaded"),
        (False, True, True, "loading"),
        (False, False, True, "available"),
        (False, False, False, "unavailable"),
    ],
)
def test_a_models_state_is_where_it_is_furthest(loaded, loading, live, state):
    assert model_state(loaded, loading, live) == state
