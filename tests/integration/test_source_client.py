"""The source connection against producers that send what nats-py cannot read, on a real server.

First what nats-py 2.16 alone does with each message (why ``SourceClient`` exists: if one of
these starts failing, nats-py fixed it and the matching repair can go, see
docs/upstream-nats-py.md), then the same bytes through ``SourceClient``, then the safety net:
a read loop that dies anyway is found by the once-a-second check, counted in
``forwarder_source_stalls_total`` and replaced by a reconnect; and a source server that
restarts is reconnected to and consumed again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.aio.client import Client

from forwarder.config import load_config
from forwarder.service import Server
from forwarder.source import SourceClient
from tests.helpers import async_wait_until
from tests.integration.harness import parse_metrics, write_config
from tests.security_helpers import RawPublisher, hpub, pub

pytestmark = pytest.mark.integration

HOSTILE = {  # the raw message, and the subject it was published on (undecodable bytes as surrogates)
    "subject not UTF-8": (pub(b"assets.\xff\xfe.v", b"x"), "assets.\udcff\udcfe.v"),
    "form feed in the subject": (pub(b"assets.a\x0cb.v", b"x"), "assets.a\x0cb.v"),
    "vertical tab and digits ending the subject": (pub(b"assets.a.v\x0b1", b"x"), "assets.a.v\x0b1"),
    "header block only NATS/1.0": (hpub(b"assets.a.v", b"NATS/1.0", b"x"), "assets.a.v"),
    "header block shorter than NATS/1.0": (hpub(b"assets.a.v", b"bad", b"x"), "assets.a.v"),
    "status line not UTF-8": (hpub(b"assets.a.v", b"NATS/1.0 \xff\xfe\r\n\r\n", b"x"), "assets.a.v"),
}


class Watched:
    """A client subscribed to ``assets.>`` that records messages and connection events."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.subjects: list[str] = []
        self.events: list[str] = []

    async def start(self, url: str) -> Watched:
        async def on_msg(msg: Any) -> None:
            self.subjects.append(msg.subject)

        async def on_event(*_: Any) -> None:
            self.events.append("event")

        await self.client.connect(
            url, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
            disconnected_cb=on_event, error_cb=on_event,
        )  # fmt: skip
        await self.client.subscribe("assets.>", cb=on_msg)
        # nats-py's flush can overtake a SUB still in its buffer: prove the interest with a probe.
        probe = await nats_py.connect(url)
        try:

            async def probed() -> bool:
                await probe.publish("assets.probe.v", b"")
                await probe.flush()
                await asyncio.sleep(0.02)
                return "assets.probe.v" in self.subjects

            await async_wait_until(probed, 10)
        finally:
            await probe.close()
        await asyncio.sleep(0.05)  # a late duplicate probe lands now, before we forget them
        self.subjects.clear()
        return self

    @property
    def read_loop_alive(self) -> bool:
        task = self.client._reading_task
        return self.client.is_connected and task is not None and not task.done()


async def send_hostile_then_good(url: str, port: int, hostile: bytes, client: Client) -> Watched:
    watched = await Watched(client).start(url)
    publisher = RawPublisher(port)
    try:
        publisher.send(hostile + pub(b"assets.good.v", b"ok"))  # the good one right behind it
        publisher.flush()
        await async_wait_until(lambda: "assets.good.v" in watched.subjects or not watched.read_loop_alive
                               or watched.events, 5)  # fmt: skip
        await asyncio.sleep(0.2)  # a late good message or a late event would show now
    finally:
        publisher.close()
    return watched


@pytest.mark.parametrize("case", HOSTILE)
async def test_plain_nats_py_misreads_or_loses_what_follows(case, nats_servers):
    server = nats_servers.server(name="source")
    raw, subject = HOSTILE[case]
    watched = await send_hostile_then_good(server.url, server.port, raw, Client())
    try:
        intact = watched.subjects == [subject, "assets.good.v"] and watched.read_loop_alive
        assert not intact or watched.events, f"nats-py now handles {case!r}: its SourceClient repair may go"
    finally:
        await watched.client.close()


@pytest.mark.parametrize("case", HOSTILE)
async def test_source_client_reads_it_and_reads_on(case, nats_servers):
    server = nats_servers.server(name="source")
    raw, subject = HOSTILE[case]
    watched = await send_hostile_then_good(server.url, server.port, raw, SourceClient())
    try:
        assert watched.subjects == [subject, "assets.good.v"]
        assert watched.read_loop_alive
        assert not watched.events  # no error, no disconnect
    finally:
        await watched.client.close()


@pytest.fixture
async def in_process(nats_servers, tmp_path: Path) -> AsyncIterator[tuple[Server, Any, Any]]:
    """A forwarder running in this process (so a test can break its internals) on real servers."""
    source = nats_servers.server(name="source")
    target = nats_servers.server(name="target")
    config = write_config(
        tmp_path / "f.yaml", source.url, {"C1": [target.url]}, source={"reconnect_time_wait": 0.1}
    )
    server = Server(load_config(config))
    serving = asyncio.get_running_loop().create_task(server.serve(install_signals=False))
    await asyncio.wait_for(server.started.wait(), 20)
    try:
        yield server, source, target
    finally:
        server.handle_exit()
        assert await asyncio.wait_for(serving, 30) == 0


async def forwarded_count(server: Server) -> float:
    return parse_metrics(server.metrics().decode()).get(
        'forwarder_messages_forwarded_total{cluster="C1"}', 0.0
    )


async def publish(url: str, count: int) -> None:
    nc = await nats_py.connect(url)
    for i in range(count):
        await nc.publish(f"assets.a{i}.v", b"x")
    await nc.flush()
    await nc.close()


async def test_a_dead_read_loop_is_found_counted_and_replaced(in_process):
    server, source, _ = in_process
    await publish(source.url, 10)
    await async_wait_until(lambda: server.source.stats.connected and server.stats.received == 10, 10)
    nc = server.source.nc
    assert nc is not None
    nc._reading_task.cancel()  # what a message nats-py cannot parse used to do, silently
    metrics = parse_metrics(server.metrics().decode())
    assert metrics["forwarder_source_stalls_total"] == 0
    await async_wait_until(
        lambda: parse_metrics(server.metrics().decode())["forwarder_source_stalls_total"] == 1, 5,
        message="the dead read loop was not noticed",
    )  # fmt: skip
    await async_wait_until(lambda: server.source.subscribed and nc.read_loop_alive, 10)
    await publish(source.url, 10)
    await async_wait_until(lambda: server.stats.received == 20, 10, message="nothing flows after the stall")
    assert await forwarded_count(server) == 20


async def test_a_restarted_source_server_is_consumed_again(in_process):
    server, source, _ = in_process
    await publish(source.url, 10)
    await async_wait_until(lambda: server.stats.received == 10, 10)
    await asyncio.to_thread(source.restart)
    await async_wait_until(lambda: server.source.stats.reconnects >= 1, 15)
    await async_wait_until(lambda: server.source.subscribed and server.readiness()[0], 15)

    async def delivered_after_restart() -> bool:
        await publish(source.url, 1)  # resent until the resubscription is in place on the server
        await asyncio.sleep(0.05)
        return server.stats.received > 10

    await async_wait_until(delivered_after_restart, 15)
    assert parse_metrics(server.metrics().decode())["forwarder_source_stalls_total"] == 0
