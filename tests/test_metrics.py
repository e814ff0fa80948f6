"""The metrics collector against a fake service view, read back through the Prometheus text format.

The collector reads plain counters at scrape time (see forwarder/stats.py): these tests set
known values on fakes of the views it reads, render ``/metrics`` and parse the text with
prometheus_client's own parser, so names, types, labels and values are checked as a
Prometheus server would see them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forwarder import __version__
from forwarder.metrics import CONTENT_TYPE, ForwarderCollector, Metrics
from forwarder.natsconn import ConnectionStats
from forwarder.stats import LATENCY_BUCKETS, ForwardingStats, LatencyHistogram
from tests.test_prometheus_rules import COUNTERS, GAUGES, HISTOGRAMS


@dataclass
class FakeCluster:
    name: str
    forwarded: int = 0
    publish_errors: int = 0
    redeliveries: int = 0
    parked: int = 0
    grace_publishes: int = 0
    duplicates: int = 0
    stats: ConnectionStats = field(default_factory=lambda: ConnectionStats("?"))
    connected: bool = True
    pending_bytes: int = 0
    pending_bytes_limit: int = 8 << 20
    sub_pending: tuple[int, int] = (0, 0)

    def subscription_pending(self) -> tuple[int, int]:
        return self.sub_pending


@dataclass
class FakeSource:
    stalls: int = 0
    stats: ConnectionStats = field(default_factory=lambda: ConnectionStats("source"))
    connected: bool = True
    pending_msgs: int = 0
    pending_bytes: int = 0
    pending_bytes_limit: int = 64 << 20
    lag_value: int | None = None

    def lag(self) -> int | None:
        return self.lag_value


@dataclass
class FakeService:
    source: FakeSource
    clusters: list[FakeCluster]
    stats: ForwardingStats = field(default_factory=ForwardingStats)
    algorithm: str = "rendezvous"
    shares: dict[str, float] = field(default_factory=dict)

    topology: tuple[int, int, int] = (3, 2, 1)  # version, changes applied, apply errors

    def ring_shares(self) -> dict[str, float]:
        return self.shares

    def topology_counts(self) -> tuple[int, int, int]:
        return self.topology


def families(service: Any) -> dict[str, Any]:
    text = Metrics(service).render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    """{sorted label pairs: value} of the samples named ``family.name + suffix``."""
    wanted = family.name + suffix
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == wanted}


def by(label: str, family: Any, suffix: str = "") -> dict[str, float]:
    return {dict(k)[label]: v for k, v in values(family, suffix).items()}


@pytest.fixture
def service() -> FakeService:
    c1 = FakeCluster(
        "C1", forwarded=700, publish_errors=3, redeliveries=5, parked=11, grace_publishes=4, duplicates=6
    )
    c1.stats.reconnects, c1.stats.disconnects = 2, 3
    c1.stats.slow_consumer_events, c1.stats.slow_consumer_dropped = 1, 1
    c1.pending_bytes, c1.sub_pending = 4096, (7, 900)
    c2 = FakeCluster("C2", forwarded=300, connected=False, pending_bytes_limit=1 << 20)
    source = FakeSource(stalls=1, pending_msgs=42, pending_bytes=8400)
    source.stats.slow_consumer_events, source.stats.slow_consumer_dropped = 9, 9
    source.stats.disconnects, source.stats.reconnects = 4, 3
    svc = FakeService(source, [c1, c2], shares={"C1": 0.6, "C2": 0.4})
    svc.stats.received = 1020
    svc.stats.dead_lettered.update({"no_key_token": 15, "too_large": 5})
    svc.stats.dead_letter_failures = 2
    for seconds in (0.00004, 0.00005, 0.0003, 0.002, 0.002, 0.7, 12.0):
        svc.stats.latency.observe(seconds)
    return svc


# ------------------------------------------------------------------ the contract


def test_exactly_the_contract_families_with_their_types(service):
    service.source.lag_value = 0
    fams = {name: f for name, f in families(service).items() if name.startswith("forwarder_")}
    expected = {name.removesuffix("_total"): "counter" for name in COUNTERS}
    expected |= {name: "gauge" for name in GAUGES}
    expected |= {name: "histogram" for name in HISTOGRAMS}
    assert {name: f.type for name, f in fams.items()} == expected


def test_counters_carry_the_per_cluster_values(service):
    fams = families(service)
    for name, attr in [
        ("forwarder_messages_forwarded", "forwarded"),
        ("forwarder_publish_errors", "publish_errors"),
        ("forwarder_redeliveries", "redeliveries"),
        ("forwarder_messages_parked", "parked"),
        ("forwarder_grace_publishes", "grace_publishes"),
        ("forwarder_duplicates", "duplicates"),
    ]:
        assert by("cluster", fams[name], "_total") == {c.name: getattr(c, attr) for c in service.clusters}
    assert by("cluster", fams["forwarder_cluster_reconnects"], "_total") == {"C1": 2, "C2": 0}
    assert by("cluster", fams["forwarder_cluster_disconnects"], "_total") == {"C1": 3, "C2": 0}


def test_received_dead_letters_and_failures(service):
    fams = families(service)
    assert values(fams["forwarder_messages_received"], "_total") == {(): 1020}
    assert by("reason", fams["forwarder_messages_dead_lettered"], "_total") == {
        "no_key_token": 15,
        "too_large": 5,
    }
    assert values(fams["forwarder_dead_letter_failures"], "_total") == {(): 2}
    assert values(fams["forwarder_source_stalls"], "_total") == {(): 1}


def test_slow_consumers_and_pending_per_connection(service):
    fams = families(service)
    assert by("connection", fams["forwarder_slow_consumer_events"], "_total") == {
        "source": 9,
        "C1": 1,
        "C2": 0,
    }
    assert by("connection", fams["forwarder_slow_consumer_dropped"], "_total") == {
        "source": 9,
        "C1": 1,
        "C2": 0,
    }
    assert by("connection", fams["forwarder_pending_messages"]) == {"source": 42, "C1": 7, "C2": 0}
    assert by("connection", fams["forwarder_pending_bytes"]) == {"source": 8400, "C1": 900, "C2": 0}
    assert by("connection", fams["forwarder_pending_bytes_limit"]) == {"source": 64 << 20}


def test_cluster_connection_state_and_reconnect_buffer(service):
    fams = families(service)
    assert by("cluster", fams["forwarder_cluster_connected"]) == {"C1": 1, "C2": 0}
    assert by("cluster", fams["forwarder_cluster_pending_bytes"]) == {"C1": 4096, "C2": 0}
    assert by("cluster", fams["forwarder_cluster_pending_bytes_limit"]) == {"C1": 8 << 20, "C2": 1 << 20}
    assert values(fams["forwarder_source_connected"]) == {(): 1}
    assert values(fams["forwarder_source_disconnects"], "_total") == {(): 4}
    assert values(fams["forwarder_source_reconnects"], "_total") == {(): 3}
    service.source.connected = False
    assert values(families(service)["forwarder_source_connected"]) == {(): 0}


def test_the_values_are_read_at_scrape_time(service):
    metrics = Metrics(service)

    def forwarded() -> dict[str, float]:
        text = metrics.render().decode()
        fam = {f.name: f for f in text_string_to_metric_families(text)}["forwarder_messages_forwarded"]
        return by("cluster", fam, "_total")

    assert forwarded()["C1"] == 700
    service.clusters[0].forwarded += 5
    assert forwarded()["C1"] == 705


def test_source_lag_appears_only_where_there_is_one(service):
    assert "forwarder_source_lag_messages" not in families(service)  # core source
    service.source.lag_value = 1234
    assert values(families(service)["forwarder_source_lag_messages"]) == {(): 1234}


def test_topology_version_changes_and_apply_errors(service):
    fams = families(service)
    assert values(fams["forwarder_topology_version"]) == {(): 3}
    assert values(fams["forwarder_topology_changes"], "_total") == {(): 2}
    assert values(fams["forwarder_topology_apply_errors"], "_total") == {(): 1}


def test_ring_share_and_build_info(service):
    fams = families(service)
    assert by("cluster", fams["forwarder_ring_share"]) == {"C1": 0.6, "C2": 0.4}
    assert values(fams["forwarder_build_info"]) == {
        (("algorithm", "rendezvous"), ("version", __version__)): 1
    }


def test_the_latency_histogram_buckets_count_and_sum(service):
    fam = families(service)["forwarder_forward_latency_seconds"]
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    bounds = [float(le) for le in buckets]
    assert bounds == [*LATENCY_BUCKETS, math.inf]
    assert bounds[0] == 0.00005  # 50 microseconds
    assert bounds[-2] == 10.0
    # observed: 40us, 50us (le is inclusive), 300us, 2ms, 2ms, 0.7s, 12s
    assert buckets["5e-05"] == 2
    assert buckets["0.0005"] == 3
    assert buckets["0.0025"] == 5
    assert buckets["1.0"] == 6
    assert buckets["10.0"] == 6
    assert buckets["+Inf"] == 7
    counts = list(buckets.values())
    assert counts == sorted(counts)  # cumulative
    (count,) = [s.value for s in fam.samples if s.name.endswith("_count")]
    (total,) = [s.value for s in fam.samples if s.name.endswith("_sum")]
    assert count == 7
    assert total == pytest.approx(0.00004 + 0.00005 + 0.0003 + 0.002 + 0.002 + 0.7 + 12.0)


def test_the_process_metrics_are_exposed(service):
    fams = families(service)
    assert "process_cpu_seconds" in fams
    assert "process_resident_memory_bytes" in fams


def test_the_process_metrics_are_a_sample_refreshed_by_the_service(service):
    metrics = Metrics(service)
    before = list(metrics.process.collect())
    assert list(metrics.process.collect()) == before  # a scrape only copies the sample
    sum(range(3_000_000))  # burn some CPU
    metrics.process.refresh()
    cpu = [m for m in metrics.process.collect() if m.name == "process_cpu_seconds"]
    assert cpu
    assert (
        cpu[0].samples[0].value >= next(m for m in before if m.name == "process_cpu_seconds").samples[0].value
    )


def test_the_exposition_has_the_prometheus_content_type():
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_the_collector_describes_nothing_up_front(service):
    assert ForwarderCollector(service).describe() == []


# ------------------------------------------------------------------ LatencyHistogram


def cumulative(hist: LatencyHistogram) -> list[tuple[str, int]]:
    return hist.cumulative()


def test_observe_batch_observes_now_minus_each_stamp():
    hist = LatencyHistogram()
    now = 0.0  # (stamps are perf_counter values; 0 keeps now - t exact)
    stamps = [-0.00003, -0.0001, -0.004, -3.0, -60.0]
    hist.observe_batch(now, stamps)
    assert hist.count == 5
    assert hist.total == pytest.approx(0.00003 + 0.0001 + 0.004 + 3.0 + 60.0)
    cum = dict(cumulative(hist))
    assert cum["5e-05"] == 1
    assert cum["0.0001"] == 2
    assert cum["0.005"] == 3
    assert cum["5.0"] == 4
    assert cum["10.0"] == 4
    assert cum["+Inf"] == 5


def test_observe_batch_equals_observing_one_by_one():
    rng = random.Random(7)
    now = 1_000.0
    stamps = [now - rng.expovariate(1 / 0.003) for _ in range(10_000)]
    one, batch = LatencyHistogram(), LatencyHistogram()
    for t in stamps:
        one.observe(now - t)
    batch.observe_batch(now, stamps)
    assert batch.counts == one.counts
    assert batch.total == pytest.approx(one.total)


def test_observe_batch_of_nothing_changes_nothing():
    hist = LatencyHistogram()
    hist.observe_batch(5.0, [])
    assert (hist.count, hist.total) == (0, 0.0)
    assert [n for _, n in cumulative(hist)] == [0] * (len(LATENCY_BUCKETS) + 1)


def test_a_bucket_bound_is_inclusive():
    hist = LatencyHistogram(bounds=(0.001, 0.01))
    for value in (0.001, 0.0010001, 0.01, 0.02):
        hist.observe(value)
    assert cumulative(hist) == [("0.001", 1), ("0.01", 3), ("+Inf", 4)]


@pytest.mark.parametrize("size", [1, 20, 63, 64, 65, 300, 5000])
def test_observe_batch_equals_one_by_one_at_every_size_and_on_the_bounds(size: int) -> None:
    """Counting equal stamps first and one bucket lookup per distinct stamp must agree with
    observing one by one, also for latencies exactly on a bucket bound and for stamps out
    of order."""
    rng = random.Random(size)
    now = 1_000.0 + rng.random()
    stamps = [
        now - rng.choice([*LATENCY_BUCKETS, rng.random() * 0.01, rng.random() * 30]) for _ in range(size)
    ]
    one, batch = LatencyHistogram(), LatencyHistogram()
    for t in stamps:
        one.observe(now - t)
    batch.observe_batch(now, list(stamps))
    assert batch.counts == one.counts
    assert batch.total == pytest.approx(one.total)
