"""Hot-path accounting: plain integers and a bucket array, read by the metrics collector.

Incrementing a Python int attribute costs a few tens of nanoseconds; a
prometheus_client ``Counter.inc()`` takes a lock. The collector in ``metrics.py``
turns these into Prometheus metrics at scrape time, so every message is counted
and every latency observed without the per-message cost of the client library.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Mapping

# FORWARDER_ACCOUNTING=off, read once at start-up, is the benchmark's switch to measure
# what the per-message accounting costs: no receipt stamp (one clock read a message) and
# a latency histogram that observes nothing. The plain integer counters stay (a few
# tens of nanoseconds each; removing them would need a second copy of the hot path).
# Never set it in production: the latency histogram stays empty.
ACCOUNTING_ENV = "FORWARDER_ACCOUNTING"


def accounting_enabled(env: Mapping[str, str] = os.environ) -> bool:
    return env.get(ACCOUNTING_ENV, "on").strip().lower() != "off"


# Forward latency buckets: 50 microseconds to 10 seconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class LatencyHistogram:
    """A Prometheus-style histogram (``le`` buckets, sum, count) without locks."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    def observe_batch(self, now: float, stamps: list[float]) -> None:
        """Observe ``now - t`` for every receipt stamp ``t`` of a batch handled by ``now``.

        Messages parsed from one socket read share their stamp, so a batch holds a few
        distinct stamps: counted in C, then one bucket lookup per distinct stamp.
        """
        counts, bounds = self.counts, self.bounds
        total = 0.0
        for t, n in Counter(stamps).items():
            latency = now - t
            counts[bisect_left(bounds, latency)] += n
            total += latency * n
        self.total += total

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, +Inf last, as Prometheus exposes them.

        Reads a copy of the counts (one C-level operation): the HTTP thread calls this
        while the event loop keeps observing.
        """
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts[:], strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class NullLatencyHistogram(LatencyHistogram):
    """Observes nothing (``FORWARDER_ACCOUNTING=off``)."""

    __slots__ = ()

    def observe(self, seconds: float) -> None:
        pass

    def observe_batch(self, now: float, stamps: list[float]) -> None:
        pass


class ForwardingStats:
    """What the pipeline counts. Per-cluster counts live on each ``NatsCluster``."""

    def __init__(self) -> None:
        self.received = 0
        self.dead_lettered: defaultdict[str, int] = defaultdict(int)
        self.dead_letter_failures = 0  # dead letters that could not be published either
        self.latency = LatencyHistogram()
