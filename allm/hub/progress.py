"""How ``allm pull`` shows its progress: a line per file, redrawn on a terminal, printed once elsewhere.

On a terminal each file's line (bytes so far, rate, time left) is redrawn in place with a
carriage return, at most ``REDRAW_S`` apart, and ends when the file is checked; anywhere
else (a log, a pipe) only the finished line is printed, once per file.
"""

from __future__ import annotations

import time
from typing import TextIO

from allm.hub.fetching import Progress

REDRAW_S = 0.2


def size_text(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else (f"{seconds // 60}:{seconds % 60:02d}")
    )


class ProgressLines:
    """A ``pull`` progress callback writing to ``out``."""

    def __init__(self, out: TextIO, *, terminal: bool | None = None) -> None:
        self.out = out
        self.terminal = out.isatty() if terminal is None else terminal
        self.file = ""
        self.started = 0.0
        self.first_bytes = 0  # what was already here (resumed) when the file started
        self.drawn = 0.0

    def __call__(self, step: Progress) -> None:
        now = time.monotonic()
        if step.file != self.file:
            self.file, self.started, self.first_bytes, self.drawn = step.file, now, step.done_bytes, 0.0
        if step.finished:
            self._line(step, now, end="\n")
        elif self.terminal and now - self.drawn >= REDRAW_S:
            self.drawn = now
            self._line(step, now, end="")

    def _line(self, step: Progress, now: float, end: str) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = (step.done_bytes - self.first_bytes) / elapsed
        head = f"[{step.index}/{step.count}] {step.file}"
        if step.finished:
            fetched = step.done_bytes - self.first_bytes
            how = f"{size_text(rate)}/s" if fetched > 0 else "already here"
            text = f"{head}  {size_text(step.total_bytes)}  checked  ({how})"
        else:
            left = (step.total_bytes - step.done_bytes) / rate if rate > 0 else None
            eta = _duration(left) if left is not None else "--:--"
            percent = 100 * step.done_bytes / step.total_bytes if step.total_bytes else 100.0
            text = (
                f"{head}  {size_text(step.done_bytes)} / {size_text(step.total_bytes)}  {percent:5.1f}%  "
                f"{size_text(rate)}/s  {eta} left"
            )
        prefix = "\r\033[K" if self.terminal else ""
        self.out.write(prefix + text + end)
        self.out.flush()
