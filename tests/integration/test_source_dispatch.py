"""The source's own dispatch (``SourceClient._process_msg`` and ``CoreSource``'s consume loop)
against a real server, where it departs from nats-py's: the JetStream bookkeeping of
messages dropped as a slow consumer, and where a latency batch ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats as nats_py
import pytest

from forwarder.config import ConnectionSettings, JetStreamSourceSettings, SourceSettings
from forwarder.embedded import LocalServer
from forwarder.pipeline import CorePipeline
from forwarder.source import CoreSource, JetStreamSource
from forwarder.stats import ForwardingStats
from tests.helpers import async_wait_until

pytestmark = pytest.mark.integration


async def test_messages_dropped_for_a_full_queue_keep_the_jetstream_heartbeat_bookkeeping(
    source_server: LocalServer,
) -> None:
    """nats-py tracks the sequence of a JetStream message even when a full pending queue
    drops it; without that, the next idle heartbeat reports a sequence mismatch as a
    connection error (and in /readyz's last error)."""
    publisher = await nats_py.connect(source_server.url)
    try:
        js = publisher.jetstream()
        await js.add_stream(name="S", subjects=["assets.>"])
        for i in range(3000):
            await publisher.publish(f"assets.a{i % 10}.v", b"x" * 512)
        await publisher.flush()
        settings = SourceSettings(
            ConnectionSettings(servers=(source_server.url,), name="source"),
            subject="assets.>",
            pending_msgs_limit=100,  # far below what arrives at once: drops, then redeliveries
            jetstream=JetStreamSourceSettings(
                stream="S", durable="D", ack_wait=1.0, backoff=(), idle_heartbeat=0.5, park_stream=None
            ),
        )
        source = JetStreamSource(settings)
        seen: set[int] = set()

        async def handler(msg: Any) -> None:
            seen.add(msg.metadata.sequence.stream)
            await asyncio.sleep(0)  # a little slower than the reader
            await source.ack([msg])

        # Heartbeats go to the consumer's deliver subject: a plain subscriber there counts them.
        heartbeats = 0

        async def on_deliver(msg: Any) -> None:
            nonlocal heartbeats
            if msg.headers and msg.headers.get("Status") == "100" and not msg.reply:
                heartbeats += 1

        await source.start(handler)
        try:
            assert source.sub is not None
            await publisher.subscribe(source.sub.subject, cb=on_deliver)
            await async_wait_until(lambda: len(seen) == 3000, timeout=60, message="every message delivered")
            assert source.stats.slow_consumer_dropped > 0, "the test needs drops to mean anything"
            after = heartbeats
            await async_wait_until(lambda: heartbeats >= after + 2, timeout=10, message="two idle heartbeats")
            assert source.stats.errors == 0, source.stats.last_error
            assert source.stats.last_error is None
        finally:
            await source.stop()
            await source.close()
    finally:
        await publisher.close()


class BufferingCluster:
    """A healthy target: every publish fits its buffer."""

    name = "fast"
    forwarded = 0
    publish_errors = 0

    def try_publish(self, subject: str, data: bytes) -> bool:
        return True


class FullCluster:
    """A target whose buffer is full: ``publish`` waits until the test lets it go on."""

    name = "full"
    forwarded = 0
    publish_errors = 0

    def __init__(self) -> None:
        self.waiting = 0
        self.go_on = asyncio.Event()

    def try_publish(self, subject: str, data: bytes) -> bool:
        return False

    async def publish(self, subject: str, data: bytes, headers: Any = None) -> None:
        self.waiting += 1
        await self.go_on.wait()


async def test_a_message_that_awaits_ends_the_latency_batch_first(target_server: LocalServer) -> None:
    """The fast path's latencies are observed at the latest when the loop yields: otherwise a
    steady trickle of messages that await (a full buffer, a reconnecting target) keeps the
    batch open while the reader refills the queue, and the histogram falls behind the count."""
    stats = ForwardingStats()
    pipeline = CorePipeline(dead_letters=None, stats=stats)  # type: ignore[arg-type]
    fast, full = BufferingCluster(), FullCluster()
    pipeline.use(lambda subject, _headers, _data: (full if subject.endswith(".full") else fast, subject))
    source = CoreSource(
        SourceSettings(ConnectionSettings(servers=(target_server.url,), name="source"), subject="assets.>")
    )
    await source.start(pipeline.handle, pipeline.handle_nowait, pipeline.batch_done)
    publisher = await nats_py.connect(target_server.url)
    try:
        # One flush: the forwarder reads these in one batch (or a few), the full one last.
        for i in range(200):
            await publisher.publish(f"assets.a{i}.v", b"x")
        await publisher.publish("assets.b.full", b"x")
        await publisher.flush()
        await async_wait_until(lambda: full.waiting == 1, timeout=10, message="the full target's publish")
        # While it waits, the 200 already forwarded are observed, not held for the batch's end.
        assert (stats.received, stats.latency.count) == (201, 200)
        full.go_on.set()
        await async_wait_until(lambda: stats.latency.count == 201, timeout=10, message="the last observed")
    finally:
        full.go_on.set()
        await publisher.close()
        await source.stop()
        await source.close()


async def test_stop_after_the_connection_is_lost_handles_what_had_arrived(nats_servers: Any) -> None:
    """Core source: messages already in the subscription's queue when the source server went
    away are still handled (forwarded or dead-lettered, and counted) by ``stop()``."""
    server = nats_servers.server(name="source")
    stats = ForwardingStats()
    pipeline = CorePipeline(dead_letters=None, stats=stats)  # type: ignore[arg-type]
    fast, full = BufferingCluster(), FullCluster()
    pipeline.use(lambda subject, _headers, _data: (full if subject.endswith(".full") else fast, subject))
    source = CoreSource(
        SourceSettings(ConnectionSettings(servers=(server.url,), name="source", reconnect_time_wait=30),
                       subject="assets.>")
    )  # fmt: skip
    await source.start(pipeline.handle, pipeline.handle_nowait, pipeline.batch_done)
    publisher = await nats_py.connect(server.url)
    try:
        await publisher.publish("assets.first.full", b"x")  # holds the consume loop
        for i in range(100):
            await publisher.publish(f"assets.a{i}.v", b"x")
        await publisher.flush()
        await async_wait_until(lambda: full.waiting == 1, timeout=10, message="the full target's publish")
        await async_wait_until(lambda: source.sub is not None and source.sub.pending_msgs == 100, timeout=10)
        await publisher.close()
        server.kill()
        await async_wait_until(lambda: not source.connected, timeout=10, message="the source disconnected")
        stopping = asyncio.create_task(source.stop())
        full.go_on.set()
        await asyncio.wait_for(stopping, 10)
        assert stats.received == 101
        assert stats.latency.count == 101  # every one observed, the fast path's last batch too
    finally:
        full.go_on.set()
        await publisher.close()
        await source.close()


async def test_jetstream_deliveries_take_the_queue_behind_them_in_order_with_exact_pending_counts(
    source_server: LocalServer,
) -> None:
    """JetStream source with a fast path: nats-py's delivery task awaits the callback for one
    message and the callback takes what queued up behind it, ``fast`` first, the handler for
    what ``fast`` declines, in stream order. A handler that raises is counted and the rest
    still flows; flow control keeps the backlog moving; the queue's counts end at zero."""
    publisher = await nats_py.connect(source_server.url)
    source = None
    try:
        js = publisher.jetstream()
        await js.add_stream(name="S", subjects=["assets.>"])
        total = 3000
        for i in range(total):
            headers = {"Kind": "slow"} if i % 100 == 7 else None
            subject = "assets.boom.v" if i == 1500 else f"assets.a{i}.v"
            await publisher.publish(subject, b"x" * 512, headers=headers)
        await publisher.flush()
        settings = SourceSettings(
            ConnectionSettings(servers=(source_server.url,), name="source"),
            subject="assets.>",
            jetstream=JetStreamSourceSettings(
                stream="S", durable="D", ack_wait=30.0, backoff=(), idle_heartbeat=0.5, park_stream=None
            ),
        )
        source = JetStreamSource(settings)
        order: list[int] = []
        taken: list[Any] = []
        awaited = 0

        def fast(msg: Any) -> bool:
            if msg.headers is not None or msg.subject == "assets.boom.v":
                return False
            order.append(msg.metadata.sequence.stream)
            taken.append(msg)
            return True

        async def handler(msg: Any) -> None:
            nonlocal awaited
            awaited += 1
            await asyncio.sleep(0)  # a handler that really awaits: more arrives meanwhile
            if msg.subject == "assets.boom.v":
                raise RuntimeError("boom")
            order.append(msg.metadata.sequence.stream)
            taken.append(msg)

        await source.start(handler, fast)
        await async_wait_until(lambda: len(order) == total - 1, timeout=60, message="every message handled")
        assert order == sorted(order)  # stream order, the awaited ones in their places
        assert 1501 not in order
        assert len(set(order)) == total - 1
        assert awaited == total // 100 + 1  # the 30 with headers and the one that raised
        assert source.stats.errors == 1
        assert source.sub is not None
        assert (source.sub.pending_msgs, source.sub.pending_bytes) == (0, 0)
        await source.ack(taken)
    finally:
        if source is not None:
            await source.stop()
            await source.close()
        await publisher.close()
