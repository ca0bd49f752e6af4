"""Stop sequences: generated text cut at the first one, holding back only what may begin one."""

from __future__ import annotations

from collections.abc import Sequence


def held_back(buffer: str, markers: Sequence[str]) -> int:
    """How many characters at the end of ``buffer`` may be the start of one of ``markers``.

    Streamed text is released up to there: the next piece may complete the marker.
    """
    hold = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(buffer)), hold, -1):
            if buffer.endswith(marker[:k]):
                hold = k
                break
    return hold


class StopMatcher:
    """Cuts generated text at the first stop sequence, holding back what may start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.matched: str | None = None  # the stop sequence that ended the text, once one has

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop sequence was reached."""
        if not self.stops:
            return text, False
        self.buffer += text
        hits = [(at, stop) for stop in self.stops if (at := self.buffer.find(stop)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            out, self.buffer = self.buffer[:at], ""
            return out, True
        cut = len(self.buffer) - held_back(self.buffer, self.stops)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
