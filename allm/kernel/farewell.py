"""A manager's last exchange before it closes its socket: a ``bye`` to each client, answered.

A client's DEALER is ZMQ_IMMEDIATE (allm/kernel/transport.py: a request to a manager that is
down fails at once instead of waiting for its successor), and such a DEALER drops what it has
received but not yet read when its connection closes: a manager that closed right after its
last reply lost that reply now and then.  So each peer is sent a ``bye`` behind everything
else, and the manager closes once every peer has answered the last ``bye`` it was sent:
frames arrive in order, so the answer proves the peer read all before it.  A request that
arrives meanwhile is refused as during a drain, and a new ``bye`` follows the refusal.  A peer
whose connection closed is not waited for (a send to it fails); one that never answers
(stopped) is waited for at most ``limit_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from allm.kernel import protocol as p
from allm.kernel.codes import Code
from allm.kernel.outbox import Outbox
from allm.kernel.transport import Router

log = logging.getLogger("allm.runtime")

#: the longest a closing manager waits for a client to answer its ``bye``: a client that reads
#: answers in milliseconds; only one that is stopped, or gone without a close, costs this much
FAREWELL_LIMIT_S = 2.0


def farewell(
    router: Router,
    out: Outbox,
    peers: dict[bytes, float],
    *,
    refuse: Callable[[bytes, p.Request], None],
    heartbeat: Callable[[], None],
    probe_s: float,
    limit_s: float = FAREWELL_LIMIT_S,
) -> None:
    """Say ``bye`` to every peer in ``peers`` and return when each has answered, or at ``limit_s``.

    ``peers`` is the runtime's table of known peers: a send that finds a peer's connection
    closed takes it out (through the outbox's gone-callback), and then it is not waited for.
    ``heartbeat`` is sent every ``probe_s``: it keeps a supervisor from taking the manager for
    hung, and a heartbeat to a peer whose connection closed after its ``bye`` left finds it gone.
    """
    owed: dict[bytes, int] = {}  # peer → the seq of the last bye sent to it

    def bye(peer: bytes) -> None:
        owed[peer] = seq = owed.get(peer, 0) + 1
        out.send(peer, p.encode(p.Bye(seq)))

    def waiting() -> list[bytes]:
        return [peer for peer in owed if peer in peers]

    for peer in list(peers):
        bye(peer)
    deadline = time.monotonic() + limit_s
    next_probe = time.monotonic() + probe_s
    while waiting():
        now = time.monotonic()
        if now >= deadline:
            log.warning(
                "closing with client(s) that did not answer bye: %s", [peer.hex() for peer in waiting()]
            )
            return
        if now >= next_probe:
            heartbeat()
            next_probe = now + probe_s
        wait_s = min(deadline, next_probe) - now
        if out.held_count:  # a peer's queue was full: what is held for it goes first, bye last
            out.retry_held()
            wait_s = min(wait_s, 0.001)
        if router.socket not in router.poll(max(1, int(wait_s * 1000))):
            continue
        while (got := router.recv()) is not None:
            peer, frames = got
            try:
                msg = p.decode(frames)
            except p.ProtocolError as exc:
                out.send(peer, p.encode(p.Error(exc.rid, Code.UNSUPPORTED, exc.message, exc.reason)))
                bye(peer)
                continue
            match msg:
                case p.Bye() if owed.get(peer) == msg.seq:
                    del owed[peer]
                case p.Request():
                    peers.setdefault(peer, now)
                    refuse(peer, msg)
                    bye(peer)
                case _:
                    pass  # an earlier bye's answer, a hello, a cancel: nothing runs any more
