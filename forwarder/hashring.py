"""Asset id -> cluster name. Pure: no I/O, no NATS, safe to import from any client.

Two algorithms:

``rendezvous`` (the default): weighted rendezvous (highest random weight) hashing.
For an asset id ``a`` and a cluster named ``n`` with weight ``w``::

    h     = BLAKE2b-64(utf8(a)) read little-endian
    s_n   = BLAKE2b-64(utf8(n)) read little-endian
    x     = fmix64(h XOR s_n)                  # MurmurHash3's 64-bit finaliser
    u     = ((x >> 11) + 0.5) / 2**53          # uniform in (0, 1)
    score = w / -ln(u)

and the asset goes to the cluster with the highest score (ties: the smaller name).
Each cluster's score depends only on the asset and that cluster, so adding a cluster
moves exactly the assets the new one wins (all of them *to* it), removing one moves
only its own assets, and a cluster's share of the key space is exactly its weight over
the total weight. The balance is that of a uniform hash: no virtual nodes to tune.

``openfactory``: bit-for-bit the ConsistentHashRing of OpenFactory's forwarder, so a
deployment can switch without moving a single asset: ring points are SHA-256 of
``"{name}::{i}"`` for ``i`` in ``range(replicas)`` read as big-endian integers; an
asset's SHA-256 goes to the first point strictly greater (``bisect_right``),
wrapping round to the first point. No weights.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from typing import Protocol

_MASK64 = (1 << 64) - 1
_INV_2_53 = 1.0 / (1 << 53)
_RING_SPACE = 1 << 256

DEFAULT_CACHE_SIZE = 262144


class Ring(Protocol):
    """What routing needs from a hashing algorithm."""

    def cluster_for(self, asset: str) -> str: ...

    def shares(self) -> dict[str, float]:
        """Each cluster's share of the key space (sums to 1)."""
        ...


def _blake64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class RendezvousRing:
    """Weighted rendezvous hashing (see the module docstring for the exact formula)."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        if not weights:
            raise ValueError("a ring needs at least one cluster")
        for name, weight in weights.items():
            if not weight > 0:
                raise ValueError(f"cluster {name!r}: weight must be > 0")
        self._weights = dict(weights)
        # Sorted by name so ties resolve the same way on every replica and client.
        self._clusters = tuple(
            (name, _blake64(name.encode("utf-8")), float(weight)) for name, weight in sorted(weights.items())
        )

    def cluster_for(self, asset: str) -> str:
        h = _blake64(asset.encode("utf-8"))
        best_name = ""
        best_score = -1.0
        log = math.log
        for name, seed, weight in self._clusters:
            x = h ^ seed  # fmix64, inlined: this loop is the cost of an uncached lookup
            x ^= x >> 33
            x = (x * 0xFF51AFD7ED558CCD) & _MASK64
            x ^= x >> 33
            x = (x * 0xC4CEB9FE1A85EC53) & _MASK64
            x ^= x >> 33
            score = weight / -log(((x >> 11) + 0.5) * _INV_2_53)
            if score > best_score:
                best_name, best_score = name, score
        return best_name

    def shares(self) -> dict[str, float]:
        total = sum(self._weights.values())
        return {name: w / total for name, w in sorted(self._weights.items())}


class OpenFactoryRing:
    """OpenFactory's ConsistentHashRing, reproduced exactly (see the module docstring)."""

    def __init__(self, names: Iterable[str], replicas: int = 128) -> None:
        points: dict[int, str] = {}
        for name in names:
            for i in range(replicas):
                points[self._hash(f"{name}::{i}")] = name
        if not points:
            raise ValueError("a ring needs at least one cluster")
        self._points = sorted(points)
        self._owners = [points[p] for p in self._points]

    @staticmethod
    def _hash(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")

    def cluster_for(self, asset: str) -> str:
        idx = bisect_right(self._points, self._hash(asset))
        return self._owners[idx if idx < len(self._points) else 0]

    def shares(self) -> dict[str, float]:
        # A key goes to the first point above it, so each point owns the arc that
        # ends at it (from the previous point, exclusive); the first point also owns
        # the wrap-around arc above the last point.
        owned: dict[str, int] = dict.fromkeys(sorted(set(self._owners)), 0)
        previous = self._points[-1] - _RING_SPACE
        for point, owner in zip(self._points, self._owners, strict=True):
            owned[owner] += point - previous
            previous = point
        return {name: span / _RING_SPACE for name, span in owned.items()}


class CachedRing:
    """A ring with a bounded cache in front: the same asset sends many messages.

    Two generations: when the young one fills up, it becomes the old one and the
    previous old one is dropped; a hit in the old generation is promoted. O(1) on
    every path and never more than ``2 * size`` entries.
    """

    def __init__(self, ring: Ring, size: int = DEFAULT_CACHE_SIZE) -> None:
        self.ring = ring
        self._size = max(1, size)
        self._young: dict[str, str] = {}
        self._old: dict[str, str] = {}

    def cluster_for(self, asset: str) -> str:
        cluster = self._young.get(asset)
        if cluster is not None:
            return cluster
        cluster = self._old.get(asset)
        if cluster is None:
            cluster = self.ring.cluster_for(asset)
        if len(self._young) >= self._size:
            self._old = self._young
            self._young = {}
        self._young[asset] = cluster
        return cluster

    def shares(self) -> dict[str, float]:
        return self.ring.shares()


def build_ring(algorithm: str, weights: Mapping[str, float], *, replicas: int = 128) -> Ring:
    """The ring for a routing config: ``rendezvous`` (weighted) or ``openfactory``."""
    if algorithm == "rendezvous":
        return RendezvousRing(weights)
    if algorithm == "openfactory":
        return OpenFactoryRing(weights.keys(), replicas)
    raise ValueError(f"unknown hashing algorithm {algorithm!r}")
