"""A stop asked for never restarts a manager: one that ends while the server drains stays down."""

from __future__ import annotations

import os
import signal

from allm.kernel.supervisor import InstanceStatus
from tests.waits import until

from .conftest import Cluster, process_gone


async def _exited(cluster: Cluster, name: str) -> InstanceStatus:
    """Until the supervisor has seen the process of ``name`` end (it holds none)."""

    def seen() -> InstanceStatus | None:
        status = cluster.status(name)
        return status if status.pid is None else None

    return await until(seen, 30, f"the supervisor to see {name} exit")


async def test_a_manager_that_ends_once_the_stop_began_is_not_restarted(cluster: Cluster):
    """What a SIGTERM to the server's whole process group does (systemd, ``kill -- -PGID``):
    the server's drain has begun (``begin_stop``, allm/gateway/app.py) when the same signal
    drains the manager, which exits 0 by itself before the supervisor signals anything."""
    fault, other = cluster.pid("fault#0"), cluster.pid("other#0")
    cluster.supervisor.begin_stop()
    assert await cluster.serves_again("other") == other  # beginning the stop stops nothing

    os.kill(fault, signal.SIGTERM)
    status = await _exited(cluster, "fault#0")
    assert process_gone(fault)
    assert (status.state, status.restarts, status.last_exit, status.deaths) == ("stopped", 0, "", ())

    # A crash meanwhile is still a death, reported with its cause, and not restarted either.
    os.kill(other, signal.SIGSEGV)
    status = await _exited(cluster, "other#0")
    assert (status.state, status.restarts, status.deaths) == ("stopped", 0, (("SIGSEGV", 1),))
    assert "died of SIGSEGV" in status.last_exit
