"""A manager's stderr passed on to the supervisor's own, its last lines kept to show with its death.

Under ``--log-format json`` only whole lines pass, each a JSON object (an engine's own print
wrapped by ``logs.json_line``), so every line of the server's log parses.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
from typing import IO

from allm.kernel import logs

#: the lines of a manager's stderr kept to show with its death (ggml's message before an abort)
TAIL_LINES = 20
#: an unfinished line longer than this is kept as a line of its own
LONGEST_LINE_BYTES = 4096


class StderrRelay:
    """One manager instance's stderr pipe, read in the event loop as it comes, process after process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._json = logs.log_format() == "json"
        self._pipe: IO[bytes] | None = None
        self._fd: int | None = None
        self._partial = b""  # an unfinished line
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def attach(self, pipe: IO[bytes]) -> None:
        """Relay a new process's stderr; the last lines of the one before are forgotten."""
        self._pipe = pipe
        self._fd = pipe.fileno()
        os.set_blocking(self._fd, False)
        self._partial = b""
        self.tail.clear()
        asyncio.get_running_loop().add_reader(self._fd, self.read)

    def read(self) -> None:
        """Pass on what the pipe holds now, keeping its last lines; its end closes it."""
        fd = self._fd
        while fd is not None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # its end: the process exited
                self.close()
                return
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            if self._json:  # whole lines only, each a JSON object (an engine's print wrapped)
                chunk = b"".join(logs.json_line(self.name, line) for line in lines if line.strip())
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            self.tail.extend(line.decode("utf-8", "replace").rstrip() for line in lines if line.strip())
            if len(self._partial) > LONGEST_LINE_BYTES:  # no newline in sight
                self.tail.append(self._partial.decode("utf-8", "replace"))
                self._partial = b""

    def close(self) -> None:
        """Done with this process's pipe: keep its unfinished last line, stop watching it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(fd)
        if self._partial.strip():
            self.tail.append(self._partial.decode("utf-8", "replace").rstrip())
            if self._json:
                with contextlib.suppress(OSError, ValueError):
                    sys.stderr.buffer.write(logs.json_line(self.name, self._partial))
            self._partial = b""
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
