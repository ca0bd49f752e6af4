"""A manager's frames on their way out: handed over by workers, held back per peer while it is full.

Only the runtime's I/O thread touches the socket (allm/kernel/loop.py).  Workers ``post``
frames into a bounded queue and wake the I/O thread through a pipe; while the I/O thread is
too far behind, a posting worker waits (backpressure into the engine), so no frame is ever
dropped.  ZeroMQ answers FULL for a peer whose queue is at its high-water mark
(allm/kernel/transport.py): that peer's frames are held back here, in order, until it drains.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import time
from collections.abc import Callable, Container

from allm.kernel.contract import RequestContext
from allm.kernel.transport import Router, Sent

OUTBOX_MESSAGES = 4096  # posted, not yet taken by the I/O thread: more and workers wait
STALLED_MESSAGES = 65_536  # held back for full peers: more and the I/O thread stops taking


class Outbox:
    """The worker → I/O thread hand-over and the frames held back for full peers."""

    def __init__(self, router: Router, on_gone: Callable[[bytes], None]) -> None:
        self.router = router
        self._on_gone = on_gone  # a send found its peer disconnected
        self._posted: queue.SimpleQueue[tuple[bytes, list[bytes], RequestContext | None]] = (
            queue.SimpleQueue()
        )
        self._held: dict[bytes, collections.deque[list[bytes]]] = {}
        self.held_count = 0
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self._wake_pending = False
        router.watch_fd(self.wake_r)

    # -- worker side -------------------------------------------------------

    def post(self, peer: bytes, frames: list[bytes], ctx: RequestContext | None) -> None:
        """Hand frames to the I/O thread.  Chunks wait for room but give up on cancel."""
        if ctx is not None:
            # Backpressure: while the I/O thread is this far behind, the engine waits.
            while self._posted.qsize() >= OUTBOX_MESSAGES:
                ctx.check()
                time.sleep(0.001)
        self._posted.put((peer, frames, ctx))
        if not self._wake_pending:
            self._wake_pending = True
            self.wake()

    def wake(self) -> None:
        """Wake the I/O thread's poll (from any thread, or a signal handler)."""
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"\0")

    # -- I/O thread ----------------------------------------------------------

    def woken(self) -> None:
        """The wake pipe was readable: empty it."""
        # Empty the pipe before clearing the flag: a worker that saw the flag
        # set and wrote nothing has its frames drained by the next send_posted.
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake_r, 4096)
        self._wake_pending = False

    def send(self, peer: bytes, frames: list[bytes]) -> None:
        """Send now, or hold back behind frames already waiting for this peer."""
        held = self._held.get(peer)
        if held is not None:
            held.append(frames)
            self.held_count += 1
            return
        result = self.router.send(peer, frames)
        if result is Sent.FULL:
            self._held[peer] = collections.deque([frames])
            self.held_count += 1
        elif result is Sent.GONE:
            self._on_gone(peer)

    def retry_held(self) -> None:
        """Send what was held back, in order, for as long as each peer takes it."""
        for peer in list(self._held):
            held = self._held[peer]
            while held:
                result = self.router.send(peer, held[0])
                if result is Sent.FULL:
                    break
                held.popleft()
                self.held_count -= 1
                if result is Sent.GONE:
                    self._on_gone(peer)
                    break
            else:
                del self._held[peer]

    def send_posted(self, peers: Container[bytes]) -> None:
        """Send what workers posted to the peers still known; frames for others are dropped."""
        # Stop taking from workers while too much is held back: they then block.
        while self.held_count < STALLED_MESSAGES:
            try:
                peer, frames, _ctx = self._posted.get_nowait()
            except queue.Empty:
                return
            if peer in peers:
                self.send(peer, frames)

    def holds(self, peer: bytes) -> bool:
        """Are frames held back for this peer (its queue was full)?"""
        return peer in self._held

    def forget(self, peer: bytes) -> None:
        """The peer disconnected: drop what was held back for it."""
        dropped = self._held.pop(peer, None)
        if dropped:
            self.held_count -= len(dropped)

    def is_empty(self) -> bool:
        """Nothing posted and not yet sent, nothing held back."""
        return self._posted.empty() and not self.held_count

    def close(self) -> None:
        os.close(self.wake_r)
        os.close(self.wake_w)
