"""Unit tests for forwarder.cache.ComputingCache: the bounded memo on the hot path."""

from __future__ import annotations

import pytest

from forwarder.cache import ComputingCache


class Counter:
    """A compute function that records every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, key: int) -> str:
        self.calls.append(key)
        return f"v{key}"


def test_computes_once_per_key() -> None:
    compute = Counter()
    cache = ComputingCache(compute, 100)
    for _ in range(3):
        for key in range(10):
            assert cache[key] == f"v{key}"
    assert compute.calls == list(range(10))


def test_a_hit_returns_the_stored_object_itself() -> None:
    cache: ComputingCache[str, object] = ComputingCache(lambda key: object(), 10)
    first = cache["a"]
    assert cache["a"] is first


def test_get_and_in_do_not_compute() -> None:
    # dict's own get/contains are left alone: only [] computes.
    compute = Counter()
    cache = ComputingCache(compute, 10)
    assert cache.get(1) is None
    assert 1 not in cache
    assert compute.calls == []


@pytest.mark.parametrize("size", [1, 2, 3, 10, 64])
def test_entries_are_bounded_by_twice_the_size(size: int) -> None:
    compute = Counter()
    cache = ComputingCache(compute, size)
    for key in range(size * 20):
        cache[key]
        assert cache.entries() <= 2 * size
        assert len(cache) <= size
    assert cache.entries() >= size  # it does hold on to a generation, not less


def test_a_size_below_one_still_caches_one_entry() -> None:
    compute = Counter()
    cache = ComputingCache(compute, 0)
    cache[1]
    cache[1]
    assert compute.calls == [1]
    cache[2]
    assert cache.entries() <= 2


def test_old_generation_hits_are_promoted_without_recomputing() -> None:
    compute = Counter()
    cache = ComputingCache(compute, 4)
    for key in range(4):
        cache[key]
    cache[4]  # the live dict was full: keys 0..3 became the old generation
    assert 0 not in cache  # (the live generation only)
    assert cache.entries() == 5
    assert cache[0] == "v0"  # found in the old generation, moved back
    assert 0 in cache
    assert compute.calls == [0, 1, 2, 3, 4]
    assert cache.entries() == 5  # moved, not copied


def test_a_promoted_key_survives_the_next_rotation_the_others_do_not() -> None:
    compute = Counter()
    cache = ComputingCache(compute, 4)
    for key in range(5):  # 0..3 old, 4 live
        cache[key]
    cache[0]  # promoted: live {4, 0}
    for key in (10, 11):  # live {4, 0, 10, 11}: full
        cache[key]
    cache[12]  # rotation: old {4, 0, 10, 11}; 1, 2, 3 are gone
    compute.calls.clear()
    for key in (0, 4, 10, 11, 12):
        cache[key]
    assert compute.calls == []
    cache[1]
    assert compute.calls == [1]


def test_a_key_used_steadily_is_never_recomputed() -> None:
    compute = Counter()
    cache = ComputingCache(compute, 8)
    for key in range(1, 1000):
        cache[0]  # the hot key
        cache[key]  # a stream of new keys forcing rotations
    assert compute.calls.count(0) == 1


def test_reset_empties_both_generations() -> None:
    compute = Counter()
    cache = ComputingCache(compute, 4)
    for key in range(6):
        cache[key]
    assert cache.entries() == 6
    cache.reset()
    assert cache.entries() == 0
    assert len(cache) == 0
    compute.calls.clear()
    cache[0]  # both generations were dropped: computed again
    assert compute.calls == [0]


def test_an_exception_in_compute_caches_nothing() -> None:
    def compute(key: int) -> int:
        if key < 0:
            raise ValueError(key)
        return key

    cache = ComputingCache(compute, 4)
    with pytest.raises(ValueError, match="-1"):
        cache[-1]
    assert cache.entries() == 0
    assert cache[1] == 1
