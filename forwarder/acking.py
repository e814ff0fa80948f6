"""At-least-once forwarding from a JetStream source.

The rule: a source message is acknowledged only after its target accepted it.

Each target has a *lane*: messages are published into the target connection at once
and wait in the lane's batch; the lane's own task confirms the whole batch (a core
target: one flush round trip; a JetStream target: the PubAcks) and then acknowledges
it with one write on the source connection. While a confirmation is in flight the
next batch fills, so batches grow with the load and a round trip is never paid per
message. Lanes are independent: a target that is down or slow delays its own
messages only (they are negatively acknowledged with a back-off and come back later),
the others keep flowing.

A message that its target will never take (larger than its max_payload, no stream
for the subject) goes to the dead-letter subject and is acknowledged once the source
server confirmed the dead letter.

Parking. A refused message keeps its slot in the consumer's ``max_ack_pending`` until
it is redelivered, so during a long outage one cluster's refused messages would fill
the window and stop every cluster. While a cluster is disconnected its messages are
therefore *parked*: stored (JetStream, PubAck-confirmed) under
``<park_prefix>.<cluster>.<subject>`` in a work-queue stream on the source, and only
then acknowledged. A consumer per cluster replays them once the cluster is back. A
replayed message keeps the identity (``Nats-Msg-Id``) of the original and is never
parked again: if its cluster is still down it is nak'd, which can only hold up that
cluster's own replay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import PubAck

from .cluster import ClusterError, MessageTooLargeError, NatsCluster
from .logs import RateLimitedLogger, get_logger
from .pipeline import TOO_LARGE, DeadLetters, RouteFn, printable
from .router import GraceRoute, Rejection, bad_headers
from .source import PARKED_ID_HEADER
from .stats import ForwardingStats
from .topology import GRACE_ID_HEADER, grace_ids

MSG_ID_HEADER = "Nats-Msg-Id"
NO_STREAM = "no_stream"  # a dead-letter reason: a JetStream target has no stream for the subject
MAX_PAYLOAD_API_ERROR = 10054  # JetStream: "message size exceeds maximum allowed"


class SourceAcks(Protocol):
    """What the acking pipeline needs from the JetStream source."""

    async def ack(self, msgs: Sequence[Msg]) -> None: ...

    async def nak(self, msg: Msg, delay: float) -> None: ...

    def backoff(self, msg: Msg) -> float: ...

    async def flush(self, timeout: float) -> None: ...


class ParkingSource(SourceAcks, Protocol):
    parking: bool  # False when the park stream could not be had: refused messages are nak'd

    async def park(self, msg: Msg, cluster: str, origin_id: str) -> asyncio.Future[PubAck]: ...

    def unpark_subject(self, cluster: str, subject: str) -> str: ...


def source_msg_id(msg: Msg) -> str:
    """The identity of a source message: ``stream:sequence``.

    A parked copy carries the original's identity; otherwise it comes from the ack
    subject ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...`` (9 tokens, or 12
    with a domain and account hash). Redeliveries of one message share the id, so the
    target stream's duplicate window drops them.
    """
    origin: str | None = getattr(msg, "origin_id", None)
    if origin:
        return origin
    reply = msg.reply
    tokens = reply.split(".")
    if len(tokens) == 9:
        return f"{tokens[2]}:{tokens[5]}"
    if len(tokens) >= 11:
        return f"{tokens[4]}:{tokens[7]}"
    return reply


class Lane:
    """Messages for one target between publish and acknowledgement."""

    def __init__(self, name: str, acks: SourceAcks, stats: ForwardingStats, timeout: float) -> None:
        self.name = name
        self.acks = acks
        self.stats = stats
        self.timeout = timeout
        self.log = RateLimitedLogger(get_logger(**self.log_context(name)))
        self._batch: list[Any] = []
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.confirming = 0  # messages in the batch being confirmed right now

    @staticmethod
    def log_context(name: str) -> dict[str, str]:
        """What every log line of this lane carries: a cluster lane names its cluster."""
        return {"lane": name}

    @property
    def waiting(self) -> int:
        """Messages published and not yet acknowledged or refused."""
        return len(self._batch) + self.confirming

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"lane-{self.name}")

    async def stop(self) -> None:
        """Confirm what was submitted, then end the task."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    def _enqueue(self, item: Any) -> None:
        self._batch.append(item)
        if len(self._batch) == 1:
            self._wakeup.set()

    async def _run(self) -> None:
        while True:
            if not self._batch:
                if self._stopping:
                    return
                await self._wakeup.wait()
                self._wakeup.clear()
                continue
            batch, self._batch = self._batch, []
            self.confirming = len(batch)
            try:
                await self._confirm(batch)
            except Exception as exc:  # a bug must not end the lane: refuse the batch, go on
                self.log.error("lane_failed", "confirm", error=repr(exc))
                for item in batch:
                    await self._refuse(item[0] if isinstance(item, tuple) else item, "internal error")
            finally:
                self.confirming = 0

    async def _confirm(self, batch: list[Any]) -> None:
        raise NotImplementedError

    async def _accepted(self, msgs: list[Msg]) -> None:
        await self.acks.ack(msgs)
        self.stats.latency.observe_batch(time.perf_counter(), [m.received_at for m in msgs])  # type: ignore[attr-defined]

    async def _refuse(self, msg: Msg, why: str) -> None:
        """Transient failure: negatively acknowledge with the back-off; it comes back later."""
        delay = self.acks.backoff(msg)
        self.log.warning(
            "redelivery_scheduled", why, reason=why, delay=delay, subject=printable(msg.subject)[:200]
        )
        await self.acks.nak(msg, delay)


class DeadLetterLane(Lane):
    """Dead letters go out on the source connection; the original is acked once it confirmed them."""

    def __init__(
        self, dead_letters: DeadLetters, acks: SourceAcks, stats: ForwardingStats, timeout: float
    ) -> None:
        super().__init__("dead-letter", acks, stats, timeout)
        self.dead_letters = dead_letters

    async def submit(self, msg: Msg, rejection: Rejection) -> None:
        if await self.dead_letters.send(msg, rejection):
            self._enqueue(msg)
        else:
            await self._refuse(msg, "dead letter not published")

    async def _confirm(self, batch: list[Any]) -> None:
        try:
            await self.acks.flush(self.timeout)
        except (TimeoutError, nats.errors.Error, OSError):
            for msg in batch:
                await self._refuse(msg, "dead letter not confirmed")
            return
        await self.acks.ack(batch)


class ClusterLane(Lane):
    """A core target: published into the connection's buffer, confirmed by one flush per batch."""

    @staticmethod
    def log_context(name: str) -> dict[str, str]:
        return {"cluster": name}

    def __init__(
        self,
        cluster: NatsCluster,
        acks: SourceAcks,
        stats: ForwardingStats,
        dead: DeadLetterLane,
        timeout: float,
    ) -> None:
        super().__init__(cluster.name, acks, stats, timeout)
        self.cluster = cluster
        self.dead = dead
        self.park: ParkLane | None = None

    def submit_nowait(self, msg: Msg, subject: str) -> bool:
        """Publish into the buffer and join the batch, without awaiting; False: use ``submit``."""
        if msg.headers is None and self.cluster.try_publish(subject, msg.data):
            self._enqueue(msg)
            return True
        return False

    async def submit(self, msg: Msg, subject: str) -> None:
        cluster = self.cluster
        if not cluster.connected:
            await self._unavailable(msg)
            return
        headers = msg.headers
        if headers is not None or not cluster.try_publish(subject, msg.data):
            try:
                await cluster.publish(subject, msg.data, headers)
            except Exception as exc:
                await self._publish_failed(msg, exc)
                return
        self._enqueue(msg)

    async def copy(self, msg: Msg, subject: str) -> None:
        """A grace-window copy for subscribers still on this (old) cluster: best effort,
        never holding up the acknowledgement, which belongs to the asset's new cluster."""
        try:
            await self.cluster.publish(subject, msg.data, self._copy_headers(msg))
            self.cluster.grace_publishes += 1
        except Exception:
            self.cluster.publish_errors += 1

    def _copy_headers(self, msg: Msg) -> dict[str, str] | None:
        return msg.headers

    async def _confirm(self, batch: list[Any]) -> None:
        try:
            await self.cluster.flush(self.timeout)
        except (TimeoutError, ClusterError, nats.errors.Error, OSError) as exc:
            self.cluster.publish_errors += len(batch)
            for msg in batch:
                await self._retry_later(msg, f"not confirmed: {type(exc).__name__}")
            return
        self.cluster.forwarded += len(batch)
        await self._accepted(batch)

    async def _retry_later(self, msg: Msg, why: str) -> None:
        """A transient failure: park it if the cluster is down, else nak it with the back-off."""
        if self.cluster.connected:
            await self._refuse(msg, why)
        else:
            await self._unavailable(msg)

    async def _unavailable(self, msg: Msg) -> None:
        if self.park is not None and self.park.source.parking and getattr(msg, "origin_id", None) is None:
            await self.park.submit(msg, self)
        else:
            await self._refuse(msg, "cluster unavailable")

    async def _refuse(self, msg: Msg, why: str) -> None:
        self.cluster.redeliveries += 1
        await super()._refuse(msg, why)

    async def _publish_failed(self, msg: Msg, exc: Exception) -> None:
        name = self.name
        if isinstance(exc, MessageTooLargeError | nats.errors.MaxPayloadError):
            await self.dead.submit(
                msg, Rejection(TOO_LARGE, str(exc) or "larger than max_payload", cluster=name)
            )
        elif isinstance(exc, nats.errors.BadHeaderError | UnicodeEncodeError):
            await self.dead.submit(msg, bad_headers(msg.headers, cluster=name))
        elif isinstance(exc, ClusterError | nats.errors.Error | OSError | TimeoutError):
            self.cluster.publish_errors += 1
            await self._retry_later(msg, f"publish failed: {type(exc).__name__}")
        else:
            raise exc


async def still_pending(futures: list[asyncio.Future[Any]], timeout: float) -> set[asyncio.Future[Any]]:
    """The futures not done within ``timeout``; those done already (PubAcks that came back while
    the batch filled) cost no callbacks: ``asyncio.wait`` adds and removes one on each."""
    waiting = [f for f in futures if not f.done()]
    if not waiting:
        return set()
    return (await asyncio.wait(waiting, timeout=timeout))[1]


class JetStreamLane(ClusterLane):
    """A JetStream target: asynchronous publishes with ``Nats-Msg-Id``, confirmed by their PubAcks."""

    def submit_nowait(self, msg: Msg, subject: str) -> bool:
        return False  # every publish awaits a place in the PubAck window

    def _copy_headers(self, msg: Msg) -> dict[str, str] | None:
        return {**(msg.headers or {}), MSG_ID_HEADER: source_msg_id(msg)}

    async def submit(self, msg: Msg, subject: str) -> None:
        cluster = self.cluster
        if not cluster.connected:
            await self._unavailable(msg)
            return
        headers = dict(msg.headers) if msg.headers else {}
        headers[MSG_ID_HEADER] = source_msg_id(msg)
        try:
            future = await cluster.publish_async(subject, msg.data, headers)
        except Exception as exc:
            await self._publish_failed(msg, exc)
            return
        self._enqueue((msg, subject, future))

    async def _confirm(self, batch: list[Any]) -> None:
        pending = await still_pending([f for _, _, f in batch], self.timeout)
        accepted: list[Msg] = []
        duplicates = 0
        for msg, subject, future in batch:
            if future in pending:
                future.cancel()
                self.cluster.publish_errors += 1
                await self._retry_later(msg, "no PubAck in time")
            elif future.cancelled():  # (exception() would raise CancelledError and end the lane)
                await self._pub_ack_failed(msg, subject, asyncio.CancelledError())
            elif future.exception() is not None:
                await self._pub_ack_failed(msg, subject, future.exception())
            else:
                accepted.append(msg)
                # A redelivery the stream already holds: acknowledged, counted apart.
                duplicates += bool(future.result().duplicate)
        if accepted:
            self.cluster.forwarded += len(accepted) - duplicates
            self.cluster.duplicates += duplicates
            await self._accepted(accepted)

    async def _pub_ack_failed(self, msg: Msg, subject: str, exc: BaseException | None) -> None:
        if isinstance(exc, nats.js.errors.NoStreamResponseError):
            try:
                has_stream = await self.cluster.has_stream_for(subject)
            except (TimeoutError, ClusterError, nats.errors.Error):
                has_stream = True  # cannot tell now: treat as transient
            if not has_stream:
                rejection = Rejection(
                    NO_STREAM, f"no stream on cluster {self.name} for it", cluster=self.name
                )
                await self.dead.submit(msg, rejection)
                return
        elif isinstance(exc, nats.js.errors.APIError) and exc.err_code == MAX_PAYLOAD_API_ERROR:
            await self.dead.submit(
                msg,
                Rejection(TOO_LARGE, exc.description or "larger than the stream allows", cluster=self.name),
            )
            return
        self.cluster.publish_errors += 1
        await self._retry_later(msg, f"rejected: {type(exc).__name__}")


class ParkLane(Lane):
    """Stores messages for clusters that are down in the park stream, then acknowledges them."""

    def __init__(self, source: ParkingSource, stats: ForwardingStats, timeout: float) -> None:
        super().__init__("park", source, stats, timeout)
        self.source = source

    async def submit(self, msg: Msg, lane: ClusterLane) -> None:
        try:
            future = await self.source.park(msg, lane.name, source_msg_id(msg))
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            await lane._refuse(msg, f"not parked: {type(exc).__name__}")
            return
        self._enqueue((msg, lane, future))

    async def _confirm(self, batch: list[Any]) -> None:
        pending = await still_pending([f for _, _, f in batch], self.timeout)
        parked: list[Msg] = []
        per_cluster: dict[str, int] = {}
        for msg, lane, future in batch:
            if future in pending or future.cancelled() or future.exception() is not None:
                future.cancel()
                await lane._refuse(msg, "not parked in time")
            else:
                lane.cluster.parked += 1
                parked.append(msg)
                per_cluster[lane.name] = per_cluster.get(lane.name, 0) + 1
        for cluster, count in per_cluster.items():
            self.log.warning("messages_parked", cluster, cluster=cluster, count=count)
        if parked:
            await self.acks.ack(parked)


class AckingPipeline:
    """Routes each message into its target's lane; unroutable ones into the dead-letter lane.

    The routing (which lane serves which cluster) is handed in with ``use()``; the
    pipeline only creates, starts and stops lanes.
    """

    def __init__(self, dead: DeadLetterLane, stats: ForwardingStats, park: ParkLane | None = None) -> None:
        self._confirm_timeout = dead.timeout  # core targets: a flush round trip within this
        self._route: RouteFn | None = None
        self._route_subject: Callable[[str], Any] | None = None
        self._dead = dead
        self._stats = stats
        self._park = park
        self._lanes: list[ClusterLane] = []
        self._started = False
        self._grace_id = grace_ids()

    def use(self, route: RouteFn, route_subject: Callable[[str], Any] | None = None) -> None:
        """Route with a new router from the next message on (a topology change);
        ``route_subject``: its per-subject shortcut when the key is in the subject."""
        self._route = route
        self._route_subject = route_subject

    def new_lane(self, cluster: NatsCluster) -> ClusterLane:
        """A lane for ``cluster``, running if the pipeline runs."""
        kind = JetStreamLane if cluster.settings.jetstream is not None else ClusterLane
        timeout = (
            cluster.settings.jetstream.ack_timeout if cluster.settings.jetstream else self._confirm_timeout
        )
        lane = kind(cluster, self._dead.acks, self._stats, self._dead, timeout)
        lane.park = self._park
        self._lanes.append(lane)
        if self._started:
            lane.start()
        return lane

    async def retire(self, lanes: Sequence[ClusterLane]) -> None:
        """Stop lanes that no route leads to any more, once their batches are confirmed."""
        for lane in lanes:
            self._lanes.remove(lane)
        await asyncio.gather(*(lane.stop() for lane in lanes))

    def start(self) -> None:
        self._started = True
        self._dead.start()
        if self._park is not None:
            self._park.start()
        for lane in self._lanes:
            lane.start()

    async def stop(self) -> None:
        """Confirm and acknowledge everything submitted so far.

        Cluster lanes first: while they finish they may still park or dead-letter.
        """
        await asyncio.gather(*(lane.stop() for lane in self._lanes))
        if self._park is not None:
            await self._park.stop()
        await self._dead.stop()

    def handle_nowait(self, msg: Any) -> bool:
        """The common case without awaiting: a cached route, a buffered publish, a place in its
        lane's batch. False when the message needs ``handle``; nothing was done or counted then."""
        by_subject = self._route_subject
        if by_subject is not None and msg.headers is None:
            route = by_subject(msg.subject)
            if route.__class__ is tuple and route[0].submit_nowait(msg, route[1]):
                self._stats.received += 1
                return True
        return False

    def batch_done(self) -> None:
        """Nothing per read: latencies are observed when a batch is acknowledged."""

    async def handle(self, msg: Any) -> None:
        if self.handle_nowait(msg):
            return
        self._stats.received += 1
        await self.dispatch(msg)

    def replayer(self, cluster: str) -> Callable[[Msg], Awaitable[None]]:
        """The handler for ``cluster``'s parked messages: each is routed again under its
        original subject and keeps the original's identity."""
        assert self._park is not None
        source = self._park.source

        async def replay(msg: Any) -> None:
            headers = msg.headers
            origin = headers.pop(PARKED_ID_HEADER, None) if headers else None
            if not headers:  # the parked id was the only header: the original had none
                msg.headers = None
            msg.subject = source.unpark_subject(cluster, msg.subject)
            msg.origin_id = origin or source_msg_id(msg)
            await self.dispatch(msg)

        return replay

    async def dispatch(self, msg: Any) -> None:
        assert self._route is not None, "use() a router before consuming"
        route: Any = self._route(
            msg.subject, msg.headers, msg.data
        )  # (target, subject) | GraceRoute | Rejection
        if route.__class__ is tuple:
            lane, subject = route
            await lane.submit(msg, subject)
        elif route.__class__ is GraceRoute:
            lane, subject, old = route
            msg.headers = {**(msg.headers or {}), GRACE_ID_HEADER: self._grace_id()}
            await lane.submit(msg, subject)
            await old.copy(msg, subject)
        else:
            await self._dead.submit(msg, route)
