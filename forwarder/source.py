"""Consume asset messages from the source NATS.

``CoreSource``: a core subscription with a queue group (at-most-once, like core NATS).
The JetStream source (a durable consumer, at-least-once) lives in ``jetstream.py``.

The source connection is a ``SourceClient``: nats-py's client with two repairs for
hostile producers (a subject that is not UTF-8 no longer kills the read loop) and a
receipt timestamp on every message, so the latency histogram includes the time a
message waited in the subscription's pending queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .config import SourceSettings
from .natsconn import ConnectionEvents, ConnectionStats, connect_options

MessageHandler = Callable[[Msg], Awaitable[None]]


@dataclass
class SourceMsg(Msg):
    """A message stamped with ``time.perf_counter()`` when nats-py decoded it."""

    received_at: float = 0.0


class SourceClient(Client):
    """nats-py's client, hardened for messages that any producer can send."""

    msg_class = SourceMsg

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> SourceMsg:
        # nats-py decodes the subject strictly: a single non-UTF-8 byte raises inside the
        # read loop and silently ends it. Undecodable bytes become lone surrogates here,
        # which the router recognises and dead-letters.
        return SourceMsg(
            _client=self,
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers,
            _sid=sid,
            received_at=time.perf_counter(),
        )

    @property
    def read_loop_alive(self) -> bool:
        """False when nats-py's read loop ended while the client believes it is connected."""
        task = self._reading_task
        return not (self.is_connected and task is not None and task.done())


class CoreSource:
    """A core NATS subscription (queue group) on the source subject."""

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.stats = ConnectionStats("source")
        self._events = ConnectionEvents(self.stats, kind="connection")
        self.log = self._events.log
        self.nc: SourceClient | None = None
        self.sub: Subscription | None = None
        self.stalls = 0  # read loops found dead and restarted

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def subscribed(self) -> bool:
        return self.sub is not None and self.connected

    @property
    def pending_msgs(self) -> int:
        return self.sub.pending_msgs if self.sub is not None else 0

    @property
    def pending_bytes(self) -> int:
        return self.sub.pending_bytes if self.sub is not None else 0

    @property
    def pending_bytes_limit(self) -> int:
        return self.settings.pending_bytes_limit

    def lag(self) -> int | None:
        """Core NATS keeps no backlog to measure: no lag metric in this mode."""
        return None

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload if self.nc is not None and self.nc.is_connected else 0

    async def connect(self) -> None:
        nc = SourceClient()
        self._events.client = nc
        await nc.connect(**connect_options(self.settings.connection, self._events))
        self.nc = nc
        await self._events.on_connected()

    async def start(self, handler: MessageHandler) -> None:
        """Connect (retrying until it succeeds) and subscribe ``handler``."""
        if self.nc is None:
            await self.connect()
        assert self.nc is not None
        self.sub = await self.nc.subscribe(
            self.settings.subject,
            queue=self.settings.queue_group or "",
            cb=handler,
            pending_msgs_limit=self.settings.pending_msgs_limit,
            pending_bytes_limit=self.settings.pending_bytes_limit,
        )
        self.log.info("subscribed", subject=self.settings.subject, queue_group=self.settings.queue_group)

    async def check(self) -> None:
        """Housekeeping: a read loop that died while 'connected' is restarted and counted."""
        nc = self.nc
        if nc is not None and not nc.read_loop_alive:
            self.stalls += 1
            self.log.error("source_read_loop_died", action="reconnecting")
            await nc.force_reconnect()

    async def stop(self) -> None:
        """Stop taking new messages; messages already received are still handled."""
        sub, self.sub = self.sub, None
        if sub is not None and self.connected:
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # the connection may be going away: nothing left to drain
                self.log.warning("source_drain_failed", error=str(exc))

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish on the source connection (dead letters)."""
        nc = self.nc
        if nc is None:
            raise ConnectionError("source is not connected")
        await nc.publish(subject, payload, headers=headers)

    async def flush(self, timeout: float) -> None:
        if self.nc is not None and self.nc.is_connected:
            await self.nc.flush(timeout=timeout)  # type: ignore[arg-type]

    async def close(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except Exception as exc:
                self.log.warning("source_close_failed", error=str(exc))
                await nc.close()

    def describe(self) -> dict[str, Any]:
        return {
            "subscribed": self.subscribed,
            "connected": self.connected,
            "server": self.stats.connected_url if self.connected else None,
            "subject": self.settings.subject,
            "queue_group": self.settings.queue_group,
            "pending_msgs": self.pending_msgs,
            "pending_bytes": self.pending_bytes,
            "last_error": self.stats.last_error,
        }
