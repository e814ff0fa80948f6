"""Observability end to end: real nats-server processes, a real forwarder process, its HTTP port.

What ``/metrics``, ``/readyz``, ``/clusters`` and the log say is checked against what really
happened: messages counted by subscribers on the targets, a real slow consumer, a target
server killed and restarted, a JetStream backlog, a real Prometheus scraping the forwarder,
and the response time of every endpoint while the forwarder runs flat out.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from forwarder.embedded import LocalServer
from tests.helpers import wait_until
from tests.integration.harness import ForwarderProcess, write_config
from tests.prometheus_helper import REPO_ROOT

pytestmark = pytest.mark.integration

ENDPOINTS = ("/metrics", "/healthz", "/readyz", "/clusters", "/route/asset-00042")
RESPONSE_BUDGET = 0.100  # seconds: the "every endpoint answers within 100 ms"


@pytest.fixture
def forwarder(tmp_path: Path):
    """Start ``forwarder run`` processes; every one is stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[ForwarderProcess] = []

    def start(config: Path, name: str = "fwd") -> ForwarderProcess:
        proc = ForwarderProcess(config, tmp_path / f"{name}.log").start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


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
        while time.monotonic() - began < 5 and flood.poll() is None:
            for path in ENDPOINTS:
                elapsed, status = timed_get(fwd.port, path)
                assert status == 200, f"{path}: HTTP {status}"
                timings[path].append(elapsed)
                time.sleep(0.01)  # many requests, but not a benchmark of the HTTP server
        measured_for = time.monotonic() - began
        rate = (fwd.metric("forwarder_messages_received_total") - received_before) / measured_for
        assert flood.poll() is None, "the flood ended before the measurement did"
    finally:
        stop_process(flood)

    table = "\n".join(
        f"{path:20} n={len(v):3d} p50={percentile(v, 0.5) * 1e3:6.1f} ms "
        f"p95={percentile(v, 0.95) * 1e3:6.1f} ms max={max(v) * 1e3:6.1f} ms"
        for path, v in timings.items()
    )
    report = f"under {rate:,.0f} msg/s received:\n{table}"
    (tmp_path / "endpoint-latency.txt").write_text(report + "\n")
    print(report)
    assert rate > 10_000, f"the forwarder was not under load: {report}"
    for path, values in timings.items():
        assert len(values) >= 20, report
        assert percentile(values, 0.95) < RESPONSE_BUDGET, f"{path} too slow {report}"
