"""Consume asset messages from the source NATS.

``CoreSource``: a core subscription with a queue group (at-most-once, like core NATS).
``JetStreamSource``: a durable push consumer with a deliver group, flow control and
idle heartbeats, shared by every replica; messages are acknowledged (in batches) or
negatively acknowledged with a back-off by the acking pipeline.

The source connection is a ``SourceClient``: nats-py's client with repairs for hostile
producers (a subject that is not UTF-8 or holds a vertical tab or form feed, a header
block nats-py cannot parse: none of them stops the read loop or drops the connection
any more; docs/upstream-nats-py.md) and a receipt timestamp on every message, so the
latency histogram includes the time a message waited in the subscription's pending queue.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck, RetentionPolicy, StreamConfig
from nats.protocol import parser as nats_parser

from .config import HEADER_NAME_RE, JetStreamSourceSettings, SourceSettings
from .logs import RateLimitedLogger
from .natsconn import ConnectionEvents, ConnectionStats, ResilientClient, confirmed_flush, connect_with_retry
from .router import MalformedHeaders

MessageHandler = Callable[[Msg], Awaitable[None]]
FastHandler = Callable[[Msg], bool]  # handles a message without awaiting, or returns False
BatchDone = Callable[[], None]  # after the messages one read brought were handled
QUEUE_EMPTY_TIMEOUT = 5.0  # seconds stop() waits for messages received before a lost connection


@dataclass
class SourceMsg(Msg):
    """A message stamped with ``time.perf_counter()`` of the socket read that brought it
    (every message of one read shares the stamp)."""

    received_at: float = 0.0
    reply_bytes: bytes = b""  # the reply subject as it came: acks are written with it, not re-encoded
    origin_id: str | None = None  # ``stream:seq`` of the source message a parked copy stands for


# SourceClient._build_message passes these by position; a nats-py that changed its Msg
# fields would fail tests/test_source_parser.py's check of this tuple, not forward garbled messages.
SOURCE_MSG_FIELDS = (
    "_client",
    "subject",
    "reply",
    "data",
    "headers",
    "_metadata",
    "_ackd",
    "_sid",
    "received_at",
    "reply_bytes",
    "origin_id",
)


# nats-py's MSG and HMSG patterns separate fields by any regex whitespace (``\s``, which
# includes \v and \f); the server separates them by spaces and tabs only, and \v and \f
# are ordinary subject bytes to it. A subject holding one made nats-py misread the line:
# a ProtocolError (reconnect, losing what was in flight) or the wrong subject and sid.
MSG_RE = re.compile(rb"\AMSG[ \t]+([^ \t\r\n]+)[ \t]+([^ \t\r\n]+)[ \t]+(([^ \t\r\n]+)[ \t]+)?(\d+)\r\n")
HMSG_RE = re.compile(
    rb"\AHMSG[ \t]+([^ \t\r\n]+)[ \t]+([^ \t\r\n]+)[ \t]+(([^ \t\r\n]+)[ \t]+)?(\d+)[ \t]+(\d+)\r\n"
)


MSG_AT = re.compile(MSG_RE.pattern[2:])  # the same, anchored wherever match() starts
HMSG_AT = re.compile(HMSG_RE.pattern[2:])
_CONTROL, _PAYLOAD = nats_parser.AWAITING_CONTROL_LINE, nats_parser.AWAITING_MSG_PAYLOAD


class SourceParser(nats_parser.Parser):
    """nats-py's protocol parser with the two patterns above, and a faster loop for messages.

    nats-py deletes each parsed message from the front of its read buffer, which moves
    the rest of the buffer every time (a tenth of a relay's time). Here MSG and HMSG are
    parsed at an offset and the buffer is compacted once per read; anything else (PING,
    INFO, -ERR, a line not complete yet) goes to nats-py's own loop, as before.
    """

    _nats_py_parse = types.FunctionType(
        nats_parser.Parser.parse.__code__,
        {**vars(nats_parser), "MSG_RE": MSG_RE, "HMSG_RE": HMSG_RE},
        "parse",
        nats_parser.Parser.parse.__defaults__,
    )

    async def parse(self, data: bytes = b"") -> None:
        buf = self.buf
        buf.extend(data)
        nc = self.nc
        nc.read_at = time.perf_counter()  # every message of this read arrived now
        arg = self.msg_arg
        pos = 0
        try:
            while pos < len(buf):
                if self.state == _CONTROL:
                    m = MSG_AT.match(buf, pos)
                    if m is not None:
                        subject, sid, _, reply, size = m.groups()
                        header_size = b"0"
                    else:
                        m = HMSG_AT.match(buf, pos)
                        if m is None:
                            break  # not a message line: nats-py's loop takes it from here
                        subject, sid, _, reply, header_size, size = m.groups()
                    try:
                        arg["sid"] = int(sid)
                        self.needed = int(size)
                        self.header_needed = int(header_size)
                    except ValueError:
                        raise nats.errors.ProtocolError("nats: malformed MSG") from None
                    arg["subject"] = subject
                    arg["reply"] = reply or b""
                    pos = m.end()
                    self.state = _PAYLOAD
                end = pos + self.needed
                if len(buf) < end + 2:
                    break  # the rest of this message comes with the next read
                headers_end = pos + self.header_needed
                headers = bytes(buf[pos:headers_end]) if self.header_needed else None
                payload = bytes(buf[headers_end:end])
                self.header_needed = 0
                self.state = _CONTROL
                pos = end + 2
                await nc._process_msg(arg["sid"], arg["subject"], arg["reply"], payload, headers)
                if self.buf is not buf:  # a reconnect reset the parser: this buffer is gone
                    return
        finally:
            if pos:
                del buf[:pos]
        if buf and self.state == _CONTROL and self.buf is buf:
            await self._nats_py_parse()


class SourceClient(ResilientClient):
    """nats-py's client, hardened for messages that any producer can send."""

    msg_class = SourceMsg

    def __init__(self) -> None:
        super().__init__()
        self._ps = SourceParser(self)
        self.read_at = time.perf_counter()  # when the socket read being parsed arrived

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        """nats-py's header parsing, made safe, and exact about what it would lose.

        nats-py raises inside the read loop (which then ends silently) on a block shorter
        than ``NATS/1.0`` plus one byte and on a status line that is not UTF-8; it drops
        lines that are not ``Name: value``, keeps one value of a repeated name, turns bytes
        that are not UTF-8 into U+FFFD and a status line into a ``Status`` header. A message
        that would not be forwarded as it came gets ``MalformedHeaders``, which
        dead-letters it with the reason (values are trimmed, as NATS clients do). Messages
        without headers return at once, as in nats-py; well-formed ones pay a few byte counts.
        """
        if not headers:
            return None
        if not headers.startswith(b"NATS/1.0\r\n"):
            if headers.startswith(b"NATS/1.0 100 "):  # JetStream heartbeat, flow control: nats-py's own
                try:
                    return await super()._process_headers(headers)
                except Exception:
                    return MalformedHeaders("header status line is malformed")
            if headers[8:9] == b" ":  # a status line from a producer would be forwarded as a header
                return MalformedHeaders("header block has a status line")
            return MalformedHeaders("header block does not begin with a NATS/1.0 line")
        # What nats-py does here for a block without a status line, minus a coroutine call.
        parsed = self._parse_header_lines(headers[10:])
        lines = headers.count(b"\r\n")
        if lines - 2 != len(parsed) or "" in parsed:
            return MalformedHeaders(_header_lines_problem(headers))
        if headers.count(b"\r") != lines or headers.count(b"\n") != lines:
            return MalformedHeaders("a header holds a bare CR or LF")
        if not headers.isascii():
            try:
                headers.decode("utf-8")
            except UnicodeDecodeError:
                return MalformedHeaders("a header is not valid UTF-8")
        return parsed or None

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        """nats-py's message dispatch, without its general machinery for the common case.

        A message without headers for the core source's subscription (no callback) or for
        a JetStream push subscription (a data message: control messages carry headers)
        goes straight into the subscription's pending queue, with nats-py's own
        slow-consumer rules and JetStream bookkeeping; everything else (headers, ordered
        consumers, requests, auto-unsubscribe) takes nats-py's path.
        """
        sub = self._subs.get(sid)
        jsi = sub._jsi if sub is not None else None
        if (
            headers
            or sub is None
            or sub._future is not None
            or sub._max_msgs
            or (sub._cb is not None and jsi is None)
            or (jsi is not None and jsi._ordered)
        ):
            await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
            return
        size = len(data)
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += size
        sub._received += 1
        msg = self._build_message(sid, subject, reply, data, None)
        if jsi is not None:
            jsi._active = True
        # nats-py's order, step for step: over the bytes limit the message is dropped
        # untracked; a full queue drops it but still tracks its sequence, or the next idle
        # heartbeat would report a sequence mismatch.
        sub._pending_size += size
        if 0 < sub._pending_bytes_limit <= sub._pending_size:
            sub._pending_size -= size
            await self._error_cb(
                nats.errors.SlowConsumerError(subject=msg.subject, reply=msg.reply, sid=sid, sub=sub)
            )
            return
        try:
            sub._pending_queue.put_nowait(msg)
        except asyncio.QueueFull:
            sub._pending_size -= size
            await self._error_cb(
                nats.errors.SlowConsumerError(subject=msg.subject, reply=msg.reply, sid=sid, sub=sub)
            )
        if jsi is not None:  # what nats-py does for a JetStream data message (heartbeats, flow control)
            jsi.track_sequences(msg.reply)

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> SourceMsg:
        # nats-py decodes the subject strictly: a single non-UTF-8 byte raises inside the
        # read loop and silently ends it. Undecodable bytes become lone surrogates here,
        # which the router recognises and dead-letters. The fields by position (the order
        # of SOURCE_MSG_FIELDS): by keyword, the dataclass's __init__ takes twice as long.
        return SourceMsg(
            self,
            subject.decode("utf-8", "surrogateescape"),
            reply.decode("utf-8", "surrogateescape"),
            data,
            headers,
            None,
            False,
            sid,
            self.read_at,
            reply,
        )

    async def send_empty(self, subjects: list[bytes]) -> None:
        """An empty message to each subject, in one buffered write: the acks of a confirmed batch.

        nats-py's ``publish`` is a coroutine chain per message; acknowledging a batch of a
        thousand messages that way costs more than forwarding them did. One join builds
        every ``PUB <reply> 0`` command at once.
        """
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        await self._send_command(b"PUB " + b" 0\r\n\r\nPUB ".join(subjects) + b" 0\r\n\r\n")
        await self._flush_pending()

    @property
    def read_loop_alive(self) -> bool:
        """False when nats-py's read loop ended while the client believes it is connected."""
        task = self._reading_task
        return not (self.is_connected and task is not None and task.done())


def _header_lines_problem(block: bytes) -> str:
    """Why nats-py read fewer headers than ``block`` has lines (the rare, slow path)."""
    seen: set[bytes] = set()
    for line in block.split(b"\r\n")[1:-2]:
        name, colon, _ = line.partition(b":")
        name = name.strip()
        if not colon or not HEADER_NAME_RE.match(name.decode("latin-1")):
            return "a header line is not 'Name: value'"
        if name in seen:
            return f"header {name.decode('ascii')} appears more than once"
        seen.add(name)
    return "header block is malformed"


class UnstampedSourceClient(SourceClient):
    """No receipt stamp: ``FORWARDER_ACCOUNTING=off`` (the benchmark's accounting-cost switch)."""

    def _build_message(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> SourceMsg:
        return SourceMsg(
            self,
            subject.decode("utf-8", "surrogateescape"),
            reply.decode("utf-8", "surrogateescape"),
            data,
            headers,
            None,
            False,
            sid,
        )


def _nothing() -> None:
    pass


class QueueConsumer:
    """Takes messages off a subscription's pending queue, what one read of the socket brought
    at a time, calling ``fast`` first and awaiting ``handler`` only for a message ``fast``
    declined, and ``batch_done`` once the queue is empty again (before the buffered publishes
    go out: nothing is written to a socket until the consumer yields). No await, and no
    coroutine, per message: nats-py's delivery task pays two."""

    def __init__(
        self,
        fast: FastHandler,
        handler: MessageHandler,
        batch_done: BatchDone,
        stats: ConnectionStats,
        log: Any,
    ) -> None:
        self.fast = fast
        self.handler = handler
        self.batch_done = batch_done
        self.stats = stats
        self.log = RateLimitedLogger(log)

    async def drain(self, sub: Subscription | None, msg: Msg, taken: bool) -> None:
        """``msg`` and then whatever else ``sub``'s queue holds. ``taken``: we took ``msg`` off the
        queue and account for it (False: nats-py's delivery task did and does)."""
        fast, handler, batch_done = self.fast, self.handler, self.batch_done
        queue = sub._pending_queue if sub is not None else None
        while True:  # what one read of the socket brought, then back to the event loop
            if taken:
                sub._pending_size -= len(msg.data)  # type: ignore[union-attr]
            try:
                if not fast(msg):
                    # The batch ends wherever the loop yields: a steady trickle of messages
                    # that await must not keep it open while the reader refills the queue.
                    batch_done()
                    await handler(msg)
            except Exception as exc:  # a bug must not stop consuming; counted like nats-py's
                self.stats.errors += 1
                self.log.error("handler_failed", type(exc).__name__, error=repr(exc)[:300])
            finally:
                if taken:
                    queue.task_done()  # type: ignore[union-attr]
            if queue is None:
                break
            try:
                msg = queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            taken = True
        try:
            batch_done()
        except Exception as exc:
            self.stats.errors += 1
            self.log.error("batch_done_failed", type(exc).__name__, error=repr(exc)[:300])


class CoreSource:
    """A core NATS subscription (queue group) on the source subject."""

    client_class: type[SourceClient] = SourceClient

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self.stats = ConnectionStats("source")
        self._events = ConnectionEvents(self.stats, kind="connection")
        self.log = self._events.log
        self.nc: SourceClient | None = None
        self.sub: Subscription | None = None
        self.stalls = 0  # read loops found dead and restarted
        self._consumer: asyncio.Task[None] | None = None
        self._consumer_args: tuple[Subscription, QueueConsumer] | None = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def client(self) -> SourceClient:
        """The source connection (for the topology bucket, which lives there too)."""
        if self.nc is None:
            raise ConnectionError("source is not connected")
        return self.nc

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
        self.nc = await connect_with_retry(self.client_class, self.settings.connection, self._events)
        await self._events.on_connected()

    async def start(
        self, handler: MessageHandler, fast: FastHandler | None = None, batch_done: BatchDone | None = None
    ) -> None:
        """Connect (retrying until it succeeds) and subscribe ``handler``.

        With ``fast``, our own loop takes the messages from the subscription's pending
        queue (the same bounded queue, so the same slow-consumer limits) instead of
        nats-py's: it drains what is there without an await per message and calls
        ``fast`` first, awaiting ``handler`` only for a message ``fast`` declined, and
        ``batch_done`` once the queue is empty again (before the buffered publishes go
        out: nothing is written to a socket until this loop yields).
        """
        if self.nc is None:
            await self.connect()
        assert self.nc is not None
        self.sub = await self.nc.subscribe(
            self.settings.subject,
            queue=self.settings.queue_group or "",
            cb=None if fast is not None else handler,
            pending_msgs_limit=self.settings.pending_msgs_limit,
            pending_bytes_limit=self.settings.pending_bytes_limit,
        )
        if fast is not None:
            self._consumer_args = (self.sub, self._queue_consumer(handler, fast, batch_done))
            self._start_consumer()
        await confirmed_flush(self.nc, 5.0)  # "subscribed" means the server has it
        self.log.info("subscribed", subject=self.settings.subject, queue_group=self.settings.queue_group)

    def _queue_consumer(
        self, handler: MessageHandler, fast: FastHandler, batch_done: BatchDone | None
    ) -> QueueConsumer:
        return QueueConsumer(fast, handler, batch_done or _nothing, self.stats, self.log)

    def _start_consumer(self) -> None:
        assert self._consumer_args is not None
        self._consumer = asyncio.get_running_loop().create_task(
            self._run_consumer(*self._consumer_args), name="source-consumer"
        )

    async def _run_consumer(self, sub: Subscription, consumer: QueueConsumer) -> None:
        queue = sub._pending_queue
        while True:
            await consumer.drain(sub, await queue.get(), taken=True)

    async def check(self) -> None:
        """Housekeeping: a read loop that died while 'connected' is restarted and counted;
        so is a consume loop that ended (it catches every error, so only a bug ends it)."""
        nc = self.nc
        if nc is not None and not nc.read_loop_alive:
            self.stalls += 1
            self.log.error("source_read_loop_died", action="reconnecting")
            await nc.force_reconnect()
        consumer = self._consumer
        if consumer is not None and consumer.done() and not consumer.cancelled() and self.sub is not None:
            self.stalls += 1
            self.log.error(
                "source_consumer_died", error=repr(consumer.exception())[:300], action="restarting"
            )
            self._start_consumer()

    async def stop(self) -> None:
        """Stop taking new messages; messages already received are still handled."""
        sub, self.sub = self.sub, None
        if sub is not None and self.connected:
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except Exception as exc:  # the connection may be going away: nothing left to drain
                self.log.warning("source_drain_failed", error=str(exc))
        elif sub is not None:  # nothing to drain from a lost connection; what arrived is handled
            try:
                await asyncio.wait_for(sub._pending_queue.join(), QUEUE_EMPTY_TIMEOUT)
            except TimeoutError:
                self.log.warning("source_queue_not_emptied", left=sub._pending_queue.qsize())
        consumer, self._consumer = self._consumer, None
        if consumer is not None:  # the queue is empty by now (or the warning above says what was left)
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            assert self._consumer_args is not None
            self._consumer_args[1].batch_done()  # the last batch's latencies, had the loop not reached them

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish on the source connection (dead letters)."""
        nc = self.nc
        if nc is None:
            raise ConnectionError("source is not connected")
        await nc.publish(subject, payload, headers=headers)

    async def flush(self, timeout: float) -> None:
        """Confirms what was published on the source connection (dead letters, acks, parks)."""
        if self.nc is not None and self.nc.is_connected:
            await confirmed_flush(self.nc, timeout)

    async def close(self) -> None:
        self._events.closing = True
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            if not nc.is_connected:  # reconnecting: nothing to drain, and drain() would refuse
                await nc.close()
                return
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


DELIVER_POLICIES = {
    "all": DeliverPolicy.ALL,
    "new": DeliverPolicy.NEW,
    "last": DeliverPolicy.LAST,
    "last_per_subject": DeliverPolicy.LAST_PER_SUBJECT,
}
LAG_REFRESH_INTERVAL = 5.0
STREAM_RETRY_INTERVAL = 2.0
PARKED_ID_HEADER = "Forwarder-Parked-Id"
DELIVER_PREFIX = "_INBOX.forwarder"  # push consumers' deliver subjects: <prefix>.<stream>.<durable>


class JetStreamSource(CoreSource):
    """A durable JetStream push consumer shared by every replica (a deliver group)."""

    def __init__(self, settings: SourceSettings) -> None:
        super().__init__(settings)
        assert settings.jetstream is not None
        self.js: JetStreamSourceSettings = settings.jetstream
        self._lag: int | None = None
        self._lag_checked = 0.0
        self.parking = self.js.park_stream is not None
        self._parked_subs: list[Subscription] = []

    def lag(self) -> int | None:
        return self._lag

    async def start(
        self, handler: MessageHandler, fast: FastHandler | None = None, batch_done: BatchDone | None = None
    ) -> None:
        """The JetStream push subscription. nats-py's delivery task stays (flow control and
        heartbeats count on it); with ``fast``, the callback it awaits for one message also
        takes the rest of the queue, as the core source's consume loop does."""
        if self.nc is None:
            await self.connect()
        assert self.nc is not None
        js = self.nc.jetstream()
        cfg = self.js
        while True:  # the stream may not exist yet: say so and keep checking
            try:
                await js.stream_info(cfg.stream)
                break
            except nats.js.errors.NotFoundError:
                self.stats.last_error = f"stream {cfg.stream} not found"
                self.log.error("source_stream_missing", stream=cfg.stream)
            except (TimeoutError, nats.errors.Error) as exc:
                self.stats.last_error = f"JetStream unavailable: {type(exc).__name__}"
                self.log.warning("source_jetstream_unavailable", stream=cfg.stream, error=type(exc).__name__)
            await asyncio.sleep(STREAM_RETRY_INTERVAL)
        if self.parking:
            await self._ensure_park_stream()
        deliver = handler if fast is None else self._draining(self._queue_consumer(handler, fast, batch_done))
        self.sub = await self._consume(cfg.stream, cfg.durable, self.settings.subject, deliver)
        await confirmed_flush(self.nc, 5.0)
        self.stats.last_error = None
        self.log.info("subscribed", stream=cfg.stream, durable=cfg.durable, subject=self.settings.subject)

    def _draining(self, consumer: QueueConsumer) -> MessageHandler:
        """The callback for nats-py's delivery task: its message, then the queue behind it."""

        async def deliver(msg: Msg) -> None:
            sid = msg._sid
            await consumer.drain(msg._client._subs.get(sid) if sid is not None else None, msg, taken=False)

        return deliver

    async def _consume(
        self, stream: str, durable: str, subject: str, handler: MessageHandler
    ) -> Subscription:
        """Bind to (or create) a durable push consumer with a deliver group of the same name.

        The deliver subject is derived from the stream and durable names, not a random
        inbox: replicas (or workers) that start together each find no consumer and create
        it, and with equal configs the server keeps one consumer for all. With random
        inboxes the last create would move the consumer to its own inbox and the others
        would wait on theirs, forever, for nothing.
        """
        assert self.nc is not None
        cfg = self.js
        config = ConsumerConfig(
            deliver_subject=f"{DELIVER_PREFIX}.{stream}.{durable}",
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=cfg.ack_wait,
            max_ack_pending=cfg.max_ack_pending,
            max_deliver=cfg.max_deliver,
            deliver_policy=DELIVER_POLICIES[cfg.deliver_policy],
        )
        return await self.nc.jetstream().subscribe(
            subject,
            queue=durable,  # the deliver group: replicas share the consumer
            durable=durable,
            stream=stream,
            cb=handler,
            manual_ack=True,
            flow_control=True,
            idle_heartbeat=cfg.idle_heartbeat,
            config=config,
            pending_msgs_limit=self.settings.pending_msgs_limit,
            pending_bytes_limit=self.settings.pending_bytes_limit,
        )

    # ---- parking: where messages for a cluster that is down wait

    async def _ensure_park_stream(self) -> None:
        """Create the park stream if it is missing; without it, refused messages are only nak'd."""
        assert self.nc is not None
        assert self.js.park_stream is not None
        js = self.nc.jetstream()
        try:
            await js.stream_info(self.js.park_stream)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(
                    StreamConfig(
                        name=self.js.park_stream,
                        subjects=[f"{self.js.park_prefix}.>"],
                        # A parked message is gone once delivered: each cluster's consumer
                        # filters its own subjects, so work-queue retention fits.
                        retention=RetentionPolicy.WORK_QUEUE,
                    )
                )
                self.log.info("park_stream_created", stream=self.js.park_stream)
            except (TimeoutError, nats.errors.Error) as exc:
                self.parking = False
                self.log.error("parking_disabled", stream=self.js.park_stream, error=str(exc))

    def park_subject(self, cluster: str, subject: str) -> str:
        return f"{self.js.park_prefix}.{cluster}.{subject}"

    def unpark_subject(self, cluster: str, subject: str) -> str:
        return subject[len(self.js.park_prefix) + len(cluster) + 2 :]

    async def park(self, msg: Msg, cluster: str, origin_id: str) -> asyncio.Future[PubAck]:
        """Store ``msg`` for ``cluster`` in the park stream; the future resolves with its PubAck."""
        assert self.nc is not None
        headers = dict(msg.headers) if msg.headers else {}
        headers[PARKED_ID_HEADER] = origin_id
        return await self.nc.jetstream().publish_async(
            self.park_subject(cluster, msg.subject), msg.data, headers=headers
        )

    async def consume_parked(self, cluster: str, handler: MessageHandler) -> None:
        """Replay what was parked for ``cluster``: one durable consumer per cluster."""
        assert self.js.park_stream is not None
        durable = f"{self.js.durable}-parked-{cluster}"
        subject = self.park_subject(cluster, ">")
        self._parked_subs.append(await self._consume(self.js.park_stream, durable, subject, handler))

    async def stop(self) -> None:
        subs, self._parked_subs = self._parked_subs, []
        for sub in subs:
            if self.connected:
                try:
                    await sub.drain()  # type: ignore[no-untyped-call]
                except Exception as exc:
                    self.log.warning("source_drain_failed", error=str(exc))
        await super().stop()

    async def ack(self, msgs: Sequence[Msg]) -> None:
        """Acknowledge messages whose targets confirmed them: one write for the batch."""
        if msgs and self.nc is not None:
            await self.nc.send_empty([getattr(m, "reply_bytes", b"") or m.reply.encode() for m in msgs])

    def backoff(self, msg: Msg) -> float:
        """The delay before a refused message comes back: the back-off step of its delivery count."""
        try:
            delivered = int(msg.metadata.num_delivered)
        except (nats.errors.Error, ValueError, IndexError):
            delivered = 1
        steps = self.js.backoff
        return steps[min(max(delivered, 1), len(steps)) - 1]

    async def nak(self, msg: Msg, delay: float) -> None:
        nc = self.nc
        if nc is not None and not nc.is_closed:
            payload = b"-NAK " + json.dumps({"delay": int(delay * 1e9)}).encode()
            await nc.publish(msg.reply, payload)

    async def check(self) -> None:
        await super().check()
        now = time.monotonic()
        if now - self._lag_checked >= LAG_REFRESH_INTERVAL and self.connected and self.nc is not None:
            self._lag_checked = now
            try:
                info = await self.nc.jetstream().consumer_info(self.js.stream, self.js.durable, timeout=1)
                self._lag = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
            except (TimeoutError, nats.errors.Error):
                pass  # keep the last value; the next tick tries again

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "stream": self.js.stream, "durable": self.js.durable, "lag": self._lag}
