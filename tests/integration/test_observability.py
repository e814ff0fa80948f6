"""Observability end to end: real nats-server processes, a real forwarder process, its HTTP port.

What ``/metrics``, ``/readyz``, ``/clusters`` and the log say is checked against what really
happened: messages counted by subscribers on the targets, a real slow consumer, a target
server killed and restarted, a JetStream backlog, a real Prometheus scraping the forwarder,
and the response time of every endpoint while the forwarder runs flat out.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.js.api import StreamConfig

from forwarder.embedded import LocalServer
from tests.helpers import async_wait_until, wait_until
from tests.integration.harness import (
    ForwarderProcess,
    TargetCollector,
    asset_name,
    publish_assets,
    write_config,
)
from tests.prometheus_helper import REPO_ROOT, prometheus_factory, wait_for_value

__all__ = ["prometheus_factory"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.integration

ENDPOINTS = ("/metrics", "/healthz", "/readyz", "/clusters", "/route/asset-00042")
RESPONSE_BUDGET = 0.100  # seconds: the "every endpoint answers within 100 ms"


@pytest.fixture
def three_targets(nats_servers) -> tuple[LocalServer, dict[str, LocalServer]]:
    source = nats_servers.server(name="source")
    targets = {name: nats_servers.server(name=name.lower()) for name in ("C1", "C2", "C3")}
    return source, targets


def timed_get(port: int, path: str, timeout: float = 5.0) -> tuple[float, int]:
    """(seconds from connect to the last byte, status) of one GET over a fresh connection."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: forwarder\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    elapsed = time.perf_counter() - started
    return elapsed, int(b"".join(chunks).split(b" ", 2)[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_flood(server: LocalServer, seconds: float) -> subprocess.Popen[bytes]:
    """A separate process publishing as fast as it can (tests/integration/flood.py)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.flood", "127.0.0.1", str(server.port), str(seconds)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_every_endpoint_answers_within_100ms_under_full_forwarding_load(three_targets, forwarder, tmp_path):
    source, targets = three_targets
    config = write_config(
        tmp_path / "f.yaml",
        source.url,
        {name: server.url for name, server in targets.items()},
        log={"level": "info", "format": "json"},
    )
    fwd = forwarder(config).wait_ready()
    flood = start_flood(source, seconds=9)
    try:
        # Load first: the forwarder is busy before the first timed request.
        wait_until(lambda: fwd.metric("forwarder_messages_received_total") > 20_000, 15, interval=0.1)
        received_before = fwd.metric("forwarder_messages_received_total")
        began = time.monotonic()
        timings: dict[str, list[float]] = {path: [] for path in ENDPOINTS}
        unready = 0
        while time.monotonic() - began < 5 and flood.poll() is None:
            for path in ENDPOINTS:
                elapsed, status = timed_get(fwd.port, path)
                # Overloaded, the source server may close the forwarder as a slow consumer:
                # not ready while it reconnects (counted below), but it answers in time.
                unready += path == "/readyz" and status == 503
                assert status == 200 or (path == "/readyz" and status == 503), f"{path}: HTTP {status}"
                timings[path].append(elapsed)
                time.sleep(0.01)  # many requests, but not a benchmark of the HTTP server
        measured_for = time.monotonic() - began
        rate = (fwd.metric("forwarder_messages_received_total") - received_before) / measured_for
        assert flood.poll() is None, "the flood ended before the measurement did"
    finally:
        stop_process(flood)
    # Every time the source server closed the forwarder as a slow consumer shows on /metrics.
    closed_by_server = source.varz()["slow_consumers"]
    wait_until(lambda: fwd.metric("forwarder_source_disconnects_total") == closed_by_server, 10)
    wait_until(lambda: fwd.metric("forwarder_source_reconnects_total") == closed_by_server, 30)

    table = "\n".join(
        f"{path:20} n={len(v):3d} p50={percentile(v, 0.5) * 1e3:6.1f} ms "
        f"p95={percentile(v, 0.95) * 1e3:6.1f} ms max={max(v) * 1e3:6.1f} ms"
        for path, v in timings.items()
    )
    report = (
        f"under {rate:,.0f} msg/s received; the source server closed the forwarder "
        f"{closed_by_server} times as a slow consumer, /readyz said 503 {unready} times:\n{table}"
    )
    (tmp_path / "endpoint-latency.txt").write_text(report + "\n")
    print(report)
    assert rate > 10_000, f"the forwarder was not under load: {report}"
    for path, values in timings.items():
        assert len(values) >= 20, report
        assert percentile(values, 0.95) < RESPONSE_BUDGET, f"{path} too slow {report}"


# ------------------------------------------------------------------ counters against reality


def label(name: str, **labels: str) -> str:
    """A sample key as ``parse_metrics`` prints it: ``name{k="v"}``."""
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}" if labels else name


def family(metrics: dict[str, float], name: str) -> dict[str, float]:
    """{label text: value} of one metric's samples."""
    return {k[len(name) :]: v for k, v in metrics.items() if k == name or k.startswith(name + "{")}


def events(fwd: ForwarderProcess, event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in fwd.log_events()
        if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
    ]


def counted(lines: list[dict[str, Any]]) -> int:
    """Events a rate-limited log reports: each line plus the ones it says it suppressed."""
    return sum(1 + int(line.get("suppressed", 0)) for line in lines)


async def test_counters_equal_what_the_targets_saw_and_every_received_message_is_accounted_for(
    nats_servers, forwarder, tmp_path
):
    source = nats_servers.server(name="source")
    small = nats_servers.server(name="c1", max_payload=2048)  # C1 refuses large messages
    targets = {"C1": small, "C2": nats_servers.server(name="c2"), "C3": nats_servers.server(name="c3")}
    config = write_config(
        tmp_path / "f.yaml",
        source.url,
        {name: server.url for name, server in targets.items()},
        # A subject with two tokens has no token 2 for the template: dead-lettered with its asset.
        routing={"key": {"subject_token": 1}, "subject": "{token[0]}.{asset}.{token[2]}"},
        log={"level": "info", "format": "json"},
    )
    fwd = forwarder(config).wait_ready()
    owned_by_c1 = next(
        a for a in (asset_name(i, 1000) for i in range(1000)) if fwd.json(f"/route/{a}")["cluster"] == "C1"
    )
    collector = TargetCollector()
    nc = await nats_py.connect(source.url)
    dead: list[Any] = []

    async def on_dead(msg: Any) -> None:
        dead.append(msg)

    try:
        await nc.subscribe("forwarder.dead", cb=on_dead)
        await nc.flush()
        for name, server in targets.items():
            await collector.watch(name, [server.url])
        good = await publish_assets(source.url, 3000, 300)
        for i in range(200):
            await nc.publish(f"assets.bad-{i:03d}", b"no third token")
        for _ in range(50):
            await nc.publish(f"assets.{owned_by_c1}.value", b"x" * 4000)
        await nc.flush()
        await collector.wait_count(len(good))
        await async_wait_until(lambda: len(dead) == 250, 20, message=lambda: f"{len(dead)} dead letters")
        await asyncio.sleep(0.3)  # a stray duplicate would show up now
        assert collector.count() == len(good)
    finally:
        await collector.close()
        await nc.close()

    m = fwd.metrics()
    forwarded = {name: m[label("forwarder_messages_forwarded_total", cluster=name)] for name in targets}
    assert forwarded == {name: len(collector.received[name]) for name in targets}
    assert all(forwarded.values()), forwarded
    received = m["forwarder_messages_received_total"]
    dead_lettered = family(m, "forwarder_messages_dead_lettered_total")
    assert dead_lettered == {'{reason="bad_target_subject"}': 200, '{reason="too_large"}': 50}
    assert received == 3250
    assert received == sum(forwarded.values()) + sum(dead_lettered.values())
    assert m["forwarder_forward_latency_seconds_count"] == sum(forwarded.values())
    assert m['forwarder_forward_latency_seconds_bucket{le="+Inf"}'] == sum(forwarded.values())
    assert sum(family(m, "forwarder_publish_errors_total").values()) == 0
    assert m["forwarder_dead_letter_failures_total"] == 0

    # The log: dead letters name subject, asset and (refused by a cluster) the cluster; the
    # rate-limited lines plus what they suppressed count every one, once the service stopped.
    fwd.signal(signal.SIGTERM)
    assert fwd.wait(30) == 0
    bad = events(fwd, "dead_letter", reason="bad_target_subject")
    assert counted(bad) == 200
    assert len(bad) < 10, "a flood of dead letters must not flood the log"
    for line in bad:
        assert line["subject"] == f"assets.{line['asset']}"
        assert line["level"] == "warning"
        assert "timestamp" in line
    large = events(fwd, "dead_letter", reason="too_large")
    assert counted(large) == 50
    assert {(line["cluster"], line["asset"], line["subject"]) for line in large} == {
        ("C1", owned_by_c1, f"assets.{owned_by_c1}.value")
    }


# ------------------------------------------------------------------ a real slow consumer


async def test_a_real_slow_consumer_is_counted_on_metrics_and_logged_rate_limited(
    nats_servers, forwarder, tmp_path
):
    source = nats_servers.server(name="source")
    target = nats_servers.server(name="c1")
    config = write_config(
        tmp_path / "f.yaml",
        source.url,
        {"C1": target.url},
        source={"pending_msgs_limit": 10},
        log={"level": "info", "format": "json"},
    )
    fwd = forwarder(config).wait_ready()
    collector = TargetCollector()
    await collector.watch("C1", [target.url])
    try:
        # One burst: nats-py writes it in one go, the forwarder reads hundreds of messages a
        # turn into a pending queue of 10.
        sent = len(await publish_assets(source.url, 20_000, 500))

        def accounted() -> bool:
            m = fwd.metrics()
            handled = m["forwarder_messages_received_total"]
            return handled + m[label("forwarder_slow_consumer_dropped_total", connection="source")] == sent

        wait_until(accounted, 30, interval=0.1, message=lambda: f"not all {sent} accounted: {fwd.metrics()}")
        m = fwd.metrics()
        events_total = m[label("forwarder_slow_consumer_events_total", connection="source")]
        dropped = m[label("forwarder_slow_consumer_dropped_total", connection="source")]
        assert dropped > 0
        assert events_total > 0
        assert events_total == dropped  # nats-py reports each dropped message once
        assert m[label("forwarder_slow_consumer_events_total", connection="C1")] == 0
        await collector.wait_count(int(m["forwarder_messages_received_total"]))
        assert collector.count() == m["forwarder_messages_received_total"]
        assert m[label("forwarder_messages_forwarded_total", cluster="C1")] == collector.count()
    finally:
        await collector.close()

    # The first report is logged at once; the housekeeping flush reports the rest with
    # suppressed=N once the interval (10 s) has passed, without waiting for another event.
    def reported() -> list[dict[str, Any]]:
        lines = events(fwd, "slow_consumer", connection="source")
        return lines if any("suppressed" in line for line in lines) else []

    lines = wait_until(reported, 20, interval=0.2, message=lambda: fwd.log_tail())
    assert counted(lines) == dropped
    assert len(lines) <= 3
    assert all(line["level"] == "warning" and line["subject"].startswith("assets.") for line in lines)


# ------------------------------------------------------------------ a target cluster dies and comes back


def test_a_killed_cluster_shows_on_metrics_readyz_and_clusters_and_recovers(
    nats_servers, forwarder, tmp_path
):
    source = nats_servers.server(name="source")
    targets = {name: nats_servers.server(name=name.lower()) for name in ("C1", "C2", "C3")}
    config = write_config(
        tmp_path / "f.yaml",
        source.url,
        {name: {"servers": [server.url], "reconnect_time_wait": 0.25} for name, server in targets.items()},
    )
    fwd = forwarder(config).wait_ready()
    connected = label("forwarder_cluster_connected", cluster="C2")
    reconnects = label("forwarder_cluster_reconnects_total", cluster="C2")
    disconnects = label("forwarder_cluster_disconnects_total", cluster="C2")
    before = fwd.metrics()
    assert before[connected] == 1
    assert (before[reconnects], before[disconnects]) == (0, 0)

    targets["C2"].kill()
    wait_until(lambda: fwd.metric(connected) == 0, 10, message="C2 still shown connected")
    status, body = fwd.get("/readyz")
    assert status == 503
    not_ready = json.loads(body)["not_ready"]
    assert set(not_ready) == {"C2"}, not_ready
    assert not_ready["C2"].startswith("not connected")
    state = fwd.json("/clusters")["clusters"]
    assert state["C2"]["connected"] is False
    assert state["C2"]["state"] == "reconnecting"
    assert state["C2"]["server"] is None
    assert state["C1"]["connected"] is True
    assert fwd.get("/healthz")[0] == 200  # alive, only not ready
    m = fwd.metrics()
    assert m[label("forwarder_cluster_connected", cluster="C1")] == 1
    assert m[disconnects] == 1

    targets["C2"].start()
    wait_until(lambda: fwd.metric(connected) == 1, 20, message="C2 not reconnected")
    wait_until(lambda: fwd.get("/readyz")[0] == 200, 10)
    after = fwd.metrics()
    assert after[reconnects] == 1
    assert after[disconnects] == 1
    state = fwd.json("/clusters")["clusters"]["C2"]
    assert (state["connected"], state["state"], state["reconnects"]) == (True, "connected", 1)
    assert state["server"] == targets["C2"].url


# ------------------------------------------------------------------ JetStream: lag and parking


async def add_stream(url: str, name: str, subjects: list[str]) -> None:
    nc = await nats_py.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=name, subjects=subjects))
    finally:
        await nc.close()


async def publish_stream(url: str, count: int) -> None:
    nc = await nats_py.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        acks = [
            await js.publish_async(f"assets.{asset_name(i, 100)}.value", f"m{i}".encode())
            for i in range(count)
        ]
        await asyncio.gather(*acks)
    finally:
        await nc.close()


def jetstream_config(tmp_path: Path, source: LocalServer, target: LocalServer, **jetstream: Any) -> Path:
    return write_config(
        tmp_path / "f.yaml",
        source.url,
        {"C1": {"servers": [target.url], "reconnect_time_wait": 0.25}},
        source={
            "jetstream": {
                "stream": "ASSETS",
                "durable": "fwd",
                "ack_wait": 2,
                "backoff": [0.2, 0.5, 1],
                **jetstream,
            }
        },
        log={"level": "info", "format": "json"},
    )


async def test_jetstream_source_lag_shows_the_backlog_and_drains_to_zero(nats_servers, forwarder, tmp_path):
    source = nats_servers.server(name="source", jetstream=True)
    target = nats_servers.server(name="c1")
    await add_stream(source.url, "ASSETS", ["assets.>"])
    fwd = forwarder(jetstream_config(tmp_path, source, target, park_stream="")).wait_ready()
    lag = "forwarder_source_lag_messages"
    await async_wait_until(lambda: fwd.metric(lag) == 0 and lag in fwd.metrics(), 15)

    target.kill()  # its messages are nak'd and wait in the consumer: the backlog
    await publish_stream(source.url, 2000)
    await async_wait_until(lambda: fwd.metric(lag) == 2000, 20, 0.2, lambda: f"lag {fwd.metric(lag)}")
    assert fwd.metric(label("forwarder_redeliveries_total", cluster="C1")) > 0
    assert fwd.metric(label("forwarder_messages_forwarded_total", cluster="C1")) == 0

    await asyncio.to_thread(target.start)
    await async_wait_until(lambda: fwd.metric(lag) == 0, 30, 0.2, lambda: f"lag {fwd.metric(lag)}")
    assert fwd.metric(label("forwarder_messages_forwarded_total", cluster="C1")) == 2000
    assert target.varz()["in_msgs"] == 2000  # the restarted server got each message once


async def test_jetstream_parked_messages_are_counted_per_cluster_and_replayed(
    nats_servers, forwarder, tmp_path
):
    source = nats_servers.server(name="source", jetstream=True)
    target = nats_servers.server(name="c1")
    await add_stream(source.url, "ASSETS", ["assets.>"])
    fwd = forwarder(jetstream_config(tmp_path, source, target)).wait_ready()
    parked = label("forwarder_messages_parked_total", cluster="C1")
    forwarded = label("forwarder_messages_forwarded_total", cluster="C1")

    target.kill()
    await publish_stream(source.url, 1000)
    await async_wait_until(
        lambda: fwd.metric(parked) == 1000, 20, 0.2, lambda: f"parked {fwd.metric(parked)}"
    )
    # Parked messages are acknowledged: the lag does not show this backlog (the alert does).
    await async_wait_until(lambda: fwd.metric("forwarder_source_lag_messages") == 0, 15)
    assert fwd.metric(forwarded) == 0

    await asyncio.to_thread(target.start)
    await async_wait_until(
        lambda: fwd.metric(forwarded) == 1000, 30, 0.2, lambda: f"forwarded {fwd.metric(forwarded)}"
    )
    assert fwd.metric(parked) == 1000
    lines = events(fwd, "messages_parked", cluster="C1")
    assert lines
    assert all(line["lane"] == "park" for line in lines)


# ------------------------------------------------------------------ a real Prometheus


async def test_a_real_prometheus_scrapes_the_forwarded_count(
    three_targets, forwarder, prometheus_factory, tmp_path
):
    source, targets = three_targets
    config = write_config(
        tmp_path / "f.yaml", source.url, {name: server.url for name, server in targets.items()}
    )
    fwd = forwarder(config).wait_ready()
    sent = len(await publish_assets(source.url, 3000, 300))
    total = "forwarder_messages_forwarded_total"
    await async_wait_until(lambda: sum(family(fwd.metrics(), total).values()) == sent, 20)

    prom = prometheus_factory([f"127.0.0.1:{fwd.port}"])
    query = f'sum({total}{{job="asset-forwarder"}})'
    value = await asyncio.to_thread(wait_for_value, prom.api_url, query, lambda v: v == sent, 60)
    assert value == sent
    per_cluster: dict[str, float] = defaultdict(float)
    for key, v in family(fwd.metrics(), total).items():
        per_cluster[key] = v
    for name in targets:
        series = f'{total}{{job="asset-forwarder",cluster="{name}"}}'
        got = await asyncio.to_thread(wait_for_value, prom.api_url, series, lambda v: v >= 0, 30)
        assert got == per_cluster[f'{{cluster="{name}"}}']
    received = await asyncio.to_thread(
        wait_for_value, prom.api_url, "forwarder_messages_received_total", lambda v: v == sent, 30
    )
    assert received == sent
