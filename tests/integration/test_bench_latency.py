"""The bench's latency probe against a real server: it sees what it subscribed to, and the kernel's
receive time it reports is a monotonic time between the send and the probe's own reading."""

from __future__ import annotations

import time

from bench.latency import HopPairs, Subscriber, summary
from bench.load import RawPublisher, Traffic
from forwarder.embedded import LocalServer


def test_the_probe_times_each_message_it_subscribed_to_from_send_to_socket_arrival(
    target_server: LocalServer,
) -> None:
    traffic = Traffic(assets=20, payload_size=256)
    listened = traffic.probe_assets(5)  # 4 of the 20 assets
    arrivals: list[int] = []
    seen: list[int] = []
    probe = Subscriber(target_server.url, [f"assets.{a}.>" for a in listened], arrivals, seen)
    pub = RawPublisher(target_server.url)
    try:
        sent_at = time.monotonic_ns()
        pub.send(traffic.stamped(0, len(traffic.order), sent_at))  # every subject of every asset once
        pub.flush()
        expected = sum(1 for s in traffic.subjects if s.split(".")[1] in listened)
        assert 0 < expected < len(traffic.order)
        deadline = time.monotonic() + 10
        while len(arrivals) < expected and time.monotonic() < deadline:
            probe.read()
        read_at = time.monotonic_ns()
        probe.read()  # nothing more: the other assets' messages were never sent to us
    finally:
        pub.close()
        probe.sock.close()
    assert len(arrivals) == len(seen) == expected
    slack = 1_000_000  # the clock conversion is good to microseconds; 1 ms is plenty
    for arrived, app in zip(arrivals, seen, strict=True):
        assert -slack < arrived <= app + slack  # the socket had it before the probe's code did
        assert app <= read_at - sent_at
    report = summary(arrivals) | summary(seen, "app_")
    assert report["count"] == report["app_count"] == expected
    assert 0 <= report["p50_ms"] <= report["p99_ms"] <= report["max_ms"] < 10_000


def test_percentiles_pick_the_nearest_rank_and_say_nan_for_nothing() -> None:
    report = summary([i * 1_000_000 for i in range(1, 101)])  # 1..100 ms
    assert report["count"] == 100
    assert report["p50_ms"] == 51.0  # round(0.5 * 99) = 50: the 51st value
    assert report["p99_ms"] == 99.0
    assert report["max_ms"] == 100.0
    empty = summary([], "source_")
    assert empty["source_count"] == 0
    assert empty["source_p99_ms"] != empty["source_p99_ms"]  # NaN


def test_hop_pairs_meet_each_message_s_two_arrivals_in_either_order_and_forget_them() -> None:
    pairs = HopPairs()
    pairs.at_source((b"assets.a.x", 1), 100)
    pairs.at_target((b"assets.b.x", 1), 150)  # its source arrival is read later
    pairs.at_target((b"assets.a.x", 1), 130)
    pairs.at_source((b"assets.b.x", 1), 160)  # the relay's write came in first: negative
    pairs.at_target((b"assets.a.x", 2), 500)  # never seen on the source: no hop
    assert pairs.hops == [30, -10]
    pairs.at_source((b"assets.a.x", 1), 900)  # met already: waits anew, no second hop
    assert pairs.hops == [30, -10]
