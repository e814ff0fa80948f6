"""The asset client against real nats-server processes (and a real forwarder process where it says so)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import nats as nats_py
import pytest
import yaml

from forwarder.client import AssetClient, AssetClientError
from forwarder.client_sync import SyncAssetClient
from forwarder.config import load_config
from forwarder.embedded import free_port
from forwarder.topology import Topology
from forwarder.topology_store import TopologyStore
from tests.helpers import async_wait_until, wait_until
from tests.integration.client_support import (
    Received,
    SimulatedForwarder,
    client_connections,
    close_all,
    connect_all,
    urls,
)
from tests.integration.harness import write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def three(nats_servers):
    """A source with JetStream (for the topology bucket) and three target clusters, one of them 3 nodes."""
    source = nats_servers.server(name="source", jetstream=True)
    targets = {
        "C1": nats_servers.server(name="c1"),
        "C2": nats_servers.cluster(name="c2", size=3),
        "C3": nats_servers.server(name="c3"),
    }
    return source, targets


def assets(n: int, prefix: str = "asset") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


# --------------------------------------------------------------------------- through a forwarder


async def test_100_assets_receive_exactly_their_messages_through_a_forwarder(three, forwarder, tmp_path):
    source, targets = three
    config = write_config(tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()})
    forwarder(config).wait_ready()
    wanted = assets(100)
    others = assets(50, prefix="other")  # published too, subscribed by nobody
    got = Received()
    async with AssetClient.from_config(config) as client:
        for asset in wanted:
            assert await client.subscribe(asset, cb=got) == f"assets.{asset}.>"
        # One shared connection per cluster, opened because some asset lives there.
        needed = {client.cluster_for(a) for a in wanted}
        assert needed == {"C1", "C2", "C3"}
        assert client.connected_clusters() == sorted(needed)

        nc = await nats_py.connect(source.url)
        expected: dict[str, list[str]] = {a: [] for a in wanted}
        for i in range(20):
            for asset in [*wanted, *others]:
                payload = f"{asset}:{i}"
                await nc.publish(f"assets.{asset}.value", payload.encode())
                if asset in expected:
                    expected[asset].append(payload)
        await nc.publish("assets.asset-0001", b"no token after the asset: not matched by assets.<asset>.>")
        await nc.flush()
        await nc.close()

        total = sum(len(v) for v in expected.values())
        await async_wait_until(
            lambda: got.count() >= total, 20, message=lambda: f"got {got.count()} of {total}"
        )
        await asyncio.sleep(0.3)  # a stray or duplicate message would arrive now
        assert got.count() == total
        for asset in wanted:
            assert got.payloads(asset) == expected[asset], asset
            assert {m.cluster for m in got.by_asset[asset]} == {client.cluster_for(asset)}
        stats = client.stats()
        assert stats["delivered"] == total
        assert stats["duplicates_dropped"] == 0
        for name in needed:
            assert len(client_connections(targets[name])) == 1, name
    # The servers see the closed sockets a moment later: poll /connz, with a deadline.
    for target in targets.values():
        await async_wait_until(lambda t=target: client_connections(t) == [], 5)


async def test_from_forwarder_url_looks_up_routes_and_reads_there(three, forwarder, tmp_path):
    source, targets = three
    config = write_config(tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()})
    fwd = forwarder(config).wait_ready()
    got = Received()
    by_ring = AssetClient.from_config(config)
    client = AssetClient.from_forwarder_url(f"http://127.0.0.1:{fwd.port}", source_subject="assets.>")
    async with client:
        with pytest.raises(AssetClientError, match="not looked up yet"):
            client.cluster_for("pump-1")
        for asset in ("pump-1", "pump-2", "pump-3"):
            await client.subscribe(asset, cb=got)
            assert client.cluster_for(asset) == by_ring.cluster_for(asset)
        nc = await nats_py.connect(source.url)
        for i in range(10):
            for asset in ("pump-1", "pump-2", "pump-3", "pump-4"):
                await nc.publish(f"assets.{asset}.t", str(i).encode())
        await nc.close()
        await async_wait_until(lambda: got.count() >= 30, 10)
        await asyncio.sleep(0.2)  # a stray or duplicate message would arrive now
        assert got.count() == 30
        assert all(got.payloads(a) == [str(i) for i in range(10)] for a in ("pump-1", "pump-2", "pump-3"))
        assert client.stats()["mode"] == "http"


async def test_cluster_auth_comes_from_the_config_block_by_cluster_name(nats_servers, tmp_path, monkeypatch):
    source = nats_servers.server(name="source")
    locked = nats_servers.server(
        name="locked", extra_config='authorization { user: "reader", password: "s3cr$t" }'
    )
    config = write_config(
        tmp_path / "f.yaml", source.url,
        {"C1": {"servers": [locked.url], "auth": {"user": "reader", "password": "${READER_PASSWORD}"}}},
    )  # fmt: skip
    monkeypatch.setenv("READER_PASSWORD", "s3cr$t")
    got = Received()
    async with AssetClient.from_config(config) as client:
        await client.subscribe("pump-1", cb=got)
        nc = await nats_py.connect(locked.url, user="reader", password="s3cr$t")
        await nc.publish("assets.pump-1.t", b"1")
        await nc.close()
        await async_wait_until(lambda: got.count() == 1, 10)
    # Several attempts within connect_wait: an attempt that reads the server's reset before its
    # -ERR cannot tell why; one that reads the -ERR can, and its reason is kept.
    bad = write_config(
        tmp_path / "bad.yaml", source.url,
        {"C1": {"servers": [locked.url], "auth": {"user": "reader", "password": "wrong"},
                "reconnect_time_wait": 0.2}},
    )  # fmt: skip
    async with AssetClient.from_config(bad, connect_wait=3) as client:
        with pytest.raises(AssetClientError, match=r"cluster C1: cannot connect .*authorization") as info:
            await client.subscribe("pump-1", cb=got)
        assert "wrong" not in str(info.value)
        assert client.connected_clusters() == []


# --------------------------------------------------------------------------- following moves


@pytest.mark.parametrize(
    "switch_after",
    [
        pytest.param(0.3, id="forwarder-switches-with-the-client"),
        # Later than the client's window (grace + margin): a replica that failed to apply at first.
        pytest.param(4.0, id="forwarder-switches-late"),
    ],
)
async def test_a_move_is_followed_without_loss_duplicate_or_reordering(nats_servers, tmp_path, switch_after):
    """The forwarder's side is simulated: before the switch every message goes to the old cluster;
    for ``grace`` seconds after it, a moved asset's messages go to both clusters with the same
    Forwarder-Grace-Id; then to the new cluster only. The topology change is real (a KV bucket)."""
    source = nats_servers.server(name="source", jetstream=True)
    targets = {name: nats_servers.server(name=name.lower()) for name in ("C1", "C2", "C3")}
    grace = 1.5
    config = write_config(
        tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()},
        topology={"kv_bucket": "topo", "grace": grace, "poll_interval": 1},
    )  # fmt: skip
    file_topology = Topology.from_settings(load_config(config))
    old = Topology.from_mapping({**file_topology.to_mapping(), "clusters": {
        n: s for n, s in file_topology.to_mapping()["clusters"].items() if n != "C3"}})  # fmt: skip
    new = Topology.from_mapping({**file_topology.to_mapping(), "version": 2, "clusters": {
        n: s for n, s in file_topology.to_mapping()["clusters"].items() if n != "C1"}})  # fmt: skip
    wanted = assets(60)
    moving = [a for a in wanted if old.cluster_for(a) != new.cluster_for(a)]
    assert {old.cluster_for(a) for a in moving} == {"C1", "C2"}  # removal and addition both move some

    admin = await nats_py.connect(source.url)
    store = TopologyStore(admin, "topo")
    stored, wrote = await store.bootstrap(old)
    assert wrote
    conns = await connect_all(targets)
    # The path to C1 (which every asset leaves) is slow: a copy there arrives ~0.1 s after later
    # messages sent to C2 and C3, so "deliver whichever copy comes first" would reorder messages.
    fwd = SimulatedForwarder(old, new, conns, grace, lag={"C1": 0.1})
    got = Received()
    try:
        async with AssetClient.from_config(config, move_margin=1.0) as client:
            assert client.topology == old  # the bucket wins over the file
            for asset in wanted:
                await client.subscribe(asset, cb=got)
            assert client.connected_clusters() == ["C1", "C2"]

            stop = asyncio.Event()
            seq = 0

            async def produce() -> None:
                nonlocal seq
                while not stop.is_set():
                    for asset in wanted:
                        await fwd.publish(asset, f"{asset}:{seq}")
                    seq += 1
                    await asyncio.sleep(0.005)

            producer = asyncio.create_task(produce())
            await asyncio.sleep(0.5)
            await store.apply(new, stored.revision)
            await async_wait_until(lambda: client.topology == new, 5)
            await asyncio.sleep(switch_after)  # replicas switch a moment after the apply
            fwd.switch()
            await asyncio.sleep(grace + 1.0)  # past the grace window: new clusters only
            stop.set()
            await producer
            await fwd.flush()

            published = sum(len(v) for v in fwd.published.values())
            assert fwd.double_published > 100
            await async_wait_until(
                lambda: got.count() >= published, 15, message=lambda: f"got {got.count()} of {published}"
            )
            await async_wait_until(lambda: client.connected_clusters() == ["C2", "C3"], 10)
            # The server notices the closed C1 socket in its own time: polled, not a fixed pause.
            await async_wait_until(
                lambda: client_connections(targets["C1"]) == [], 5, message="C1 still lists the client"
            )
            await asyncio.sleep(0.3)  # a stray or duplicate message would arrive now
            for asset in wanted:
                assert got.payloads(asset) == fwd.published[asset], asset
            assert got.count() == published
            for asset in moving:
                assert got.by_asset[asset][-1].cluster == new.cluster_for(asset)
            stats = client.stats()
            assert stats["moves_completed"] == len(moving)
            # Each double publish whose two copies both reached the client cost one dropped copy (copies
            # sent to the new cluster before the client subscribed there never reached it).
            assert 0 < stats["duplicates_dropped"] <= fwd.double_published
            assert stats["delivered"] == published
            assert stats["held_back"] == 0
            if switch_after > client.window:
                assert stats["retirements_postponed"] >= len(
                    moving
                )  # the old cluster was kept until the switch
            assert client.subscriptions() == {a: new.cluster_for(a) for a in wanted}
            assert len(client_connections(targets["C2"])) == 1
            assert len(client_connections(targets["C3"])) == 1
    finally:
        await fwd.close()
        await close_all([*conns.values(), admin])


async def test_a_new_cluster_not_reachable_yet_is_retried_while_the_old_one_delivers(nats_servers, tmp_path):
    source = nats_servers.server(name="source", jetstream=True)
    targets = {name: nats_servers.server(name=name.lower()) for name in ("C1", "C2")}
    late = nats_servers.server(name="c3")
    late.stop()  # the topology names it before it runs
    config = write_config(
        tmp_path / "f.yaml", source.url, {"C1": urls(targets["C1"]), "C2": urls(targets["C2"])},
        topology={"kv_bucket": "topo", "grace": 0.5, "poll_interval": 1},
    )  # fmt: skip
    old = Topology.from_settings(load_config(config))
    new = Topology.from_mapping(
        {
            **old.to_mapping(),
            "version": 2,
            "clusters": {**old.to_mapping()["clusters"], "C3": {"servers": [late.url]}},
        }
    )
    wanted = assets(30)
    moving = [a for a in wanted if new.cluster_for(a) == "C3"]
    assert moving
    admin = await nats_py.connect(source.url)
    conns = await connect_all(targets)
    got = Received()
    try:
        store = TopologyStore(admin, "topo")
        await store.bootstrap(old)
        async with AssetClient.from_config(config, move_margin=0.5, connect_wait=1.0) as client:
            for asset in wanted:
                await client.subscribe(asset, cb=got)
            stored = await store.read()
            assert stored is not None
            await store.apply(new, stored.revision)
            await async_wait_until(lambda: client.topology == new, 5)
            await asyncio.sleep(1.5)  # a few failed attempts on C3
            assert client.stats()["moves_started"] == 0
            for asset in moving:  # the old cluster still delivers (the forwarder keeps the old routing too)
                await conns[old.cluster_for(asset)].publish(f"assets.{asset}.value", b"before")
                await conns[old.cluster_for(asset)].flush()
            await async_wait_until(lambda: all(got.payloads(a) == ["before"] for a in moving), 5)

            late.start()
            await async_wait_until(lambda: client.stats()["moves_completed"] == len(moving), 15)
            assert client.subscriptions() == {a: new.cluster_for(a) for a in wanted}
            c3 = await nats_py.connect(late.url)
            for asset in moving:
                await c3.publish(f"assets.{asset}.value", b"after")
            await c3.close()
            await async_wait_until(lambda: all(got.payloads(a) == ["before", "after"] for a in moving), 5)
            assert len(client_connections(late)) == 1
    finally:
        await close_all([*conns.values(), admin])


async def test_moves_during_a_live_topology_change_with_a_running_forwarder(three, forwarder, tmp_path):
    """Issue 10's end-to-end test: 100 assets, a real forwarder, ``TopologyStore.apply`` adding C3
    and removing C1; the application sees every message once, in order, and ends up connected only
    to the clusters it needs."""
    source, targets = three
    grace = 3.0
    config = write_config(
        tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()},
        topology={"kv_bucket": "topo", "grace": grace, "poll_interval": 1},
    )  # fmt: skip
    file_topology = Topology.from_settings(load_config(config))
    doc = file_topology.to_mapping()
    old = Topology.from_mapping({**doc, "clusters": {n: s for n, s in doc["clusters"].items() if n != "C3"}})
    new = Topology.from_mapping(
        {**doc, "version": 2, "clusters": {n: s for n, s in doc["clusters"].items() if n != "C1"}}
    )
    admin = await nats_py.connect(source.url)
    store = TopologyStore(admin, "topo")
    stored, _ = await store.bootstrap(old)  # the bucket wins: the forwarder starts on C1 and C2
    forwarder(config).wait_ready()
    wanted = assets(100)
    got = Received()
    published: dict[str, list[str]] = {a: [] for a in wanted}
    try:
        async with AssetClient.from_config(config, move_margin=3.0) as client:
            for asset in wanted:
                await client.subscribe(asset, cb=got)
            assert client.connected_clusters() == ["C1", "C2"]
            stop = asyncio.Event()

            async def produce() -> None:
                seq = 0
                while not stop.is_set():
                    for asset in wanted:
                        payload = f"{asset}:{seq}"
                        await admin.publish(f"assets.{asset}.value", payload.encode())
                        published[asset].append(payload)
                    seq += 1
                    await asyncio.sleep(0.02)  # 5000 messages a second: far below the slow-consumer limit

            producer = asyncio.create_task(produce())
            await asyncio.sleep(1.0)
            await store.apply(new.with_version(2), stored.revision)
            await async_wait_until(lambda: client.topology is not None and client.topology.version == 2, 5)
            await asyncio.sleep(grace + 3.0)
            stop.set()
            await producer
            await admin.flush()
            total = sum(len(v) for v in published.values())
            await async_wait_until(
                lambda: got.count() >= total, 20, message=lambda: f"got {got.count()}/{total}"
            )
            await async_wait_until(lambda: client.connected_clusters() == ["C2", "C3"], 15)
            await asyncio.sleep(0.5)  # a stray or duplicate message would arrive now
            assert got.count() == total
            for asset in wanted:
                assert got.payloads(asset) == published[asset], asset
            assert client.subscriptions() == {a: new.cluster_for(a) for a in wanted}
            assert client_connections(targets["C1"]) == []
    finally:
        await admin.close()


# --------------------------------------------------------------------------- the synchronous bridge


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def test_sync_client_subscribe_listen_publish_close_leaves_no_thread_or_connection(
    three, forwarder, tmp_path
):
    source, targets = three
    config = write_config(tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()})
    forwarder(config).wait_ready()
    before = _threads()
    wanted = ["pump-1", "pump-2", "pump-3", "pump-4", "pump-5", "pump-6"]
    with SyncAssetClient.from_config(config) as client:
        assert len(_threads() - before) == 1  # the loop thread
        for asset in wanted:
            assert client.subscribe(asset) == f"assets.{asset}.>"
        for i in range(30):
            for asset in [*wanted, "valve-9"]:
                client.publish(f"assets.{asset}.pressure", f"{asset}:{i}")
        client.flush()
        got = []
        for msg in client.listen(timeout=10):
            got.append(msg)
            if len(got) == 30 * len(wanted):
                break
        assert not list(client.listen(timeout=0.3))  # nothing else: valve-9 was not subscribed
        for asset in wanted:
            assert [m.data.decode() for m in got if m.asset == asset] == [f"{asset}:{i}" for i in range(30)]
            assert {m.cluster for m in got if m.asset == asset} == {client.cluster_for(asset)}
        stats = client.stats()
        assert stats["received"] == stats["taken"] == 180
        assert stats["dropped"] == 0
        assert stats["policy"] == "drop-newest"
        clusters = client.connected_clusters()
        assert sum(len(client_connections(targets[c])) for c in clusters) == len(clusters)
        assert len(client_connections(source)) == 1  # publish() opened the source connection
    assert client.closed
    assert _threads() == before
    for target in [source, *targets.values()]:  # the servers see the closed sockets a moment later
        wait_until(lambda t=target: client_connections(t) == [], 5, message=f"{target} still has a client")
    with pytest.raises(AssetClientError, match="closed"):
        client.subscribe("pump-7")


def test_sync_client_slow_reader_drops_the_newest_and_counts_them(nats_servers, tmp_path):
    source = nats_servers.server(name="source")
    target = nats_servers.server(name="c1")
    config = write_config(tmp_path / "f.yaml", source.url, {"C1": [target.url]})

    def publish(start: int, count: int) -> None:
        async def run() -> None:
            nc = await nats_py.connect(target.url)  # straight to the cluster: no forwarder needed
            for i in range(start, start + count):
                await nc.publish("assets.pump-1.t", f"m{i}".encode())
            await nc.close()

        asyncio.run(run())

    with SyncAssetClient.from_config(config, queue_size=10) as client:
        client.subscribe("pump-1")
        publish(0, 100)
        wait_until(lambda: client.stats()["received"] == 100, 10, message=lambda: str(client.stats()))
        stats = client.stats()
        assert (stats["queued"], stats["queue_size"], stats["dropped"]) == (10, 10, 90)
        assert stats["dropped_by_asset"] == {"pump-1": 90}
        # What the queue holds is the oldest, in order: a prefix of what arrived.
        assert [m.data.decode() for m in client.listen(timeout=0.5)] == [f"m{i}" for i in range(10)]
        publish(100, 5)  # room again: nothing more is dropped
        assert [m.data.decode() for m in client.listen(timeout=1)] == [f"m{i}" for i in range(100, 105)]
        assert client.stats()["dropped"] == 90


SCRIPT_CTRL_C = """
import sys
import threading

from forwarder.client_sync import SyncAssetClient

try:
    with SyncAssetClient.from_config(sys.argv[1]) as client:
        client.subscribe("pump-1")
        print("listening", flush=True)
        for msg in client.listen():
            print(msg.data.decode(), flush=True)
except KeyboardInterrupt:
    print("interrupted, threads left:", threading.active_count() - 1, flush=True)
    raise
"""


def test_sync_client_ctrl_c_in_the_callers_thread_closes_cleanly(nats_servers, tmp_path):
    source = nats_servers.server(name="source")
    target = nats_servers.server(name="c1")
    config = write_config(tmp_path / "f.yaml", source.url, {"C1": [target.url]})
    script = tmp_path / "listen.py"
    script.write_text(SCRIPT_CTRL_C)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "listening"
        wait_until(lambda: len(client_connections(target)) == 1, 10)

        async def one() -> None:
            nc = await nats_py.connect(target.url)
            await nc.publish("assets.pump-1.t", b"hello")
            await nc.close()

        asyncio.run(one())
        assert proc.stdout.readline().strip() == "hello"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out.strip() == "interrupted, threads left: 0"  # the with block closed it: loop thread joined
    assert "KeyboardInterrupt" in err
    assert proc.returncode != 0
    wait_until(lambda: client_connections(target) == [], 5)


# --------------------------------------------------------------------------- forwarder watch


def test_forwarder_watch_prints_an_assets_messages_and_exits_zero_on_sigint(three, forwarder, tmp_path):
    source, targets = three
    config = write_config(tmp_path / "f.yaml", source.url, {n: urls(t) for n, t in targets.items()})
    forwarder(config).wait_ready()
    proc = subprocess.Popen(
        [sys.executable, "-m", "forwarder", "watch", "-c", str(config), "pump-7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        notes = [proc.stderr.readline()]
        while "Ctrl-C stops" not in notes[-1] and notes[-1]:
            notes.append(proc.stderr.readline())
        banner = notes[-1]
        cluster = AssetClient.from_config(config).cluster_for("pump-7")
        assert f"pump-7 on {cluster} (assets.pump-7.>, topology v1)" in banner
        assert f"forwarder watch: cluster {cluster}: connected\n" in notes

        async def send() -> None:
            nc = await nats_py.connect(source.url)
            for i in range(3):
                await nc.publish("assets.pump-7.temperature", f"21.{i}".encode())
                await nc.publish("assets.pump-8.temperature", b"other asset")
            await nc.publish("assets.pump-7.raw", b"\x00\xff")
            await nc.close()

        asyncio.run(send())
        lines = [proc.stdout.readline().split(" ", 1)[1].rstrip("\n") for _ in range(4)]
        assert lines == [
            f"{cluster} assets.pump-7.temperature 21.0",
            f"{cluster} assets.pump-7.temperature 21.1",
            f"{cluster} assets.pump-7.temperature 21.2",
            f"{cluster} assets.pump-7.raw \\x00\\xff",
        ]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == ""
    assert "Traceback" not in err


def test_forwarder_watch_names_the_config_problem_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"source": {"servers": ["nats://127.0.0.1:4222"]}, "clusters": {}}))
    result = subprocess.run(
        [sys.executable, "-m", "forwarder", "watch", "-c", str(bad), "pump-7"],
        capture_output=True, text=True, timeout=30, env={k: v for k, v in os.environ.items()
                                                          if not k.startswith("NATS_CLUSTER_")},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "clusters" in result.stderr


async def test_a_cluster_that_does_not_answer_fails_the_subscribe_in_time(nats_servers, tmp_path):
    source = nats_servers.server(name="source")
    config = write_config(tmp_path / "f.yaml", source.url, {"C9": [f"nats://127.0.0.1:{free_port()}"]})
    async with AssetClient.from_config(config, connect_wait=1.5) as client:
        started = time.monotonic()
        with pytest.raises(AssetClientError, match=r"cluster C9: cannot connect to nats://127\.0\.0\.1:"):
            await client.subscribe("pump-1", cb=Received())
        assert time.monotonic() - started < 5
        assert client.subscriptions() == {}
        assert client.connected_clusters() == []
