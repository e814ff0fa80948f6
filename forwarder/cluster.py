"""``NatsCluster``: one target cluster's connection.

State transitions (connect, close) are serialised by a lock; publishing is not: the
fast path checks two attributes and hands the message to nats-py's buffered writer.
nats-py reconnects by itself (several servers fail over); we never close a client
because it is momentarily reconnecting. A publish after ``close()`` began raises
``ClusterClosedError``; ``close()`` waits for the publishes already in flight, drains
and closes, and is idempotent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.client import JetStreamContext

from .cache import ComputingCache
from .config import HEADER_NAME_RE, ClusterSettings, redact_url
from .natsconn import (
    ConnectionEvents,
    ConnectionStats,
    ResilientClient,
    confirmed_flush,
    connect_with_retry,
    header_block_size,
)


class ClusterError(Exception):
    """A publish that the cluster cannot take now."""


class ClusterClosedError(ClusterError):
    def __init__(self, name: str) -> None:
        super().__init__(f"cluster {name} is closing or closed")


class MessageTooLargeError(ClusterError):
    """Headers plus payload exceed the cluster's max_payload: it would never take it."""

    def __init__(self, name: str, size: int, limit: int) -> None:
        super().__init__(f"message of {size} bytes exceeds max_payload {limit} of cluster {name}")
        self.size = size
        self.limit = limit


class ClusterUnavailableError(ClusterError):
    def __init__(self, name: str) -> None:
        super().__init__(f"cluster {name} is not connected yet")


class NatsCluster:
    def __init__(self, settings: ClusterSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self.stats = ConnectionStats(settings.name)
        self.forwarded = 0  # messages accepted by this cluster (buffered, confirmed or acked by mode)
        self.publish_errors = 0
        self.redeliveries = 0  # naks because of this cluster (JetStream source)
        self.parked = 0  # messages parked while this cluster was down (JetStream source)
        self.grace_publishes = 0  # copies of moved assets' messages sent here during a grace window
        self.duplicates = 0  # JetStream target: publishes its stream had already (Nats-Msg-Id)
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._stream_known: dict[str, tuple[bool, float]] = {}  # subject -> (has a stream, checked at)
        self._writer: BufferedWriter | None = None
        self._pub_acks: PubAckWindow | None = None
        self._events = ConnectionEvents(self.stats, kind="cluster")
        self.log = self._events.log
        self._lock = asyncio.Lock()
        self._connecting: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._inflight = 0
        self._drained = asyncio.Event()  # set by the last in-flight publish once closing began
        self._closed_event = asyncio.Event()

    # ---- state

    @property
    def connected(self) -> bool:
        nc = self.nc
        return nc is not None and nc.is_connected

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def pending_bytes(self) -> int:
        """The outbound buffer: what waits to be written, the reconnect backlog while disconnected."""
        nc = self.nc
        return nc.pending_data_size if nc is not None else 0

    @property
    def pending_bytes_limit(self) -> int:
        return self.settings.connection.pending_size

    def subscription_pending(self) -> tuple[int, int]:
        """Messages and bytes received on this connection and not yet processed. (PubAcks are
        processed as they are read, by ``TargetClient``: they never wait here.)"""
        nc = self.nc
        if nc is None:
            return 0, 0
        subs = list(nc._subs.values())  # nats-py has no public list of a client's subscriptions
        return sum(s.pending_msgs for s in subs), sum(s.pending_bytes for s in subs)

    @property
    def max_payload(self) -> int:
        nc = self.nc
        return nc.max_payload if nc is not None and nc.is_connected else 0

    def snapshot(self) -> dict[str, Any]:
        """The cluster's state for ``/clusters``: nothing secret (URLs are redacted)."""
        state = (
            "closed"
            if self._closed
            else "closing"
            if self._closing
            else "connected"
            if self.connected
            else "reconnecting"
            if self.stats.ever_connected
            else "connecting"
        )
        return {
            "name": self.name,
            "state": state,
            "connected": self.connected,
            "server": self.stats.connected_url if self.connected else None,
            "servers": [redact_url(u) for u in self.settings.connection.servers],
            "weight": self.settings.weight,
            "jetstream": self.settings.jetstream is not None,
            "forwarded": self.forwarded,
            "publish_errors": self.publish_errors,
            "redeliveries": self.redeliveries,
            "parked": self.parked,
            "duplicates": self.duplicates,
            "reconnects": self.stats.reconnects,
            "disconnects": self.stats.disconnects,
            "pending_bytes": self.pending_bytes,
            "pending_bytes_limit": self.settings.connection.pending_size,
            "last_error": self.stats.last_error,
        }

    # ---- transitions

    async def connect(self) -> None:
        """Connect, retrying until it succeeds. Idempotent; concurrent callers share one attempt."""
        async with self._lock:
            if self._closing:
                raise ClusterClosedError(self.name)
            if self.nc is not None:
                return
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            attempt = self._connecting
        try:
            await asyncio.shield(attempt)
        except asyncio.CancelledError:
            # close() cancelled the shared attempt; a caller that was not cancelled itself
            # learns why, instead of receiving a cancellation it never asked for.
            task = asyncio.current_task()
            if attempt.cancelled() and self.closing and not (task is not None and task.cancelling()):
                raise ClusterClosedError(self.name) from None
            raise

    async def _connect(self) -> None:
        # nats-py retries the initial connect forever when max_reconnect_attempts < 0,
        # reporting each failure through error_cb (logged, rate-limited); what escapes it
        # is logged and retried by connect_with_retry.
        nc = await connect_with_retry(TargetClient, self.settings.connection, self._events)
        async with self._lock:
            if self._closing:
                await nc.close()
                raise ClusterClosedError(self.name)
            self.nc = nc
            self._writer = BufferedWriter.for_client(nc)
            if self._writer is None:
                self.log.warning("fast_publish_unavailable", reason="nats-py internals changed")
            if self.settings.jetstream is not None:
                self.js = nc.jetstream(timeout=self.settings.jetstream.ack_timeout)
                self._pub_acks = await PubAckWindow.open(nc, self.settings.jetstream.max_pending)
        await self._events.on_connected()

    async def close(self) -> None:
        """Stop accepting publishes, wait for those in flight, drain and close. Idempotent."""
        async with self._lock:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
        if already:
            await self._closed_event.wait()
            return
        self._events.closing = True
        if self._inflight:
            await self._drained.wait()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        nc = self.nc
        if nc is not None and not nc.is_closed:
            try:
                if nc.is_connected:
                    await nc.drain()  # flushes what is buffered, then closes
                else:
                    await nc.close()
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                self.log.warning("close_failed", error=str(exc))
                await nc.close()
        self._closed = True
        self._closed_event.set()
        self.log.info("cluster_closed")

    # ---- the fast path

    def _client_for(self, payload: bytes, headers: dict[str, str] | None) -> Client:
        """The connection, once we know it may take this message."""
        if self._closing:
            raise ClusterClosedError(self.name)
        nc = self.nc
        if nc is None:
            raise ClusterUnavailableError(self.name)
        size = len(payload)
        if headers is not None:
            # nats-py checks the payload alone; a server sent more than max_payload
            # including headers closes the connection, so check the sum here ({} too:
            # nats-py still sends a header block for it).
            size += header_block_size(headers)
        if size > nc.max_payload:
            raise MessageTooLargeError(self.name, size, nc.max_payload)
        return nc

    def try_publish(self, subject: str, payload: bytes) -> bool:
        """The fast path: buffer a message without headers, synchronously; False: use ``publish``.

        It declines (and ``publish`` then raises or waits, as the case needs) whenever the
        cluster is closing or the connection is anything but plainly connected with room
        in its buffer. Being synchronous, it can never interleave with ``close()``.
        """
        writer = self._writer
        return writer is not None and not self._closing and writer.write(subject, payload)

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Hand one message to the connection's buffered writer (no lock, no round trip)."""
        nc = self._client_for(payload, headers)
        self._inflight += 1
        try:
            await nc.publish(subject, payload, headers=headers)
        finally:
            self._inflight -= 1
            if self.closing and not self._inflight:  # (the property: mypy would narrow the attribute)
                self._drained.set()

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        """A JetStream publish whose PubAck (or the stream's refusal) arrives on the returned future.

        At most ``jetstream.max_pending`` publishes await their PubAck at once: past that
        this call waits, which slows the source down instead of buffering without bound.
        """
        nc = self._client_for(payload, headers)
        window = self._pub_acks
        if window is None:
            raise ClusterUnavailableError(self.name)
        self._inflight += 1
        try:
            return await window.publish(nc, self._writer, subject, payload, headers)
        finally:
            self._inflight -= 1
            if self.closing and not self._inflight:
                self._drained.set()

    async def has_stream_for(self, subject: str) -> bool:
        """Whether a JetStream stream on this cluster takes ``subject`` (cached for a few seconds).

        "No responders" to a publish also happens while a replicated stream elects a
        new leader: only the JetStream API can tell that apart from "no stream".
        """
        known = self._stream_known.get(subject)
        if known is not None and time.monotonic() - known[1] < 5.0:
            return known[0]
        js = self.js
        if js is None:
            raise ClusterUnavailableError(self.name)
        try:
            await js.find_stream_name_by_subject(subject)
            found = True
        except nats.js.errors.NotFoundError:
            found = False
        if len(self._stream_known) > 10000:
            self._stream_known.clear()
        self._stream_known[subject] = (found, time.monotonic())
        return found

    async def flush(self, timeout: float) -> None:
        """One round trip: when it returns, the server has every byte published before it."""
        nc = self.nc
        if nc is None:
            raise ClusterUnavailableError(self.name)
        await confirmed_flush(nc, timeout)


ReplyHandler = Callable[[bytes, bytes, bytes | None], None]  # (subject, payload, header block)


class TargetClient(ResilientClient):
    """nats-py's client for a target cluster; the PubAck inbox's replies skip its dispatch.

    nats-py hands every message to a subscription through a ``Msg``, the subscription's
    queue and its task: several microseconds, once per JetStream publish. The replies to
    the PubAck window's inbox (its subscription's ``sid``) go to ``on_reply`` from the
    read loop instead, as the bytes came; every other message takes nats-py's path.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reply_sid = -1
        self.on_reply: ReplyHandler | None = None

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        on_reply = self.on_reply
        if sid != self.reply_sid or on_reply is None:
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        on_reply(subject, data, headers)


class BufferedWriter:
    """Appends PUB commands straight to a nats-py client's write buffer.

    nats-py's ``publish`` is a chain of three coroutines that formats the command from
    scratch and creates a Future to wake its flusher each time the buffer was empty:
    about a third of a relay's per-message cost. This writes the same bytes into the
    same buffer (``_pending``), with the ``PUB <subject> `` prefix cached per subject,
    and wakes the same flusher task with one Future that is always done (the flusher
    only resolves futures that are not). It relies on nats-py internals, checked once
    per connection by ``for_client``; the dependency is pinned to a minor version.
    """

    __slots__ = ("_header_names", "_kick", "_nc", "_prefixes", "_queue")

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        assert nc._flush_queue is not None  # for_client checked it
        self._queue: asyncio.Queue[asyncio.Future[Any]] = nc._flush_queue
        self._kick: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._kick.set_result(None)
        self._prefixes: ComputingCache[str, bytes] = ComputingCache(
            lambda subject: b"PUB %b " % subject.encode(), 65536
        )
        self._header_names: ComputingCache[str, bytes] = ComputingCache(header_name, 1024)

    @classmethod
    def for_client(cls, nc: Client) -> BufferedWriter | None:
        needed = (
            "_pending",
            "_pending_data_size",
            "_max_pending_size",
            "_max_payload",
            "_status",
            "_flush_queue",
            "_flusher_task",
        )
        if all(hasattr(nc, name) for name in needed) and isinstance(nc._flush_queue, asyncio.Queue):
            return cls(nc)
        return None

    def write(self, subject: str, payload: bytes) -> bool:
        nc = self._nc
        if (
            nc._status != Client.CONNECTED
            or nc._pending_data_size > nc._max_pending_size
            or len(payload) > nc._max_payload
        ):
            return False
        kick = self._queue.empty()  # the first write since the flusher last ran
        if kick and not self._flusher_alive(nc):
            return False
        command = b"%b%d\r\n%b\r\n" % (self._prefixes[subject], len(payload), payload)
        self._append(nc, command, kick)
        return True

    def write_with_headers(self, subject: str, reply: bytes, headers: dict[str, str], payload: bytes) -> bool:
        """An ``HPUB`` with a reply subject, the bytes nats-py's ``publish`` would write; False
        (nothing written) where ``write`` declines or a header name is one nats-py would skip
        or refuse: its ``publish`` then says so. The caller has checked the size."""
        nc = self._nc
        if nc._status != Client.CONNECTED or nc._pending_data_size > nc._max_pending_size:
            return False
        kick = self._queue.empty()
        if kick and not self._flusher_alive(nc):
            return False
        names = self._header_names
        block = [b"NATS/1.0\r\n"]
        for key, value in headers.items():
            name = names[key]
            if not name:
                return False
            value = value.strip()
            if "\r" in value or "\n" in value:  # (str.translate: 0.5 µs even with nothing to replace)
                value = value.replace("\r", " ").replace("\n", " ")
            block.append(b"%b%b\r\n" % (name, value.encode()))
        block.append(b"\r\n")
        header = b"".join(block)
        size = len(header)
        command = b"H%b%b %d %d\r\n%b%b\r\n" % (
            self._prefixes[subject],
            reply,
            size,
            size + len(payload),
            header,
            payload,
        )
        self._append(nc, command, kick)
        return True

    @staticmethod
    def _flusher_alive(nc: Client) -> bool:
        """Whether nats-py's flusher task is there to send what a kick asks for (checked when
        one is due: once per batch). Without it, nats-py's ``publish`` flushes inline."""
        task = nc._flusher_task
        return task is not None and not task.done()

    def _append(self, nc: Client, command: bytes, kick: bool) -> None:
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        if kick:
            self._queue.put_nowait(self._kick)


def header_name(key: str) -> bytes:
    """``b"Name: "`` as nats-py writes a header's name; ``b""`` for one it would skip (blank) or
    refuse (``BadHeaderError``)."""
    name = key.strip()
    return b"%b: " % name.encode() if name and HEADER_NAME_RE.fullmatch(name) else b""


class PubAckWindow:
    """JetStream publishes whose PubAcks come back on one wildcard inbox, at most N at once.

    nats-py's ``publish_async`` draws a NUID and random bytes per publish, parses every
    PubAck as JSON and, on a stream's refusal, raises inside its reply handler, so the
    future is never resolved: a message the stream refuses for good (``max_msg_size``)
    would time out and be redelivered forever. Here a publish's reply subject is the
    inbox plus a counter; a PubAck resolves its future, a refusal sets the ``APIError``
    on it, "no responders" sets ``NoStreamResponseError``.
    """

    def __init__(self, prefix: str, max_pending: int) -> None:
        self._prefix = prefix.encode()
        self._futures: dict[bytes, asyncio.Future[PubAck]] = {}
        self._next = 0
        # A counter and an event, not an asyncio.Semaphore: its acquire() scans every
        # waiter on each call (locked()), which showed in profiles once the window was
        # full. Waking every waiter on a free place is fine: there are few.
        self._free = max_pending
        self._room = asyncio.Event()

    @classmethod
    async def open(cls, nc: Client, max_pending: int) -> PubAckWindow:
        window = cls(nc.new_inbox() + ".", max_pending)
        sub = await nc.subscribe(window._prefix.decode() + "*", cb=window._on_reply)
        if isinstance(nc, TargetClient):
            nc.reply_sid, nc.on_reply = sub._id, window.settle
        return window

    async def publish(
        self,
        nc: Client,
        writer: BufferedWriter | None,
        subject: str,
        payload: bytes,
        headers: dict[str, str],
    ) -> asyncio.Future[PubAck]:
        while self._free <= 0:
            self._room.clear()
            await self._room.wait()
        self._free -= 1
        self._next += 1
        token = b"%d" % self._next
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._futures[token] = future
        future.add_done_callback(lambda _, token=token: self._settled(token))  # type: ignore[misc]
        reply = self._prefix + token
        try:
            if writer is None or not writer.write_with_headers(subject, reply, headers, payload):
                await nc.publish(subject, payload, reply=reply.decode(), headers=headers)
        except BaseException:
            future.cancel()
            raise
        return future

    def _settled(self, token: bytes) -> None:
        self._futures.pop(token, None)
        self._free += 1
        self._room.set()

    async def _on_reply(self, msg: Msg) -> None:
        """A reply through nats-py's dispatch (a client other than ``TargetClient``)."""
        no_responders = not msg.data and msg.headers is not None and msg.headers.get("Status") == "503"
        self._resolve(msg.subject.encode(), msg.data, no_responders)

    def settle(self, subject: bytes, data: bytes, headers: bytes | None) -> None:
        """A reply as the read loop parsed it (``TargetClient``): it must not raise there."""
        no_responders = not data and headers is not None and headers.startswith(b"NATS/1.0 503")
        self._resolve(subject, data, no_responders)

    def _resolve(self, subject: bytes, data: bytes, no_responders: bool) -> None:
        future = self._futures.get(subject[len(self._prefix) :])
        if future is None or future.done():
            return
        if no_responders:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:  # anything at all: this may run in nats-py's read loop, which an exception would end
            reply = json.loads(data)
            if "error" in reply:
                error = reply["error"]
                future.set_exception(
                    nats.js.errors.APIError(
                        code=error.get("code"),
                        err_code=error.get("err_code"),
                        description=error.get("description"),
                    )
                )
            else:
                # The fields we read, without from_response's dataclass reflection per PubAck.
                pub_ack = PubAck(stream=reply["stream"], seq=reply["seq"], duplicate=reply.get("duplicate"))
                future.set_result(pub_ack)
        except Exception as exc:
            future.set_exception(nats.js.errors.Error(f"unreadable PubAck: {type(exc).__name__}"))
