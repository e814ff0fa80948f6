"""The forwarding core, end to end: real nats-server processes, a real forwarder process."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import nats
import pytest

from forwarder.embedded import LocalCluster, LocalServer
from tests.helpers import async_wait_until, wait_until
from tests.integration.harness import (
    TargetCollector,
    asset_name,
    asset_of,
    publish_assets,
    write_config,
)

pytestmark = pytest.mark.integration


def route_cli(config: Path, assets: list[str]) -> dict[str, str]:
    """What ``forwarder route --stdin`` says about each asset."""
    out = subprocess.run(
        [sys.executable, "-m", "forwarder", "route", "-c", str(config), "--stdin"],
        input="\n".join(assets).encode(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    return dict(line.split("\t") for line in out.splitlines())


@pytest.fixture
def topology(nats_servers, tmp_path: Path) -> tuple[LocalServer, dict[str, LocalServer | LocalCluster]]:
    source = nats_servers.server(name="source")
    targets: dict[str, LocalServer | LocalCluster] = {
        "C1": nats_servers.server(name="c1"),
        "C2": nats_servers.cluster(name="c2", size=3),
        "C3": nats_servers.server(name="c3"),
    }
    return source, targets


def urls(target: LocalServer | LocalCluster) -> list[str]:
    return target.urls if isinstance(target, LocalCluster) else [target.url]


@pytest.fixture
async def collector(topology):
    """Subscribed to assets.> on every target cluster of ``topology``."""
    c = TargetCollector()
    for name, target in topology[1].items():
        await c.watch(name, urls(target))
    yield c
    await c.close()


async def test_every_asset_lands_on_exactly_the_cluster_route_names_in_order(
    topology, forwarder, collector, tmp_path
):
    source, targets = topology
    config = write_config(tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()})
    fwd = forwarder(config).wait_ready()
    ids = await publish_assets(source.url, 6000, 300)
    await collector.wait_count(len(ids))
    await asyncio.sleep(0.2)  # a late duplicate or stray message would show up now
    assert collector.count() == len(ids)

    landed: dict[str, set[str]] = defaultdict(set)
    order: dict[str, list[int]] = defaultdict(list)
    for cluster, messages in collector.received.items():
        for subject, data in messages:
            landed[asset_of(subject)].add(cluster)
            order[asset_of(subject)].append(int(data[1:]))
    expected = route_cli(config, sorted(landed))
    assert len(landed) == 300
    for asset, clusters in landed.items():
        assert clusters == {expected[asset]}, asset
    for asset, seqs in order.items():
        assert seqs == sorted(seqs), f"order broken for {asset}"
    assert {c for cs in landed.values() for c in cs} == {"C1", "C2", "C3"}
    m = fwd.metrics()
    assert m["forwarder_messages_received_total"] == len(ids)
    for name in targets:
        forwarded = m[f'forwarder_messages_forwarded_total{{cluster="{name}"}}']
        assert forwarded == len(collector.received[name])
    route = fwd.json(f"/route/{next(iter(landed))}")
    assert route["cluster"] == expected[route["asset"]]


async def test_unroutable_messages_are_dead_lettered_and_the_rest_flows(
    topology, forwarder, collector, tmp_path
):
    source, targets = topology
    config = write_config(
        tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()},
        routing={"key": {"header": "Asset-Id"}, "dead_letter_subject": "forwarder.dead"},
    )  # fmt: skip
    fwd = forwarder(config).wait_ready()
    nc = await nats.connect(source.url)
    dead: list[nats.aio.msg.Msg] = []

    async def on_dead(msg: nats.aio.msg.Msg) -> None:
        dead.append(msg)

    await nc.subscribe("forwarder.dead", cb=on_dead)
    try:
        await nc.publish("assets.x.value", b"no header")
        await nc.publish("assets.x.value", b"empty header", headers={"Asset-Id": ""})
        for i in range(100):
            await nc.publish("assets.y.value", b"good", headers={"Asset-Id": f"a{i}"})
        await nc.flush()
        await async_wait_until(lambda: len(dead) == 2 and collector.count() == 100, 10)
        reasons = sorted(m.headers["Forwarder-Error"].split(":")[0] for m in dead)
        assert reasons == ["empty_key", "no_key_header"]
        assert all(m.headers["Forwarder-Subject"] == "assets.x.value" for m in dead)
        assert sorted(m.data for m in dead) == [b"empty header", b"no header"]
        m = fwd.metrics()
        assert m['forwarder_messages_dead_lettered_total{reason="no_key_header"}'] == 1
        assert m['forwarder_messages_dead_lettered_total{reason="empty_key"}'] == 1
    finally:
        await nc.close()


async def test_sigterm_drains_and_exits_zero(topology, forwarder, tmp_path):
    source, targets = topology
    config = write_config(tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()})
    fwd = forwarder(config).wait_ready()
    collector = TargetCollector()
    for name, target in targets.items():
        await collector.watch(name, urls(target))
    try:
        ids = await publish_assets(source.url, 2000, 50)
        await collector.wait_count(len(ids))
        fwd.signal(signal.SIGTERM)
        assert await asyncio.to_thread(fwd.wait, 20) == 0
        events = [e["event"] for e in fwd.log_events()]
        assert "forwarder_stopping" in events
        assert "forwarder_stopped" in events
        assert "shutdown_step_timed_out" not in events
    finally:
        await collector.close()


async def test_a_dead_node_of_the_target_cluster_fails_over(topology, forwarder, tmp_path):
    source, targets = topology
    c2 = targets["C2"]
    assert isinstance(c2, LocalCluster)
    config = write_config(
        tmp_path / "f.yaml", source.url,
        {"C2": {"servers": c2.urls, "reconnect_time_wait": 0.2}, "C1": urls(targets["C1"])},
    )  # fmt: skip
    fwd = forwarder(config).wait_ready()
    server = fwd.json("/clusters")["clusters"]["C2"]["server"]
    victim = next(node for node in c2.nodes if node.url == server)
    survivor = next(node for node in c2.nodes if node is not victim)
    collector = TargetCollector()
    await collector.watch("C2", [survivor.url])
    try:
        await publish_assets(source.url, 1000, 100)
        await async_wait_until(lambda: fwd.metric("forwarder_messages_received_total") >= 1000, 10)
        victim.kill()
        wait_until(
            lambda: fwd.json("/clusters")["clusters"]["C2"]["server"] not in (None, server), 15,
            message="C2 did not fail over",
        )  # fmt: skip
        assert fwd.json("/clusters")["clusters"]["C2"]["reconnects"] >= 1
        # After the failover, every message routed to C2 arrives through the surviving nodes.
        after = await publish_assets(source.url, 1000, 100, start=1000)
        owner = route_cli(config, [asset_name(i, 100) for i in range(100)])
        expected = {m for i, m in enumerate(after, 1000) if owner[asset_name(i, 100)] == "C2"}
        assert expected

        def arrived() -> set[str]:
            return {data.decode() for _, data in collector.received["C2"]} & expected

        await async_wait_until(lambda: arrived() == expected, 15, message="C2 lost messages after failover")
        assert fwd.ready()
    finally:
        await collector.close()


def test_demo_runs_to_completion_from_any_directory(tmp_path):
    """The demo's config is package data: a newcomer need not stand in a checkout."""
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "demo", "--messages", "3000", "--rate", "3000"],
        cwd=tmp_path, capture_output=True, timeout=120,
    )  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "result: OK" in out
    for name in ("C1", "C2", "C3"):
        assert f"  {name} " in out


def test_the_demo_takes_one_stop_request_delivered_twice_as_one():
    """`timeout make demo` signals the process group and make passes the signal on: two SIGTERMs
    within milliseconds are one request (a clean stop and a summary), not "again to force"."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "demo", "--rate", "2000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # until the forwarder is up
            if line.startswith("demo: forwarder ready"):
                break
        demo.send_signal(signal.SIGTERM)
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode == 0, out + err
    assert "result: OK" in out
    assert "forced_exit" not in err
    assert "shutdown_step_timed_out" not in err
