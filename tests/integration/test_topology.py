"""Live topology: changes applied through the bucket, seen by every replica, without a restart."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg

from forwarder.embedded import LocalServer, free_port
from forwarder.topology import GRACE_ID_HEADER
from tests.helpers import async_wait_until, wait_until
from tests.integration.harness import ForwarderProcess

pytestmark = pytest.mark.integration

GRACE = 3.0


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args], capture_output=True, text=True, timeout=60
    )


def routes(config: Path, assets: list[str]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "forwarder", "route", "-c", str(config), "--stdin"],
        input="\n".join(assets),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("\t") for line in out.splitlines())


@dataclass
class Arrivals:
    """What each target cluster received: (cluster, asset, id, grace id or None, time)."""

    rows: list[tuple[str, str, str, str | None, float]] = field(default_factory=list)
    conns: list[Client] = field(default_factory=list)

    async def watch(self, name: str, url: str) -> None:
        async def on_msg(msg: Msg) -> None:
            grace = msg.headers.get(GRACE_ID_HEADER) if msg.headers else None
            self.rows.append((name, msg.subject.split(".")[1], msg.data.decode(), grace, time.monotonic()))

        nc = await nats.connect(url)
        await nc.subscribe("assets.>", cb=on_msg, pending_msgs_limit=1_000_000)
        await nc.flush()
        self.conns.append(nc)

    def ids(self) -> set[str]:
        return {r[2] for r in self.rows}

    def clusters_of(self, asset: str, after: float = 0.0) -> set[str]:
        return {r[0] for r in self.rows if r[1] == asset and r[4] >= after}

    async def close(self) -> None:
        for nc in self.conns:
            await nc.close()


@dataclass
class Rig:
    source: LocalServer
    targets: dict[str, LocalServer]
    tmp: Path
    processes: list[ForwarderProcess] = field(default_factory=list)

    def config(
        self, clusters: list[str], name: str = "f", jetstream_source: bool = False, **topology: Any
    ) -> Path:
        doc: dict[str, Any] = {
            "source": {"servers": [self.source.url], "subject": "assets.>"},
            "clusters": {n: {"servers": [self.targets[n].url]} for n in clusters},
            "topology": {"kv_bucket": "topo", "grace": GRACE, "poll_interval": 1} | topology,
            "http": {"host": "127.0.0.1", "port": free_port()},
            "log": {"level": "info"},
        }
        if jetstream_source:
            doc["source"]["jetstream"] = {
                "stream": "ASSETS",
                "durable": "fwd",
                "ack_wait": 2,
                "backoff": [0.2, 0.5],
            }
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def topology_file(
        self, name: str, clusters: dict[str, float], extra: dict[str, str] | None = None
    ) -> Path:
        servers = {n: self.targets[n].url for n in clusters if n in self.targets} | (extra or {})
        doc = {"clusters": {n: {"servers": [servers[n]], "weight": w} for n, w in clusters.items()}}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    def forwarder(self, config: Path, name: str) -> ForwarderProcess:
        proc = ForwarderProcess(config, self.tmp / f"{name}.log").start()
        self.processes.append(proc)
        return proc.wait_ready()


@pytest.fixture
def rig(nats_servers, tmp_path: Path):
    source = nats_servers.server(name="source", jetstream=True)
    targets = {n: nats_servers.server(name=n.lower()) for n in ("C1", "C2", "C3")}
    r = Rig(source, targets, tmp_path)
    yield r
    for proc in r.processes:
        proc.stop()


async def publish_steadily(url: str, assets: int, rate: float, stop: asyncio.Event, log: list[str]) -> None:
    """Core publishes at ``rate``/s over ``assets`` assets until ``stop``; ``log`` gets every id sent."""
    nc = await nats.connect(url)
    try:
        i = 0
        began = time.monotonic()
        while not stop.is_set():
            msg_id = f"m{i:07d}"
            await nc.publish(f"assets.a{i % assets:04d}.v", msg_id.encode())
            log.append(msg_id)
            i += 1
            if i % 20 == 0:
                await nc.flush()
                ahead = i / rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await nc.flush()
    finally:
        await nc.close()


async def test_adding_a_cluster_switches_every_replica_and_loses_nothing(rig):
    # A longer grace window here: messages must flow inside it even when a loaded machine
    # stretches the apply command and the publisher.
    grace = 8.0
    boot = rig.config(["C1", "C2"], "boot", grace=grace)
    replicas = [
        rig.forwarder(boot, "r1"),
        rig.forwarder(rig.config(["C1", "C2"], "boot2", grace=grace), "r2"),
    ]
    arrivals = Arrivals()
    for name, server in rig.targets.items():
        await arrivals.watch(name, server.url)
    assets = [f"a{i:04d}" for i in range(200)]
    before = routes(boot, assets)
    sent: list[str] = []
    stop = asyncio.Event()
    publishing = asyncio.create_task(publish_steadily(rig.source.url, 200, 400, stop, sent))
    try:
        await async_wait_until(lambda: len(sent) > 400, 10)
        result = cli(
            "topology", "apply", "-c", str(boot), str(rig.topology_file("v2", {"C1": 1, "C2": 1, "C3": 1}))
        )
        assert result.returncode == 0, result.stderr
        applied = time.monotonic()
        await async_wait_until(lambda: all(r.metric("forwarder_topology_version") == 2 for r in replicas), 2)
        switched = time.monotonic()
        assert switched - applied < 2.0
        after = routes(boot, assets)  # route follows the bucket: the new topology
        moved = {a for a in assets if before[a] != after[a]}
        assert moved
        assert {after[a] for a in moved} == {"C3"}
        await asyncio.sleep(grace + 1.5)  # past the grace window, as every replica sees it
        grace_over = time.monotonic()
        await async_wait_until(lambda: len(sent) > 0 and sent[-1] in arrivals.ids(), 10)
        stop.set()
        await publishing
        await async_wait_until(lambda: set(sent) <= arrivals.ids(), 10, message="messages lost in the switch")
        for asset in set(assets) - moved:  # never on another cluster
            assert arrivals.clusters_of(asset) == {before[asset]}, asset
        for asset in moved:
            assert arrivals.clusters_of(asset, after=grace_over) <= {"C3"}, asset
        graced = [r for r in arrivals.rows if r[3] is not None]
        both: dict[str, set[str]] = defaultdict(set)
        for cluster, _, _, grace_id, _ in graced:
            both[grace_id].add(cluster)  # type: ignore[index]
        assert graced, "no grace-window copies"
        assert all(len(clusters) == 2 for clusters in both.values())
        assert {a for _, a, _, _, _ in graced} <= moved
        copies = sum(
            r.metric(f'forwarder_grace_publishes_total{{cluster="{c}"}}')
            for r in replicas
            for c in ("C1", "C2")
        )
        assert copies == len(graced) / 2
    finally:
        stop.set()
        await arrivals.close()


async def test_removing_a_cluster_moves_its_assets_and_drain_closes_it(rig):
    nc = await nats.connect(rig.source.url)
    await nc.jetstream().add_stream(name="ASSETS", subjects=["assets.>"])
    boot = rig.config(["C1", "C2", "C3"], "boot", jetstream_source=True)
    fwd = rig.forwarder(boot, "r1")
    arrivals = Arrivals()
    for name, server in rig.targets.items():
        await arrivals.watch(name, server.url)
    js = nc.jetstream()
    try:
        ids = [f"m{i:05d}" for i in range(3000)]
        for i, msg_id in enumerate(ids[:1500]):
            await js.publish(f"assets.a{i % 300:04d}.v", msg_id.encode())
        result = cli("topology", "apply", "-c", str(boot), str(rig.topology_file("v2", {"C1": 1, "C2": 1})))
        assert result.returncode == 0, result.stderr
        for i, msg_id in enumerate(ids[1500:], 1500):
            await js.publish(f"assets.a{i % 300:04d}.v", msg_id.encode())
        await async_wait_until(lambda: set(ids) <= arrivals.ids(), 20, message="lost while removing C3")
        wait_until(lambda: "C3" not in fwd.json("/clusters")["clusters"], 5)
        wait_until(lambda: "C3" not in fwd.json("/clusters")["leaving"], GRACE + 5)
        events = fwd.log_events()
        assert any(e["event"] == "cluster_retired" and e.get("cluster") == "C3" for e in events)
        assert 'forwarder_cluster_connected{cluster="C3"}' not in fwd.metrics()
        late = time.monotonic()
        for i in range(300):
            await js.publish(f"assets.a{i:04d}.v", f"late{i}".encode())
        await async_wait_until(lambda: sum(r[2].startswith("late") for r in arrivals.rows) >= 300, 10)
        assert not [r for r in arrivals.rows if r[0] == "C3" and r[4] >= late]
        assert await_lag_zero(fwd)
    finally:
        await arrivals.close()
        await nc.close()


def await_lag_zero(fwd: ForwarderProcess) -> bool:
    wait_until(lambda: fwd.metric("forwarder_source_lag_messages") == 0, 15, message="messages left unacked")
    return True


async def test_reweighting_follows_route_and_ring_share(rig):
    boot = rig.config(["C1", "C2", "C3"], "boot")
    fwd = rig.forwarder(boot, "r1")
    result = cli(
        "topology", "apply", "-c", str(boot), str(rig.topology_file("v2", {"C1": 3, "C2": 1, "C3": 1}))
    )
    assert result.returncode == 0, result.stderr
    wait_until(lambda: fwd.metric("forwarder_topology_version") == 2, 5)
    assert fwd.metric('forwarder_ring_share{cluster="C1"}') == pytest.approx(0.6)
    assets = [f"a{i:04d}" for i in range(50)]
    expected = routes(boot, assets)
    for asset in assets:
        assert fwd.json(f"/route/{asset}")["cluster"] == expected[asset]
    shown = json.loads(cli("topology", "show", "-c", str(boot), "--json").stdout)
    assert shown["from"] == "bucket topo"
    assert shown["version"] == 2
    assert shown["clusters"]["C1"]["weight"] == 3


async def test_concurrent_applies_one_wins_the_other_gets_a_clear_conflict(rig):
    boot = rig.config(["C1", "C2"], "boot")
    rig.forwarder(boot, "r1")
    from forwarder.topology_store import ConflictError, TopologyStore

    nc = await nats.connect(rig.source.url)
    try:
        store = TopologyStore(nc, "topo")
        current = await store.read()
        assert current is not None
        a = current.topology.with_version(current.topology.version + 1)
        await store.apply(a, current.revision)
        with pytest.raises(ConflictError, match="someone else applied first"):
            await store.apply(a, current.revision)
    finally:
        await nc.close()


async def test_an_unreachable_new_cluster_keeps_the_old_routing_and_says_why(rig, nats_servers):
    boot = rig.config(["C1", "C2"], "boot", apply_timeout=1.5)
    fwd = rig.forwarder(boot, "r1")
    port = free_port()
    ghost = f"nats://127.0.0.1:{port}"
    result = cli(
        "topology",
        "apply",
        "-c",
        str(boot),
        str(rig.topology_file("v2", {"C1": 1, "C2": 1, "C4": 1}, {"C4": ghost})),
    )
    assert result.returncode == 0, result.stderr
    wait_until(lambda: fwd.metric("forwarder_topology_apply_errors_total") >= 1, 10)
    assert fwd.metric("forwarder_topology_version") == 1
    status, body = fwd.get("/readyz")
    assert status == 503
    assert b"C4" in body
    assert b"topology" in body
    # The cluster comes up: the next attempt (the poll, every second) applies the version.
    nats_servers.server(name="c4", port=port)
    wait_until(lambda: fwd.metric("forwarder_topology_version") == 2, 15)
    wait_until(fwd.ready, 5)


def test_cli_errors_are_one_line_and_exit_2(rig, nats_servers, tmp_path):
    boot = rig.config(["C1", "C2"], "boot")
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: {C1: {servers: ['nats://x:1'], weight: -1}}\n")
    missing_bucket = cli("topology", "show", "-c", str(boot))
    assert missing_bucket.returncode == 2
    assert "does not exist" in missing_bucket.stderr
    assert len(missing_bucket.stderr.strip().splitlines()) == 1
    for args in (("plan", str(bad)), ("apply", str(bad))):
        result = cli("topology", args[0], "-c", str(boot), args[1])
        assert result.returncode == 2, result
        assert len(result.stderr.strip().splitlines()) == 1
    plain = nats_servers.server(name="plain")  # no JetStream
    cfg = yaml.safe_load(boot.read_text())
    cfg["source"]["servers"] = [plain.url]
    no_js = tmp_path / "nojs.yaml"
    no_js.write_text(yaml.safe_dump(cfg))
    result = cli("topology", "show", "-c", str(no_js))
    assert result.returncode == 2
    assert "JetStream" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
