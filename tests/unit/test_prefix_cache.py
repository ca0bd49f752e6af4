"""The prefix cache's bookkeeping: longest match, what supersedes what, the byte bound."""

from __future__ import annotations

import numpy as np

from allm.managers.text.prefix_cache import Entry, PrefixCache, common_start


def entry(tokens: list[int], size: int = 10, aligned: int = 0) -> Entry:
    return Entry(np.asarray(tokens, dtype=np.int32), bytearray(size), aligned)


def test_common_start_counts_the_shared_leading_tokens():
    a = np.asarray([1, 2, 3, 4], dtype=np.int32)
    assert common_start(a, np.asarray([1, 2, 9], dtype=np.int32)) == 2
    assert common_start(a, a[:2]) == 2
    assert common_start(a, np.asarray([], dtype=np.int32)) == 0
    assert common_start(a, np.asarray([7], dtype=np.int32)) == 0


def test_the_longest_matching_entry_is_found():
    cache = PrefixCache(100)
    cache.put(entry([1, 2, 3]))
    cache.put(entry([5, 6, 7, 8]))
    found, n = cache.longest(np.asarray([5, 6, 7, 9, 9], dtype=np.int32))
    assert found is not None
    assert found.tokens.tolist() == [5, 6, 7, 8]
    assert n == 3
    assert cache.longest(np.asarray([4], dtype=np.int32)) == (None, 0)


def test_an_entry_that_starts_a_newer_one_is_dropped_for_it_unless_it_is_better_aligned():
    cache = PrefixCache(100)
    cache.put(entry([1, 2], aligned=0))
    cache.put(entry([1, 2, 3, 4], aligned=0))
    assert len(cache) == 1
    assert cache.covers(np.asarray([1, 2, 3], dtype=np.int32), 0)
    cache.put(entry([1, 2, 3, 4, 5], aligned=0))
    cache.put(entry([1, 2, 3, 4], aligned=64))  # computed as a seeded cold start: kept beside
    assert len(cache) == 2
    assert not cache.covers(np.asarray([1, 2, 3, 4, 5], dtype=np.int32), 64)


def test_the_least_recently_used_goes_first_and_the_bytes_stay_within_the_bound():
    cache = PrefixCache(30)
    a, b, c = entry([1]), entry([2]), entry([3])
    for e in (a, b, c):
        cache.put(e)
    cache.used(a, 1)  # b is now the least recently used
    cache.put(entry([4]))
    assert {int(e.tokens[0]) for e in cache._entries.values()} == {1, 3, 4}
    status = cache.status()
    assert status["bytes"] == 30
    assert status["evictions"] == 1
    assert status["restores"] == 1
    assert status["tokens"] == 3
    assert not cache.fits(31)
    assert not cache.fits(0)
