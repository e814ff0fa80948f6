"""NatsCluster against real nats-server processes: connect, publish, reconnect, close.

Every behaviour here is NATS behaviour, so no fakes: servers are started (and stopped, killed,
frozen with SIGSTOP) by the fixtures in conftest.py. Connections are counted by the server itself
(``/varz``), and what arrives is read by a separate subscriber connection.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import nats as nats_py
import pytest
import structlog
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.command import pub_cmd

from forwarder import logs
from forwarder.cluster import (
    BufferedWriter,
    ClusterClosedError,
    ClusterUnavailableError,
    MessageTooLargeError,
    NatsCluster,
    TargetClient,
)
from forwarder.config import ClusterSettings, ConnectionSettings, JetStreamTargetSettings
from forwarder.embedded import LocalServer
from forwarder.natsconn import header_block_size
from tests.helpers import async_wait_until

pytestmark = pytest.mark.integration


def settings(name: str, *servers: str, **connection: Any) -> ClusterSettings:
    options: dict[str, Any] = {"connect_timeout": 1.0, "reconnect_time_wait": 0.1, **connection}
    return ClusterSettings(
        name=name, connection=ConnectionSettings(servers=servers, name=f"test-{name}", **options)
    )


@pytest.fixture
async def make_cluster() -> AsyncIterator[Callable[..., NatsCluster]]:
    """``make_cluster(name, *urls, **connection options)``; every one is closed at teardown."""
    made: list[NatsCluster] = []

    def make(name: str, *servers: str, **connection: Any) -> NatsCluster:
        cluster = NatsCluster(settings(name, *servers, **connection))
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        await asyncio.wait_for(cluster.close(), 10)


@pytest.fixture
async def subscriber() -> AsyncIterator[Callable[..., Any]]:
    """``await subscriber(url, subject)``: a Subscription on its own connection (no callback)."""
    clients: list[Client] = []

    async def subscribe(url: str, subject: str) -> Subscription:
        nc = await nats_py.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        clients.append(nc)
        sub = await nc.subscribe(subject, pending_msgs_limit=1_000_000, pending_bytes_limit=512 * 1024 * 1024)
        # The server must know the interest before anything is published. nats-py's flush()
        # does not prove that (its PING can overtake the buffered SUB), so echo a probe to
        # ourselves: it travels behind the SUB and comes back only through it.
        probe = subject.replace(">", "probe").replace("*", "probe")
        await nc.publish(probe, b"probe")
        assert (await sub.next_msg(timeout=5)).data == b"probe"
        return sub

    yield subscribe
    for nc in clients:
        await nc.close()


def connections(server: LocalServer) -> tuple[int, int]:
    """(open now, accepted since start) as the server counts them."""
    varz = server.varz()
    return varz["connections"], varz["total_connections"]


async def received(sub: Subscription, count: int, timeout: float = 10) -> list[bytes]:
    """Exactly ``count`` payloads from ``sub`` (fails on a shortfall at the deadline)."""
    await async_wait_until(
        lambda: sub.pending_msgs >= count,
        timeout,
        message=lambda: f"{sub.pending_msgs} of {count} messages arrived",
    )
    return [(await sub.next_msg(timeout=1)).data for _ in range(count)]


# --------------------------------------------------------------------------- connect


async def test_connect_is_idempotent_and_concurrent_callers_share_one_attempt(nats_servers, make_cluster):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await asyncio.gather(*(cluster.connect() for _ in range(20)))
    nc = cluster.nc
    assert nc is not None
    assert cluster.connected
    await cluster.connect()
    await asyncio.gather(cluster.connect(), cluster.connect())
    assert cluster.nc is nc
    assert connections(server) == (1, 1)


async def test_connect_retries_until_a_server_that_is_down_starts(nats_servers, make_cluster, subscriber):
    server = nats_servers.server(name="late")
    server.stop()
    cluster = make_cluster("C1", server.url)
    attempt = asyncio.create_task(cluster.connect())
    # nats-py reports each failed attempt through error_cb: wait for a few of them.
    await async_wait_until(lambda: cluster.stats.errors >= 3, 10, message="no failed attempts reported")
    assert not attempt.done()
    assert not cluster.connected
    with pytest.raises(ClusterUnavailableError):
        await cluster.publish("late.x", b"too early")
    await asyncio.to_thread(server.start)
    await asyncio.wait_for(attempt, 10)
    assert cluster.connected
    sub = await subscriber(server.url, "late.>")
    await cluster.publish("late.x", b"hello")
    assert await received(sub, 1) == [b"hello"]
    assert connections(server)[1] == 2  # our one connection, and the subscriber's


async def test_close_during_a_connect_that_retries_ends_it_with_cluster_closed(nats_servers, make_cluster):
    server = nats_servers.server(name="down")
    server.stop()
    cluster = make_cluster("C1", server.url)
    waiters = [asyncio.create_task(cluster.connect()) for _ in range(3)]
    await async_wait_until(lambda: cluster.stats.errors >= 1, 10)
    await asyncio.wait_for(cluster.close(), 5)
    for waiter in waiters:
        with pytest.raises(ClusterClosedError):
            await waiter
    with pytest.raises(ClusterClosedError):
        await cluster.connect()
    assert cluster.nc is None
    assert cluster.snapshot()["state"] == "closed"


# --------------------------------------------------------------------------- close


async def test_close_drains_everything_published_before_it(nats_servers, make_cluster, subscriber):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    sub = await subscriber(server.url, "drain.>")
    count = 6000
    for i in range(count // 2):
        assert cluster.try_publish("drain.fast", b"%d" % i)
    for i in range(count // 2, count):
        await cluster.publish("drain.slow", b"%d" % i, {"Seq": str(i)} if i % 2 else None)
    await cluster.close()  # no flush before: close alone must get every buffered byte out
    assert cluster.nc is not None
    assert cluster.nc.is_closed
    assert [int(p) for p in await received(sub, count)] == list(range(count))


async def test_close_twice_and_concurrently_is_fine(nats_servers, make_cluster):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    await asyncio.wait_for(asyncio.gather(*(cluster.close() for _ in range(5))), 10)
    await asyncio.wait_for(cluster.close(), 5)
    assert cluster.nc is not None
    assert cluster.nc.is_closed
    assert cluster.snapshot()["state"] == "closed"
    await async_wait_until(lambda: connections(server)[0] == 0, 5, message="the server still has a client")
    assert connections(server) == (0, 1)


async def test_a_publish_after_close_began_raises_cluster_closed(nats_servers, make_cluster):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    closing = asyncio.create_task(cluster.close())
    await async_wait_until(lambda: cluster.closing, 5)
    with pytest.raises(ClusterClosedError, match="C1"):
        await cluster.publish("x.y", b"late")
    assert not cluster.try_publish("x.y", b"late")
    await closing
    with pytest.raises(ClusterClosedError):
        await cluster.publish("x.y", b"later")
    with pytest.raises(ClusterClosedError):
        await cluster.connect()


async def test_close_waits_for_a_publish_in_flight_then_drains(nats_servers, make_cluster, subscriber):
    """A frozen server (SIGSTOP) stops reading: the socket fills up and a publish that has to force
    a flush of the full buffer hangs in flight. close() must wait for it, refuse new publishes
    meanwhile, and once the server runs again deliver every message published before close."""
    server = nats_servers.server(name="frozen")
    cluster = make_cluster("C1", server.url, pending_size=256 * 1024)
    await cluster.connect()
    sub = await subscriber(server.url, "slow.>")
    payload = b"p" * (64 * 1024)
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        stuck: asyncio.Task[None] | None = None
        sent = 0
        for i in range(2000):  # at most 128 MB, far beyond any socket buffer
            task = asyncio.create_task(cluster.publish("slow.x", b"%08d" % i + payload))
            sent += 1
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if not done:
                stuck = task
                break
            task.result()
        assert stuck is not None, "no publish ever blocked on the frozen server"
        closing = asyncio.create_task(cluster.close())
        done, _ = await asyncio.wait({closing}, timeout=0.5)
        assert not done, "close() returned while a publish was still in flight"
        assert not stuck.done()
        # close() waits for the publish before it touches the client: no drain has begun yet.
        assert cluster.nc is not None
        assert cluster.nc.is_connected
        assert not cluster.nc.is_draining
        assert cluster.closing
        with pytest.raises(ClusterClosedError):
            await cluster.publish("slow.x", b"after close began")
        assert not cluster.try_publish("slow.x", b"after close began")
    finally:
        os.kill(server.pid, signal.SIGCONT)
    await asyncio.wait_for(closing, 30)
    assert stuck.done()
    assert stuck.exception() is None
    got = await received(sub, sent, timeout=30)
    assert [int(p[:8]) for p in got] == list(range(sent))


# --------------------------------------------------------------------------- reconnect


async def test_nats_py_reconnects_by_itself_to_a_restarted_server(nats_servers, make_cluster, subscriber):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    nc = cluster.nc
    assert nc is not None
    server.kill()
    await async_wait_until(lambda: not cluster.connected, 10, message="the kill was not noticed")
    assert cluster.stats.disconnects == 1
    assert not cluster.try_publish("back.x", b"while down")  # the fast path declines; nothing lost silently
    assert cluster.snapshot()["state"] == "reconnecting"
    await asyncio.to_thread(server.start)
    # nats-py calls the connection connected a moment before its reconnect is complete
    # (subscriptions replayed, a PING answered): the reconnected event marks the end.
    await async_wait_until(
        lambda: cluster.stats.reconnects == 1, 15, message="no reconnect after the restart"
    )
    assert cluster.connected
    assert cluster.nc is nc  # the same client: never closed and replaced by us
    assert not nc.is_closed
    sub = await subscriber(server.url, "back.>")
    assert cluster.try_publish("back.x", b"fast")
    await cluster.publish("back.x", b"slow", {"H": "v"})
    assert await received(sub, 2) == [b"fast", b"slow"]


# --------------------------------------------------------------------------- publish


async def test_try_publish_declines_unless_plainly_connected_with_room(
    nats_servers, make_cluster, subscriber
):
    server = nats_servers.server(name="small", max_payload=1024)
    cluster = make_cluster("C1", server.url)
    assert not cluster.try_publish("t.x", b"before connect")
    await cluster.connect()
    sub = await subscriber(server.url, "t.>")
    assert not cluster.try_publish("t.x", b"x" * 1025)  # over max_payload: publish() will say why
    assert cluster.try_publish("t.x", b"x" * 1024)
    assert cluster.try_publish("t.y", b"small")
    await cluster.flush(5)
    got = await received(sub, 2)
    assert got == [b"x" * 1024, b"small"]
    closing = asyncio.create_task(cluster.close())
    await async_wait_until(lambda: cluster.closing, 5)
    assert not cluster.try_publish("t.x", b"closing")
    await closing
    assert sub.pending_msgs == 0


PUB_RE = re.compile(rb"PUB (\S+) +(?:(\S+) +)?(\d+)\r\n", re.DOTALL)


def parse_pub(command: bytes) -> tuple[bytes, bytes | None, bytes]:
    """(subject, reply, payload) of one PUB command; the whole command must be consumed."""
    m = PUB_RE.match(command)
    assert m is not None, command[:60]
    size = int(m.group(3))
    assert command[m.end() + size :] == b"\r\n", "payload size and framing disagree"
    return m.group(1), m.group(2), command[m.end() : m.end() + size]


async def test_the_fast_path_writes_what_nats_py_would(nats_servers, make_cluster, subscriber):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    nc = cluster.nc
    assert nc is not None
    sub = await subscriber(server.url, "w.>")
    cases = [("w.a", b""), ("w.b", b"x"), ("w.ä.東", b"\r\n\x00" * 100), ("w.a", b"again")]
    for subject, payload in cases:
        before = len(nc._pending)
        assert cluster.try_publish(subject, payload)
        (command,) = nc._pending[before:]
        assert (
            parse_pub(command)
            == parse_pub(pub_cmd(subject, "", payload))
            == (subject.encode(), None, payload)
        )
    await cluster.flush(5)
    assert await received(sub, len(cases)) == [payload for _, payload in cases]


async def test_the_fast_path_with_headers_writes_what_nats_py_would(nats_servers, make_cluster, subscriber):
    """JetStream targets' publishes (a reply subject for the PubAck, ``Nats-Msg-Id``, the source
    message's headers) go out as the very bytes nats-py's ``publish`` would write."""
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    nc = cluster.nc
    assert nc is not None
    writer = BufferedWriter.for_client(nc)
    assert writer is not None
    sub = await subscriber(server.url, "w.>")
    cases: list[tuple[str, dict[str, str], bytes]] = [
        ("w.a", {"Nats-Msg-Id": "ASSETS:1"}, b"x"),
        ("w.ä", {" Asset-Id ": " pump-1 ", "Nats-Msg-Id": "ASSETS:2"}, b""),
        ("w.b", {"Note": "two\r\nlines", "Unit": "°C", "Nats-Msg-Id": "ASSETS:3"}, b"\r\n" * 50),
    ]
    for subject, headers, payload in cases:
        before = len(nc._pending)
        await nc.publish(subject, payload, reply="_INBOX.r.1", headers=headers)
        assert writer.write_with_headers(subject, b"_INBOX.r.1", headers, payload)
        by_nats_py, ours = nc._pending[before:]
        assert ours == by_nats_py
    for declined in ({"bad name": "v"}, {"  ": "blank"}, {"Nats-Msg-Id": "1", "ä": "v"}):
        before = len(nc._pending)
        assert not writer.write_with_headers("w.c", b"_INBOX.r.2", declined, b"x")
        assert len(nc._pending) == before, "a declined write leaves nothing behind"
    await cluster.flush(5)
    got = []
    for _ in range(2 * len(cases)):
        msg = await sub.next_msg(timeout=5)
        got.append((msg.subject, msg.reply, msg.headers, msg.data))
    assert got[0::2] == got[1::2]
    assert got[2][2] == {"Asset-Id": "pump-1", "Nats-Msg-Id": "ASSETS:2"}  # case 1, as nats-py sent it


async def test_pub_acks_reach_the_window_from_the_read_loop(nats_servers, make_cluster):
    """A JetStream target's PubAcks (and its stream's refusals) settle their publishes without
    going through nats-py's per-subscription queue and task."""
    server = nats_servers.server(name="js", jetstream=True)
    admin = await nats_py.connect(server.url)
    try:
        await admin.jetstream().add_stream(name="OUT", subjects=["out.>"], max_msg_size=1000)
    finally:
        await admin.close()
    cluster = NatsCluster(
        ClusterSettings(
            name="C1",
            connection=ConnectionSettings(servers=(server.url,), name="test-js"),
            jetstream=JetStreamTargetSettings(max_pending=10, ack_timeout=5),
        )
    )
    try:
        await cluster.connect()
        futures = [
            await cluster.publish_async(f"out.{n}", b"x", {"Nats-Msg-Id": f"S:{n}"}) for n in range(20)
        ]
        again = await cluster.publish_async("out.0", b"x", {"Nats-Msg-Id": "S:0"})
        refused = await cluster.publish_async("out.big", b"x" * 2000, {"Nats-Msg-Id": "S:big"})
        await asyncio.wait_for(asyncio.gather(*futures, again, refused, return_exceptions=True), 10)
        assert [f.result().seq for f in futures] == list(range(1, 21))
        assert again.result().duplicate is True
        assert isinstance(refused.exception(), nats_py.js.errors.APIError)
        nc = cluster.nc
        assert isinstance(nc, TargetClient)
        assert nc._subs[nc.reply_sid]._received == 0, "a PubAck went through nats-py's dispatch"
        assert nc.stats["in_msgs"] >= 22
    finally:
        await cluster.close()


MSG_ID = {"Nats-Msg-Id": "S:1"}


def writer_of(cluster: NatsCluster) -> BufferedWriter:
    assert cluster.nc is not None
    writer = BufferedWriter.for_client(cluster.nc)
    assert writer is not None
    return writer


async def test_the_fast_paths_decline_while_disconnected(nats_servers, make_cluster):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    writer = writer_of(cluster)
    server.kill()
    await async_wait_until(lambda: not cluster.connected, 10)
    assert not cluster.try_publish("t.x", b"down")
    assert not writer.write_with_headers("t.x", b"_INBOX.r.1", MSG_ID, b"down")


async def test_the_fast_paths_decline_when_the_buffer_is_full(nats_servers, make_cluster):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url, pending_size=64 * 1024)
    await cluster.connect()
    writer = writer_of(cluster)
    assert cluster.nc is not None
    cluster.nc._pending_data_size = 64 * 1024 + 1  # as if the flusher had fallen behind
    try:
        assert not cluster.try_publish("t.x", b"full")
        assert not writer.write_with_headers("t.x", b"_INBOX.r.1", MSG_ID, b"full")
    finally:
        cluster.nc._pending_data_size = 0
    assert cluster.try_publish("t.x", b"room again")
    assert writer.write_with_headers("t.x", b"_INBOX.r.1", MSG_ID, b"room again")


async def test_without_nats_py_s_flusher_the_fast_paths_decline_and_publish_still_delivers(
    nats_servers, make_cluster, subscriber
):
    """A buffer that nobody sends would hold messages until the next PING: nats-py's own
    ``publish`` flushes inline when its flusher task is gone, so the fast paths leave it to it."""
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    writer = writer_of(cluster)
    sub = await subscriber(server.url, "t.>")
    nc = cluster.nc
    assert nc is not None
    assert nc._flusher_task is not None
    nc._flusher_task.cancel()
    await asyncio.gather(nc._flusher_task, return_exceptions=True)
    assert not cluster.try_publish("t.x", b"no flusher")
    assert not writer.write_with_headers("t.x", b"_INBOX.r.1", MSG_ID, b"no flusher")
    await cluster.publish("t.x", b"inline")
    assert (await sub.next_msg(timeout=5)).data == b"inline"


async def test_message_too_large_counts_headers_and_keeps_the_connection(
    nats_servers, make_cluster, subscriber
):
    limit = 1024
    server = nats_servers.server(name="small", max_payload=limit)
    cluster = make_cluster("C1", server.url)
    await cluster.connect()
    sub = await subscriber(server.url, "big.>")
    headers = {"Asset-Id": "pump-7", "Trace": "t" * 100}
    fits = limit - header_block_size(headers)

    with pytest.raises(MessageTooLargeError) as info:
        await cluster.publish("big.x", b"x" * (fits + 1), headers)
    assert (info.value.size, info.value.limit) == (limit + 1, limit)
    assert "C1" in str(info.value)
    with pytest.raises(MessageTooLargeError):
        await cluster.publish("big.x", b"x" * (limit + 1))
    # An empty header dict still makes nats-py send a header block ("NATS/1.0\r\n\r\n").
    with pytest.raises(MessageTooLargeError):
        await cluster.publish("big.x", b"x" * limit, {})

    # Exactly the limit, headers included, is taken: the arithmetic is exact both ways.
    await cluster.publish("big.x", b"e" * fits, headers)
    await cluster.publish("big.x", b"f" * limit)
    await cluster.flush(5)  # had the server refused a message, it would have closed the connection
    assert await received(sub, 2) == [b"e" * fits, b"f" * limit]
    assert cluster.connected
    assert cluster.stats.disconnects == 0
    assert cluster.stats.errors == 0
    assert connections(server) == (2, 2)  # ours and the subscriber's, never a reconnect


async def test_flush_confirms_that_the_server_has_every_byte(nats_servers, make_cluster, subscriber):
    server = nats_servers.server(name="c1")
    cluster = make_cluster("C1", server.url)
    with pytest.raises(ClusterUnavailableError):
        await cluster.flush(1)
    await cluster.connect()
    sub = await subscriber(server.url, "f.>")
    count = 2000
    payload = b"f" * 1000  # 2 MB: far more than the server reads from a socket at once
    for _ in range(count):
        assert cluster.try_publish("f.x", payload)
    await cluster.flush(5)
    # The server handled every PUB before our PING; the subscriber's PONG comes after every
    # message the server queued for it. So all are here now, without any polling.
    assert sub._conn is not None
    await sub._conn.flush(5)
    assert sub.pending_msgs == count


# --------------------------------------------------------------------------- logs


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The service's real JSON log configuration, writing to a buffer; restored afterwards."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    with monkeypatch.context() as patch:
        patch.setattr(sys, "stdout", buffer)  # logs.configure writes to sys.stdout as it is now
        logs.configure("info", "json")

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    try:
        yield lines
    finally:
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)


async def test_connection_events_are_log_lines_with_the_cluster_name(nats_servers, json_logs):
    server = nats_servers.server(name="c1")
    cluster = NatsCluster(settings("Logged-1", server.url))  # created after logging is configured
    try:
        await cluster.connect()
        server.kill()
        await async_wait_until(lambda: not cluster.connected, 10)
        await asyncio.to_thread(server.start)
        await async_wait_until(lambda: cluster.stats.reconnects == 1, 15)
    finally:
        await cluster.close()
    assert cluster.stats.disconnects == 1  # the kill; our own close is no disconnect
    events = [line for line in json_logs() if line.get("cluster") == "Logged-1"]
    names = [line["event"] for line in events]
    for event in ("connected", "disconnected", "reconnected", "cluster_closed"):
        assert names.count(event) == 1, names
    assert names.index("connected") < names.index("disconnected") < names.index("reconnected")
    assert names[-1] == "cluster_closed"
    assert "connection_closed" not in names  # that warning is for a close we did not ask for
    by_event = {line["event"]: line for line in events}
    assert by_event["connected"]["server"] == server.url
    assert by_event["reconnected"]["server"] == server.url
    assert by_event["disconnected"]["level"] == "warning"
    assert by_event["cluster_closed"]["level"] == "info"
