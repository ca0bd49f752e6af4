"""One manager instance as the kernel client keeps it: its connection, heartbeats, liveness and requests.

An ``Instance`` holds the DEALER to one manager instance and reads what comes back:
chunks, ``start`` and terminals go to the open request they name (a ``Pending``), a
heartbeat updates what the instance is (live, draining, restarted, its catalog and load),
and a bad frame fails the request it names, or the whole instance when it speaks another
protocol version.  What crosses instances, where a request goes and whether it is sent
again, is the client's: an instance tells it of a change (``changed``) and hands it each
request it can no longer serve (``orphaned``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from allm.kernel import protocol as p
from allm.kernel.codes import (
    REASON_BAD_VERSION,
    REASON_DRAINING,
    REASON_LOST_FRAMES,
    REASON_MANAGER_FAILED,
    REASON_SLOW_CONSUMER,
    AllmError,
    DeadlineError,
    InternalError,
    error_for,
)
from allm.kernel.placement import Candidate
from allm.kernel.transport import Dealer

log = logging.getLogger("allm.client")

EXIT_GRACE_S = 0.1


@dataclasses.dataclass(frozen=True, slots=True)
class InstanceView:
    """One manager instance as the client sees it."""

    modality: str
    endpoint: str
    live: bool
    failed: str
    outstanding: int
    heard_s_ago: float | None
    heartbeat: p.Heartbeat | None
    restarts_seen: int = 0  # new incarnations this client heard


class Pending:
    """One open request: where it was sent, what came back, whether a worker started it."""

    __slots__ = (
        "chunks",
        "deadline",
        "inst",
        "next_seq",
        "req",
        "resends",
        "sent",
        "started",
        "terminal",
        "timer",
        "waiter",
    )

    def __init__(self, inst: Instance, req: p.Request) -> None:
        self.inst = inst
        self.req = req
        self.started = False  # a worker took it: from then on a crash costs it
        self.resends = 0
        self.sent = 0  # the order it was (last) sent in
        self.deadline = 0.0  # time.monotonic()
        self.chunks: collections.deque[p.Chunk] = collections.deque()
        self.terminal: p.Result | AllmError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.next_seq = 0

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self, terminal: p.Result | AllmError) -> None:
        """Record the one terminal; later ones (a late frame after a synthesized error) are ignored."""
        if self.terminal is not None:
            return
        self.terminal = terminal
        self.inst.pending.pop(self.req.rid, None)
        if self.timer is not None:
            self.timer.cancel()
        self.wake()

    def cancel(self, exc: AllmError) -> None:
        """Stop the request on our side and tell the manager to stop it too."""
        if self.terminal is None:
            self.finish(exc)
            dealer = self.inst.dealer
            if dealer is not None:
                dealer.send(p.encode(p.Cancel(self.req.rid)))

    def take(self, chunk: p.Chunk, max_buffered: int) -> None:
        """A chunk arrived: queue it for the reader, or fail the stream that lost or piled up frames."""
        if chunk.seq != self.next_seq:
            self.cancel(
                InternalError(
                    f"stream lost frames: expected chunk {self.next_seq}, got {chunk.seq}",
                    reason=REASON_LOST_FRAMES,
                )
            )
            return
        self.next_seq += 1
        self.chunks.append(chunk)
        if len(self.chunks) > max_buffered:
            self.chunks.clear()
            self.cancel(
                InternalError(
                    f"the reader fell more than {max_buffered} chunks behind the stream",
                    reason=REASON_SLOW_CONSUMER,
                )
            )
            return
        self.wake()


class Instance:
    """One manager instance: its DEALER, what its heartbeats said, and its open requests."""

    def __init__(
        self,
        modality: str,
        endpoint: str,
        *,
        changed: Callable[[], None],
        orphaned: Callable[[Pending, AllmError], None],
        max_buffered_chunks: int,
    ) -> None:
        """``changed``: called when the instance may now take requests or no longer may.
        ``orphaned``: given each open request the instance will not answer (it died, restarted,
        went silent or is draining), to send again or fail."""
        self.modality = modality
        self.endpoint = endpoint
        self._changed = changed
        self._orphaned = orphaned
        self._max_buffered_chunks = max_buffered_chunks
        self.dealer: Dealer | None = None
        self.pending: dict[int, Pending] = {}
        self.heartbeat: p.Heartbeat | None = None
        self._catalog: frozenset[str] | None = None  # the models it can serve; None until it says
        self._loaded: frozenset[str] = frozenset()  # the models its last heartbeat says are loaded
        self.last_heard: float | None = None
        self.live = False
        self.dead_incarnation = ""  # heartbeats from it never make us live again
        self.failed: AllmError | None = None
        self.restarts_seen = 0  # new incarnations heard: restarts, where nobody else counts them

    def fail_all(self, exc: AllmError) -> None:
        for pending in list(self.pending.values()):
            pending.finish(exc)

    @property
    def slots(self) -> int:
        """How many requests the instance runs at once, from its heartbeat (1 when unknown)."""
        slots = self.heartbeat.extra.get("slots", 1) if self.heartbeat is not None else 1
        return slots if isinstance(slots, int) and slots > 0 else 1

    def candidate(self) -> Candidate:
        """What placement needs to know of this instance, from its state and last heartbeat."""
        hb = self.heartbeat
        return Candidate(
            key=self.endpoint,
            live=self.live,
            catalog=self._catalog,
            loaded=self._loaded,
            outstanding=len(self.pending),
            capacity=hb.capacity if hb is not None else None,
            failed=self.failed.message if self.failed is not None else None,
            heard_at=self.last_heard,
        )

    def view(self, now: float) -> InstanceView:
        return InstanceView(
            modality=self.modality,
            endpoint=self.endpoint,
            live=self.live,
            failed=self.failed.message if self.failed else "",
            outstanding=len(self.pending),
            heard_s_ago=None if self.last_heard is None else now - self.last_heard,
            heartbeat=self.heartbeat,
            restarts_seen=self.restarts_seen,
        )

    # -- deaths ------------------------------------------------------------------

    def down(self, exc: AllmError, *, failed: bool = False) -> None:
        """The instance died (failed: and it will not be restarted)."""
        self.live = False
        if self.heartbeat is not None:
            self.dead_incarnation = self.heartbeat.incarnation
        if failed:
            self.failed = exc
        self._changed()
        if self.dealer is not None:
            self.dealer.drain()
        if self.pending:
            # Replies the manager sent just before it exited may still be on their
            # way through ZeroMQ's I/O thread: let them land before failing the rest.
            in_flight = [(pending, pending.sent) for pending in self.pending.values()]
            slots = self.slots

            def fail_in_flight() -> None:
                # Not those sent again meanwhile (the successor's first heartbeat does that).
                self._lost([q for q, sent in in_flight if q.sent == sent], exc, slots)

            asyncio.get_running_loop().call_later(EXIT_GRACE_S, fail_in_flight)

    def check_silence(self, now: float, timeout_s: float) -> None:
        """Declare the instance dead when it has not been heard from for ``timeout_s``."""
        heard = self.last_heard
        if self.live and heard is not None and now - heard > timeout_s:
            self.live = False
            silent = DeadlineError(
                f"the {self.modality} manager stopped answering (no heartbeat for {now - heard:.1f} s)"
            )
            self._lost(list(self.pending.values()), silent, self.slots)
            self._changed()

    def _lost(self, in_flight: Sequence[Pending], exc: AllmError, slots: int) -> None:
        """The instance died with these requests open: mark what may have run, then orphan them all.

        A manager runs its line first come, first served, so when fewer than ``slots`` are
        known to run, the oldest others may have started unheard (their ``start`` died with
        the process) and pay as if they had."""
        unheard = slots - sum(1 for q in in_flight if q.started and q.terminal is None)
        for pending in sorted(in_flight, key=lambda q: q.sent):
            if not pending.started and unheard > 0:
                unheard -= 1
                pending.started = True  # among the oldest: it may have started unheard
            self._orphaned(pending, exc)

    def on_disconnect(self) -> None:
        """The connection closed: the manager's process ended (when we were told to watch)."""
        hb = self.heartbeat
        if not self.live or hb is None or hb.incarnation == self.dead_incarnation:
            return
        self.down(
            InternalError(
                f"the {self.modality} manager's process ended (pid {hb.pid}): its connection closed"
            )
        )

    # -- incoming ----------------------------------------------------------------

    def on_message(self, frames: list[bytes]) -> None:
        try:
            msg = p.decode(frames)
        except p.ProtocolError as exc:
            self._on_bad_frame(exc)
            return
        # Only a frame we understood proves the manager alive.
        self.last_heard = time.monotonic()
        match msg:
            case p.Chunk():
                pending = self.pending.get(msg.rid)
                if pending is not None:
                    pending.take(msg, self._max_buffered_chunks)
            case p.Started():
                pending = self.pending.get(msg.rid)
                if pending is not None:
                    pending.started = True
            case p.Result():
                pending = self.pending.get(msg.rid)
                if pending is not None:
                    pending.finish(msg)
            case p.Error():
                pending = self.pending.get(msg.rid)
                if pending is not None:
                    error = error_for(msg.code, msg.message, reason=msg.reason, param=msg.param)
                    if msg.reason == REASON_DRAINING:
                        # It is going away and never ran this: send it elsewhere, not back.
                        if self.live:
                            self.live = False
                            self._changed()
                        self._orphaned(pending, error)
                    else:
                        pending.finish(error)
                else:
                    log.debug("error for no request from %s: %s", self.endpoint, msg.message)
            case p.Heartbeat():
                self._on_heartbeat(msg)
            case p.Bye():
                # It is closing, and this gateway has read everything it sent before: say so
                # (the manager waits for it, allm/kernel/loop.py's farewell) and send it nothing more.
                if self.live:
                    self.live = False
                    self._changed()
                if self.dealer is not None:
                    self.dealer.send(p.encode(msg))
            case _:
                log.warning("unexpected %s from %s", type(msg).__name__, self.endpoint)

    def _on_bad_frame(self, exc: p.ProtocolError) -> None:
        log.warning("bad frame from %s: %s", self.endpoint, exc.message)
        if exc.reason == REASON_BAD_VERSION:
            # It will never understand us: fail fast until a manager that does answers.
            failure = InternalError(
                f"the {self.modality} manager at {self.endpoint} does not speak this gateway's "
                f"protocol: {exc.message}",
                reason=REASON_MANAGER_FAILED,
            )
            self.live = False
            self.failed = failure
            self.fail_all(failure)
            self._changed()
            return
        pending = self.pending.get(exc.rid) if exc.rid else None
        if pending is not None:
            pending.cancel(
                InternalError(
                    f"the {self.modality} manager sent a bad frame: {exc.message}", reason=exc.reason
                )
            )

    def _on_heartbeat(self, hb: p.Heartbeat) -> None:
        old = self.heartbeat
        if old is not None and old.incarnation != hb.incarnation:
            self.restarts_seen += 1
            if self.pending:
                restarted = InternalError(f"the {self.modality} manager restarted (pid {old.pid} → {hb.pid})")
                self._lost(list(self.pending.values()), restarted, self.slots)
        self.heartbeat = hb
        # Read once a heartbeat, not once a request: placement asks for them on every request.
        catalog = hb.extra.get("catalog")
        self._catalog = (
            frozenset(m for m in catalog if isinstance(m, str)) if isinstance(catalog, list) else None
        )
        self._loaded = frozenset(hb.models)
        if hb.incarnation == self.dead_incarnation:
            return
        live = not hb.draining
        if live != self.live or self.failed is not None:
            self.live = live
            self.failed = None
            self._changed()
