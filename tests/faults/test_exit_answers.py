"""A manager that exits on purpose loses no answer: every reply it sent is read before it closes.

The gateway's DEALER is ZMQ_IMMEDIATE, and such a socket drops what it has received but not
yet read when the connection closes.  A manager that exits on purpose (an engine error that
taints the process, a drain) therefore says ``bye`` after its last frame and closes only when
the client has answered it (allm/kernel/loop.py, ``farewell``).  Before that handshake about
one exit in fifteen lost the answer sent just before it.

Each round here exits the real fault manager under load: a tainting request and requests
behind it, some answered by the process that exits and some handed back unstarted and served
by its successor.  Every request must get its own answer.  ``ALLM_EXIT_ROUNDS`` sets the
number of rounds (the suite runs 20; ``ALLM_EXIT_ROUNDS=200`` is the long run).
"""

from __future__ import annotations

import asyncio
import os

import pytest

from allm.kernel.codes import AllmError, Code

from .conftest import running_cluster

ROUNDS = int(os.environ.get("ALLM_EXIT_ROUNDS", "20"))
BEHIND = 6  # requests sent with each tainting one


@pytest.mark.timeout(60 + 5 * ROUNDS)  # a round is a process restart: about a second here
async def test_deliberate_exits_under_load_lose_no_answer():
    async with running_cluster() as cluster:
        for round_ in range(ROUNDS):
            before = (await cluster.running()).pid
            calls = [
                cluster.client.call("fault", "echo", params={"round": round_, "i": i}, timeout_s=60)
                for i in range(BEHIND // 2)
            ]
            suspect = cluster.client.call("fault", "suspect", params={"round": round_}, timeout_s=60)
            calls += [
                cluster.client.call("fault", "echo", params={"round": round_, "i": i}, timeout_s=60)
                for i in range(BEHIND // 2, BEHIND)
            ]
            tainted, *echoes = await asyncio.gather(suspect, *calls, return_exceptions=True)
            # Its own answer, not the supervisor's word that the process ended.
            assert isinstance(tainted, AllmError), f"round {round_}: {tainted!r}"
            assert (tainted.code, tainted.message) == (Code.INTERNAL, "the engine failed in C"), (
                f"round {round_}: {tainted.message}"
            )
            for i, echo in enumerate(echoes):
                assert not isinstance(echo, BaseException), f"round {round_}, request {i}: {echo!r}"
                assert echo.data["echo"] == {"round": round_, "i": i}
            await cluster.running(other_than=before)
        status = cluster.status()
        assert status.restarts == ROUNDS
        assert "restarted itself after an engine error" in status.last_exit
