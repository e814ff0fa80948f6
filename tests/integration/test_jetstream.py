"""At-least-once forwarding under faults: JetStream source, JetStream targets, real servers.

Every test publishes a known set of messages into the source stream (each payload a
unique id), applies a fault mid-stream, lets the system settle and then reads the
target streams: every id present, on the cluster that ``forwarder route`` names, and
exactly once (the targets are JetStream: redeliveries carry the same Nats-Msg-Id).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
import yaml
from nats.js.api import StreamConfig

from forwarder.embedded import LocalCluster, LocalServer, free_port
from tests.helpers import async_wait_until
from tests.integration.harness import ForwarderProcess, asset_name, write_config

pytestmark = pytest.mark.integration

TOTAL = 20_000
ASSETS = 2_000
FAST_REDELIVERY = {"ack_wait": 2, "backoff": [0.2, 0.5, 1, 2]}
JS_TARGET = {"ack_timeout": 1}  # PubAcks awaited for less than ack_wait (the config insists)


def urls(target: LocalServer | LocalCluster) -> list[str]:
    """The URLs of the nodes that are running (a reader must not wait on a killed one)."""
    nodes = target.nodes if isinstance(target, LocalCluster) else [target]
    return [n.url for n in nodes if n.running] or [n.url for n in nodes]


async def add_stream(servers: list[str], name: str, subjects: list[str], replicas: int = 1) -> None:
    nc = await nats.connect(servers)
    try:
        js = nc.jetstream(timeout=10)
        await js.add_stream(StreamConfig(name=name, subjects=subjects, num_replicas=replicas))
    finally:
        await nc.close()


async def read_stream(servers: list[str], stream: str, attempts: int = 3) -> list[tuple[str, bytes]]:
    """Every message in ``stream``, in order (an ordered consumer).

    A replicated stream that just lost a node may be electing a leader: a read that
    times out then is tried again from the start.
    """
    for attempt in range(attempts):
        try:
            return await _read_stream(servers, stream)
        except nats.errors.TimeoutError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


async def _read_stream(servers: list[str], stream: str) -> list[tuple[str, bytes]]:
    nc = await nats.connect(servers)
    try:
        js = nc.jetstream(timeout=10)
        total = (await js.stream_info(stream)).state.messages
        out: list[tuple[str, bytes]] = []
        if total:
            sub = await js.subscribe(">", stream=stream, ordered_consumer=True)
            while len(out) < total:
                msg = await sub.next_msg(timeout=5)
                out.append((msg.subject, msg.data))
            await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def stream_count(servers: list[str], stream: str) -> int:
    nc = await nats.connect(servers, connect_timeout=1, max_reconnect_attempts=1)
    try:
        return int((await nc.jetstream(timeout=2).stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def wait_stream(servers: list[str], stream: str, count: int, timeout: float = 15) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (seen := await stream_count(servers, stream)) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{stream} holds {seen} of {count}"
        await asyncio.sleep(0.1)


async def publish_source(url: str, count: int, *, rate: float = 8000, start: int = 0) -> None:
    """Publish into the source stream with PubAcks (in windows), paced at ``rate`` a second."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=10)
        loop = asyncio.get_running_loop()
        began = loop.time()
        window = []
        for i in range(start, start + count):
            subject = f"assets.{asset_name(i, ASSETS)}.value"
            window.append(await js.publish_async(subject, f"m{i:07d}".encode()))
            if len(window) >= 500:
                await asyncio.gather(*window)
                window.clear()
                ahead = (i - start) / rate - (loop.time() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await asyncio.gather(*window)
    finally:
        await nc.close()


def route_all(config: Path) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "forwarder", "route", "-c", str(config), "--stdin"],
        input="\n".join(asset_name(i, ASSETS) for i in range(ASSETS)).encode(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    return dict(line.split("\t") for line in out.splitlines())


@dataclass
class Rig:
    """A JetStream source, three JetStream target clusters (C2 a 3-node R3 cluster), a config."""

    source: LocalServer
    targets: dict[str, LocalServer | LocalCluster]
    config: Path
    tmp: Path
    processes: list[ForwarderProcess]

    def forwarder(self, name: str = "fwd") -> ForwarderProcess:
        """A replica: the shared config with an HTTP port of its own."""
        doc = yaml.safe_load(self.config.read_text())
        doc["http"]["port"] = free_port()
        config = self.tmp / f"{name}.yaml"
        config.write_text(yaml.safe_dump(doc))
        proc = ForwarderProcess(config, self.tmp / f"{name}.log").start()
        self.processes.append(proc)
        return proc

    async def settle(self, expected: int, timeout: float = 60) -> None:
        """Wait until the target streams together hold ``expected`` messages."""

        async def total() -> int:
            counts = await asyncio.gather(
                *(stream_count(urls(t), "TARGET") for t in self.targets.values()), return_exceptions=True
            )
            return sum(c for c in counts if isinstance(c, int))

        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        while asyncio.get_running_loop().time() < deadline:
            seen = await total()
            if seen >= expected:
                return
            await asyncio.sleep(0.25)
        logs = "\n".join(p.log_tail(15) for p in self.processes)
        raise AssertionError(f"targets hold {seen} of {expected}\n{logs}")

    async def verify(self, total: int = TOTAL, *, dead: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """Every id exactly once, on the cluster ``forwarder route`` names (except dead letters)."""
        owner = route_all(self.config)
        seen: dict[str, str] = {}
        for name, target in self.targets.items():
            for subject, data in await read_stream(urls(target), "TARGET"):
                msg_id = data.decode()
                assert msg_id not in seen, f"{msg_id} twice ({seen[msg_id]}, {name})"
                seen[msg_id] = name
                assert owner[subject.split(".")[1]] == name, f"{msg_id} on {name}, route says otherwise"
        missing = {f"m{i:07d}" for i in range(total)} - set(seen) - dead
        assert not missing, f"{len(missing)} lost, e.g. {sorted(missing)[:5]}"


@pytest.fixture
async def rig(nats_servers, tmp_path: Path):
    source = nats_servers.server(name="source", jetstream=True)
    targets: dict[str, LocalServer | LocalCluster] = {
        "C1": nats_servers.server(name="c1", jetstream=True),
        "C2": nats_servers.cluster(name="c2", size=3, jetstream=True),
        "C3": nats_servers.server(name="c3", jetstream=True),
    }
    await add_stream([source.url], "ASSETS", ["assets.>"])
    for name, target in targets.items():
        await add_stream(urls(target), "TARGET", ["assets.>"], replicas=3 if name == "C2" else 1)
    clusters = {
        n: {"servers": urls(t), "jetstream": JS_TARGET, "reconnect_time_wait": 0.25}
        for n, t in targets.items()
    }
    config = write_config(
        tmp_path / "f.yaml", source.url, clusters,
        source={"jetstream": {"stream": "ASSETS", "durable": "fwd", **FAST_REDELIVERY}},
        log={"level": "info", "format": "json"},
    )  # fmt: skip
    r = Rig(source, targets, config, tmp_path, [])
    yield r
    for proc in r.processes:
        proc.stop()


async def during(publishing: asyncio.Task[None], fault: Callable[[], Any], after: int, url: str) -> None:
    """Apply ``fault`` once the source stream holds ``after`` messages, while publishing goes on."""
    await wait_stream([url], "ASSETS", after, timeout=30)
    assert not publishing.done(), "the fault must land mid-stream"
    result = fault()
    if asyncio.iscoroutine(result):
        await result


async def test_a_whole_target_cluster_dies_and_comes_back(rig):
    fwd = rig.forwarder().wait_ready()
    c1 = rig.targets["C1"]
    assert isinstance(c1, LocalServer)
    publishing = asyncio.create_task(publish_source(rig.source.url, TOTAL))
    await during(publishing, c1.kill, 5000, rig.source.url)
    # While C1 is down the others keep flowing.
    others = [t for n, t in rig.targets.items() if n != "C1"]
    before = sum([await stream_count(urls(t), "TARGET") for t in others])
    await asyncio.sleep(1.5)
    assert sum([await stream_count(urls(t), "TARGET") for t in others]) > before
    await asyncio.to_thread(c1.start)
    await publishing
    await rig.settle(TOTAL)
    await rig.verify()
    m = fwd.metrics()
    assert (
        m['forwarder_messages_parked_total{cluster="C1"}'] + m['forwarder_redeliveries_total{cluster="C1"}']
        > 0
    )


async def test_one_node_of_the_replicated_target_cluster_dies(rig):
    rig.forwarder().wait_ready()
    c2 = rig.targets["C2"]
    assert isinstance(c2, LocalCluster)
    publishing = asyncio.create_task(publish_source(rig.source.url, TOTAL))
    await during(publishing, c2.nodes[0].kill, 5000, rig.source.url)
    await publishing
    await rig.settle(TOTAL)
    await rig.verify()


async def test_the_forwarder_is_killed_and_started_again(rig):
    fwd = rig.forwarder("first").wait_ready()
    publishing = asyncio.create_task(publish_source(rig.source.url, TOTAL))
    await during(publishing, fwd.kill, 6000, rig.source.url)
    rig.forwarder("second").wait_ready()
    await publishing
    await rig.settle(TOTAL)
    await rig.verify()


async def test_two_forwarders_share_the_durable_and_one_is_killed(rig):
    first = rig.forwarder("first").wait_ready()
    second = rig.forwarder("second").wait_ready()
    publishing = asyncio.create_task(publish_source(rig.source.url, TOTAL))
    await during(publishing, first.kill, 6000, rig.source.url)
    await publishing
    await rig.settle(TOTAL)
    await rig.verify()
    assert second.metric("forwarder_messages_received_total") > 0


async def test_sigterm_mid_stream_exits_zero_and_loses_nothing(rig):
    fwd = rig.forwarder("first").wait_ready()
    publishing = asyncio.create_task(publish_source(rig.source.url, TOTAL))
    await during(publishing, lambda: fwd.signal(signal.SIGTERM), 6000, rig.source.url)
    assert await asyncio.to_thread(fwd.wait, 30) == 0
    rig.forwarder("second").wait_ready()
    await publishing
    await rig.settle(TOTAL)
    await rig.verify()


async def refused_for_good(fwd: ForwarderProcess, source_url: str, target_url: str, size: int) -> None:
    """Between two small messages, one of ``size`` bytes that the target refuses for good: it
    goes to the dead-letter subject once, and is acknowledged (never redelivered)."""
    fwd.wait_ready()
    nc = await nats.connect(source_url)
    try:
        dead: list[Any] = []

        async def on_dead(msg: Any) -> None:
            dead.append(msg)

        await nc.subscribe("forwarder.dead", cb=on_dead)
        js = nc.jetstream()
        await js.publish("assets.a1.value", b"before")
        await js.publish("assets.a1.value", b"x" * size)
        await js.publish("assets.a1.value", b"after")
        await async_wait_until(lambda: len(dead) == 1, 15, message=lambda: fwd.log_tail())
        assert dead[0].headers["Forwarder-Error"].startswith("too_large")
        await wait_stream([target_url], "TARGET", 2)
        assert [d for _, d in await read_stream([target_url], "TARGET")] == [b"before", b"after"]
        # Acknowledged: nothing is waiting to be redelivered.
        await async_wait_until(lambda: fwd.metric("forwarder_source_lag_messages") == 0, 15)
        assert fwd.metric('forwarder_redeliveries_total{cluster="C1"}') == 0
    finally:
        await nc.close()


async def test_a_message_too_large_for_the_target_is_dead_lettered(nats_servers, tmp_path):
    source = nats_servers.server(name="source", jetstream=True)
    small = nats_servers.server(name="small", jetstream=True, max_payload=1024)
    await add_stream([source.url], "ASSETS", ["assets.>"])
    await add_stream([small.url], "TARGET", ["assets.>"])
    config = write_config(
        tmp_path / "f.yaml", source.url, {"C1": {"servers": [small.url], "jetstream": {"ack_timeout": 1}}},
        source={"jetstream": {"stream": "ASSETS", "durable": "fwd", **FAST_REDELIVERY}},
    )  # fmt: skip
    fwd = ForwarderProcess(config, tmp_path / "fwd.log").start()
    try:
        await refused_for_good(fwd, source.url, small.url, 4096)
    finally:
        fwd.stop()


async def test_the_source_server_restarts_and_the_forwarder_resumes(rig):
    rig.forwarder().wait_ready()
    await publish_source(rig.source.url, TOTAL // 2)
    await rig.settle(TOTAL // 2)
    rig.source.stop()
    await asyncio.to_thread(rig.source.start)
    await publish_source(rig.source.url, TOTAL // 2, start=TOTAL // 2)
    await rig.settle(TOTAL)
    await rig.verify()


async def test_a_long_outage_of_one_cluster_does_not_stall_the_others(rig):
    """Refused messages hold ack-pending slots while they wait for redelivery: a long outage
    of one cluster must not use up max_ack_pending and stop the others."""
    doc = yaml.safe_load(rig.config.read_text())
    doc["source"]["jetstream"]["max_ack_pending"] = 300
    rig.config.write_text(yaml.safe_dump(doc))
    fwd = rig.forwarder().wait_ready()
    c1 = rig.targets["C1"]
    assert isinstance(c1, LocalServer)
    c1.kill()
    others = [t for n, t in rig.targets.items() if n != "C1"]
    publishing = asyncio.create_task(publish_source(rig.source.url, 6000, rate=1000))
    # Well past the point where C1's share (a third of 1000/s) would fill 300 slots.
    await asyncio.sleep(3)
    first = sum([await stream_count(urls(t), "TARGET") for t in others])
    await asyncio.sleep(2)
    second = sum([await stream_count(urls(t), "TARGET") for t in others])
    assert second - first > 500, f"the others stalled: {first} -> {second} in 2 s"
    await publishing
    await asyncio.to_thread(c1.start)
    await rig.settle(6000)
    await rig.verify(6000)
    assert fwd.metric('forwarder_messages_parked_total{cluster="C1"}') > 0


async def test_a_message_over_the_target_streams_size_limit_is_dead_lettered(nats_servers, tmp_path):
    """The stream refuses it for good (max_msg_size): a dead letter, acknowledged, not redelivered forever."""
    source = nats_servers.server(name="source", jetstream=True)
    target = nats_servers.server(name="target", jetstream=True)
    await add_stream([source.url], "ASSETS", ["assets.>"])
    nc = await nats.connect(target.url)
    await nc.jetstream().add_stream(StreamConfig(name="TARGET", subjects=["assets.>"], max_msg_size=512))
    await nc.close()
    config = write_config(
        tmp_path / "f.yaml", source.url, {"C1": {"servers": [target.url], "jetstream": JS_TARGET}},
        source={"jetstream": {"stream": "ASSETS", "durable": "fwd", **FAST_REDELIVERY}},
    )  # fmt: skip
    fwd = ForwarderProcess(config, tmp_path / "fwd.log").start()
    try:
        await refused_for_good(fwd, source.url, target.url, 2048)
    finally:
        fwd.stop()
