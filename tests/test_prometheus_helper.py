"""The Prometheus test helper against a real Prometheus that scrapes itself."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest

from tests.prometheus_helper import (
    REPO_ROOT,
    NoData,
    PrometheusServer,
    QueryError,
    free_port,
    prometheus_factory,
    query,
    require_prometheus_binaries,
    running_prometheus,
    wait_for_value,
)

__all__ = ["prometheus_factory"]  # the fixture, re-exported for pytest

Factory = Callable[..., PrometheusServer]
RULES = REPO_ROOT / "deploy" / "prometheus" / "rules.yml"


@pytest.fixture(scope="module")
def self_scraping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """One server for the module (its first scrape takes ~5 s: discovery batches updates)."""
    require_prometheus_binaries()
    port = free_port()
    workdir = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(
        [f"127.0.0.1:{port}"], workdir, job="self", port=port, rule_files=[RULES]
    ) as prom:
        yield prom


def test_prometheus_scrapes_itself_and_query_returns_up(self_scraping: PrometheusServer) -> None:
    prom = self_scraping
    assert prom.api_url == f"http://127.0.0.1:{prom.port}"
    assert wait_for_value(prom.api_url, 'up{job="self"}', lambda v: v == 1.0, timeout=30) == 1.0
    # The scrape really went through: its own metrics are stored under the job.
    assert query(prom.api_url, 'count(prometheus_build_info{job="self"})') == 1.0
    assert query(prom.api_url, "scalar(vector(2.5))") == 2.5
    # It scrapes every second: the sample count grows within a few seconds.
    first = query(prom.api_url, 'count_over_time(up{job="self"}[1m])')
    wait_for_value(prom.api_url, 'count_over_time(up{job="self"}[1m])', lambda v: v >= first + 2, timeout=15)


def test_query_errors_are_explicit(self_scraping: PrometheusServer) -> None:
    api = self_scraping.api_url
    with pytest.raises(NoData, match="empty result"):
        query(api, 'up{job="no-such-job"}')
    with pytest.raises(QueryError, match="bad_data"):
        query(api, "sum(")
    two = 'label_replace(vector(1), "a", "x", "", "") or label_replace(vector(1), "a", "y", "", "")'
    with pytest.raises(QueryError, match="2 series"):
        query(api, two)
    with pytest.raises(TimeoutError, match="no-such-job"):
        wait_for_value(api, 'up{job="no-such-job"}', timeout=0.5)


def test_the_alert_rules_load_and_evaluate_in_a_real_server(self_scraping: PrometheusServer) -> None:
    # Scraping only itself, no asset-forwarder job exists: the absent() branch of
    # ForwarderAllReplicasDown becomes pending (for: 2m), which shows the rule file was
    # loaded and is evaluated every second.
    value = wait_for_value(
        self_scraping.api_url,
        'ALERTS{alertname="ForwarderAllReplicasDown", alertstate="pending", job="asset-forwarder"}',
        timeout=30,
    )
    assert value == 1.0


def test_the_fixture_starts_servers_and_stops_them_by_pid(prometheus_factory: Factory) -> None:
    prom = prometheus_factory(["127.0.0.1:1"])
    assert prom.running()
    assert (prom.workdir / "data").is_dir(), "storage lives in the test's tmp dir"
    assert "job_name: asset-forwarder" in (prom.workdir / "prometheus.yml").read_text()
    assert "scrape_interval: 1s" in (prom.workdir / "prometheus.yml").read_text()
    prom.stop()
    assert not prom.running()
    with pytest.raises(ProcessLookupError):
        os.kill(prom.pid, 0)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", prom.port)) != 0, "nothing listens on the port any more"


def test_a_port_in_use_is_reported_with_the_log(prometheus_factory: Factory) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match="address already in use"):
            prometheus_factory(["127.0.0.1:1"], port=port)
