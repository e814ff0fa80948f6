"""Every Prometheus metric, defined once.

Nothing here runs per message: one custom collector reads the plain counters that
the pipeline, the source and each cluster keep (see ``stats.py``) when Prometheus
scrapes. Gauges such as pending counts are therefore sampled at scrape time, with
no timer loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from . import __version__
from .stats import ForwardingStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ClusterView(Protocol):
    name: str
    forwarded: int
    publish_errors: int
    redeliveries: int
    parked: int
    grace_publishes: int
    duplicates: int

    @property
    def stats(self) -> Any: ...  # natsconn.ConnectionStats

    @property
    def connected(self) -> bool: ...

    @property
    def pending_bytes(self) -> int: ...

    @property
    def pending_bytes_limit(self) -> int: ...

    def subscription_pending(self) -> tuple[int, int]: ...


class SourceView(Protocol):
    stalls: int

    @property
    def stats(self) -> Any: ...

    @property
    def connected(self) -> bool: ...

    @property
    def pending_msgs(self) -> int: ...

    @property
    def pending_bytes(self) -> int: ...

    @property
    def pending_bytes_limit(self) -> int: ...

    def lag(self) -> int | None: ...


class ServiceView(Protocol):
    """What the collector reads from the running service."""

    stats: ForwardingStats

    @property
    def algorithm(self) -> str: ...

    @property
    def source(self) -> SourceView: ...

    @property
    def clusters(self) -> Iterable[ClusterView]: ...

    def ring_shares(self) -> Mapping[str, float]: ...

    def topology_counts(self) -> tuple[int, int, int]:
        """(version, changes applied, apply errors) of the live topology."""
        ...


class ForwarderCollector:
    def __init__(self, service: ServiceView) -> None:
        self._service = service

    def describe(self) -> list[Metric]:
        return []  # the metric set depends on the live topology: no up-front description

    def collect(self) -> Iterator[Metric]:
        svc = self._service
        stats = svc.stats
        clusters = list(svc.clusters)
        source = svc.source
        connections: list[tuple[str, Any]] = [
            ("source", source.stats),
            *((c.name, c.stats) for c in clusters),
        ]
        pending = [("source", source.pending_msgs, source.pending_bytes)]
        pending += [(c.name, *c.subscription_pending()) for c in clusters]

        yield _counter("messages_received", "Messages received from the source.", [((), stats.received)])
        yield _counter(
            "messages_forwarded",
            "Messages accepted by the target cluster.",
            [((c.name,), c.forwarded) for c in clusters],
            "cluster",
        )
        yield _counter(
            "publish_errors",
            "Publishes the target cluster could not take.",
            [((c.name,), c.publish_errors) for c in clusters],
            "cluster",
        )
        yield _counter(
            "redeliveries",
            "Source messages negatively acknowledged for redelivery, by target cluster.",
            [((c.name,), c.redeliveries) for c in clusters],
            "cluster",
        )
        yield _counter(
            "duplicates",
            "JetStream targets: redelivered messages the stream already held (dropped by Nats-Msg-Id).",
            [((c.name,), c.duplicates) for c in clusters],
            "cluster",
        )
        yield _counter(
            "messages_parked",
            "Messages stored in the park stream while their cluster was down (JetStream source).",
            [((c.name,), c.parked) for c in clusters],
            "cluster",
        )
        yield _counter(
            "messages_dead_lettered",
            "Messages sent to the dead-letter subject.",
            [((reason,), n) for reason, n in sorted(stats.dead_lettered.items())],
            "reason",
        )
        yield _counter(
            "dead_letter_failures",
            "Dead letters that could not be published.",
            [((), stats.dead_letter_failures)],
        )
        yield _counter(
            "slow_consumer_events",
            "Slow-consumer reports from nats-py.",
            [((label,), st.slow_consumer_events) for label, st in connections],
            "connection",
        )
        yield _counter(
            "slow_consumer_dropped",
            "Messages dropped by nats-py as a slow consumer.",
            [((label,), st.slow_consumer_dropped) for label, st in connections],
            "connection",
        )
        yield _gauge(
            "pending_messages",
            "Received, not yet processed messages of a connection's subscriptions.",
            [((label,), msgs) for label, msgs, _ in pending],
            "connection",
        )
        yield _gauge(
            "pending_bytes",
            "Received, not yet processed bytes of a connection's subscriptions.",
            [((label,), nbytes) for label, _, nbytes in pending],
            "connection",
        )
        yield _gauge(
            "pending_bytes_limit",
            "The source subscription's pending bytes limit (slow-consumer threshold).",
            [(("source",), source.pending_bytes_limit)],
            "connection",
        )
        yield _gauge(
            "cluster_pending_bytes",
            "Outbound buffer of a cluster connection (the reconnect backlog).",
            [((c.name,), c.pending_bytes) for c in clusters],
            "cluster",
        )
        yield _gauge(
            "cluster_pending_bytes_limit",
            "Size of a cluster connection's reconnect buffer.",
            [((c.name,), c.pending_bytes_limit) for c in clusters],
            "cluster",
        )
        yield _gauge(
            "cluster_connected",
            "1 when the cluster connection is up.",
            [((c.name,), int(c.connected)) for c in clusters],
            "cluster",
        )
        yield _counter(
            "cluster_reconnects",
            "Reconnects of a cluster connection.",
            [((c.name,), c.stats.reconnects) for c in clusters],
            "cluster",
        )
        yield _counter(
            "cluster_disconnects",
            "Disconnects of a cluster connection.",
            [((c.name,), c.stats.disconnects) for c in clusters],
            "cluster",
        )
        yield _gauge("source_connected", "1 when the source connection is up.", [((), int(source.connected))])
        # A source server closes a consumer that falls too far behind (its max_pending):
        # the forwarder sees that only as a disconnect, so it must not go unseen.
        yield _counter(
            "source_disconnects", "Disconnects of the source connection.", [((), source.stats.disconnects)]
        )
        yield _counter(
            "source_reconnects", "Reconnects of the source connection.", [((), source.stats.reconnects)]
        )
        stalls = "Source read loops (or consume loops) found dead and restarted."
        yield _counter("source_stalls", stalls, [((), source.stalls)])
        lag = source.lag()
        if lag is not None:
            yield _gauge(
                "source_lag_messages",
                "JetStream: the durable consumer's pending plus ack-pending messages.",
                [((), lag)],
            )
        hist = stats.latency
        latency = HistogramMetricFamily(
            "forwarder_forward_latency_seconds", "From receipt at the source to acceptance by the target."
        )
        latency.add_metric([], hist.cumulative(), sum_value=hist.total)
        yield latency
        version, changes, apply_errors = svc.topology_counts()
        yield _gauge("topology_version", "The topology version routing follows.", [((), version)])
        yield _counter("topology_changes", "Topology versions applied without a restart.", [((), changes)])
        yield _counter(
            "topology_apply_errors",
            "Topology versions that could not be applied (kept the old routing).",
            [((), apply_errors)],
        )
        yield _counter(
            "grace_publishes",
            "Copies of moved assets' messages sent to their old cluster in a grace window.",
            [((c.name,), c.grace_publishes) for c in clusters],
            "cluster",
        )
        yield _gauge(
            "ring_share",
            "Share of the key space each cluster owns.",
            [((name,), share) for name, share in sorted(svc.ring_shares().items())],
            "cluster",
        )
        yield _gauge(
            "build_info",
            "Version and routing algorithm.",
            [((__version__, svc.algorithm), 1)],
            "version",
            "algorithm",
        )


Samples = Iterable[tuple[tuple[str, ...], float]]


def _counter(name: str, doc: str, samples: Samples, *labels: str) -> Metric:
    family = CounterMetricFamily(f"forwarder_{name}", doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


def _gauge(name: str, doc: str, samples: Samples, *labels: str) -> Metric:
    family = GaugeMetricFamily(f"forwarder_{name}", doc, labels=list(labels))
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


class SampledProcessCollector:
    """prometheus_client's process metrics (CPU, memory, open fds), sampled by ``refresh()``.

    Reading them takes about ten file operations in ``/proc``; each releases the GIL,
    and the HTTP thread that serves a scrape then waits up to a switch interval (5 ms)
    to get it back from the busy forwarding loop: tens of milliseconds a scrape. The
    service refreshes the sample once a second on its event loop instead (about 80 us),
    so a scrape only copies it.
    """

    def __init__(self) -> None:
        self._collector = ProcessCollector(registry=None)
        self._sample: list[Metric] = []
        self.refresh()

    def refresh(self) -> None:
        self._sample = list(self._collector.collect())

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return iter(self._sample)


class Metrics:
    """The registry: the forwarder's collector plus the process metrics (CPU, RSS, fds)."""

    def __init__(self, service: ServiceView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ForwarderCollector(service))
        self.process = SampledProcessCollector()
        self.registry.register(self.process)

    def render(self) -> bytes:
        return generate_latest(self.registry)
