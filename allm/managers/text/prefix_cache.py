"""Prefix states in host memory: a prompt's start computed once, whatever sequence serves it next.

A ``Batcher`` holds one llama.cpp cache per sequence, and a request keeps what its sequence
already holds. With more conversations than sequences, the sequence a conversation used is
soon another's: its prefix would be computed again on the next turn. So before a sequence's
cache is given up, its state (llama.cpp's per-sequence state, ``llama_state_seq_get_data``)
is copied here, keyed by the tokens it holds; a later request whose prompt starts with those
tokens has it copied back into whatever sequence it gets, and computes only the rest.

Entries are bounded in bytes (the bound is counted in the model's memory estimate) and the
least recently used goes first. An entry whose tokens are the start of a newer one's is
dropped when the newer comes: restoring the newer one and cutting it gives the same cache.
This module keeps the entries; the batcher does the copying (allm/managers/text/batching.py).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(slots=True, eq=False)
class Entry:
    """One saved sequence: the tokens its cache held, that cache's bytes, and how many of its
    leading tokens a seeded cold start would have computed the same (``_Sequence.aligned``)."""

    tokens: np.ndarray  # int32
    state: Any  # the bytes llama_state_seq_get_data wrote (a ctypes array)
    aligned: int

    @property
    def size(self) -> int:
        return len(self.state)


def common_start(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """Saved sequence states, bounded in bytes, least recently used evicted first."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self.bytes = 0
        self.tokens = 0
        self.saves = 0
        self.restores = 0
        self.restored_tokens = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, prompt: np.ndarray) -> tuple[Entry | None, int]:
        """The entry sharing the longest start with ``prompt``, and how long that start is."""
        best: Entry | None = None
        length = 0
        for entry in self._entries.values():
            n = common_start(entry.tokens, prompt)
            if n > length:
                best, length = entry, n
        return best, length

    def covers(self, tokens: np.ndarray, aligned: int) -> bool:
        """Whether an entry already holds all of ``tokens`` (they are its start, or all of it),
        with at least ``aligned`` of them as a seeded cold start computes them."""
        n = len(tokens)
        return any(
            len(e.tokens) >= n and e.aligned >= aligned and common_start(e.tokens, tokens) == n
            for e in self._entries.values()
        )

    def touch(self, entry: Entry) -> None:
        """``entry`` is the most recently used (if the cache still holds it)."""
        if id(entry) in self._entries:
            self._entries.move_to_end(id(entry))

    def used(self, entry: Entry, tokens: int) -> None:
        """``entry`` was restored to serve ``tokens`` of a prompt. Saving the sequence it went to
        may have put it out to make room: what was restored is the caller's copy either way."""
        self.touch(entry)
        self.restores += 1
        self.restored_tokens += tokens

    def fits(self, size: int) -> bool:
        return 0 < size <= self.limit_bytes

    def put(self, entry: Entry) -> None:
        """Keep ``entry``, dropping the entries it supersedes and then the least recently used
        until the bytes fit. The caller checked ``fits(entry.size)``."""
        for key, old in list(self._entries.items()):
            if (
                len(old.tokens) <= len(entry.tokens)
                and old.aligned <= entry.aligned
                and common_start(old.tokens, entry.tokens) == len(old.tokens)
            ):
                self._drop(key)
        while self._entries and self.bytes + entry.size > self.limit_bytes:
            self._drop(next(iter(self._entries)))
            self.evictions += 1
        self._entries[id(entry)] = entry
        self.bytes += entry.size
        self.tokens += len(entry.tokens)
        self.saves += 1

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        self.tokens -= len(entry.tokens)

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = self.tokens = 0

    def status(self) -> dict[str, int]:
        """What /status shows of the cache: counters only, so another thread reads it unlocked."""
        return {
            "entries": len(self._entries),
            "bytes": self.bytes,
            "limit_bytes": self.limit_bytes,
            "tokens": self.tokens,
            "saves": self.saves,
            "restores": self.restores,
            "restored_tokens": self.restored_tokens,
            "evictions": self.evictions,
        }
