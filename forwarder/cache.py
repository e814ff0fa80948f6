"""A bounded memo for the hot path: a hit is one C-level dict lookup."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class ComputingCache(dict[K, V]):
    """``cache[key]`` returns the cached value or computes, stores and returns it.

    A dict subclass that defines only ``__missing__`` keeps ``__getitem__`` in C, so a
    hit costs what a plain dict lookup costs. Bounded by two generations: when the
    live dict reaches ``size`` it is set aside as the old generation and a new one
    begins; a key found in the old generation is moved back instead of recomputed.
    At most ``2 * size`` entries exist; the copy made at each rotation is amortised
    over the ``size`` insertions that filled it.
    """

    def __init__(self, compute: Callable[[K], V], size: int) -> None:
        super().__init__()
        self._compute = compute
        self._size = max(1, size)
        self._old: dict[K, V] = {}

    def __missing__(self, key: K) -> V:
        value = self._old.pop(key) if key in self._old else self._compute(key)
        if len(self) >= self._size:
            self._old = dict(self)
            self.clear()
        self[key] = value
        return value

    def entries(self) -> int:
        """Entries held in both generations (for tests and memory accounting)."""
        return len(self) + len(self._old)

    def reset(self) -> None:
        self.clear()
        self._old = {}
