"""The forwarding step: route a source message, publish it to its cluster, count it.

``CorePipeline`` is at-most-once, like core NATS: a message is handed to the target
connection's buffered writer and the source is not told anything. The at-least-once
pipeline for a JetStream source is in ``acking.py``.

A message that cannot be routed, or that its target would never take, goes to the
dead-letter subject with the reason; the service never stops for a bad message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import nats.errors
from nats.aio.msg import Msg

from .cluster import ClusterError, MessageTooLargeError, NatsCluster
from .config import HEADER_NAME_RE
from .logs import RateLimitedLogger, get_logger
from .natsconn import header_block_size
from .router import GraceRoute, MalformedHeaders, Rejection, bad_headers, shown_asset
from .stats import ForwardingStats
from .topology import GRACE_ID_HEADER, grace_ids

ERROR_HEADER = "Forwarder-Error"
SUBJECT_HEADER = "Forwarder-Subject"
TRUNCATED_HEADER = "Forwarder-Truncated"

TOO_LARGE = "too_large"  # a dead-letter reason: the target's max_payload is smaller

# (subject, headers, payload) -> (target, target subject) or why not; see router.Router.route
RouteFn = Callable[[str, Mapping[str, str] | None, bytes], "tuple[Any, str] | Rejection"]


class DeadLetterConnection(Protocol):
    """Where dead letters are published: the source connection."""

    @property
    def max_payload(self) -> int: ...

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None: ...


def printable(text: str) -> str:
    """A subject as it can be shown in a header or a log line (undecodable bytes escaped)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def publishable_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """The headers a dead letter can carry: those whose names nats-py will publish."""
    if not headers or isinstance(headers, MalformedHeaders):
        return {}
    return {k: v for k, v in headers.items() if HEADER_NAME_RE.match(k)}


def cut_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    data = text.encode("utf-8")
    return text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")


class DeadLetters:
    """Publishes unroutable messages to the dead-letter subject, with the reason."""

    def __init__(self, subject: str, connection: DeadLetterConnection, stats: ForwardingStats) -> None:
        self.subject = subject
        self._connection = connection
        self._stats = stats
        self._log = RateLimitedLogger(get_logger())
        # (subject, headers, payload) -> asset id: names the asset of a routed message
        # that its cluster refused (the router's ``asset_of``; set by the service).
        self.asset_of: Callable[[str, Mapping[str, str] | None, bytes], str | None] | None = None

    def build(self, msg: Msg, rejection: Rejection) -> tuple[bytes, dict[str, str]]:
        """The payload and headers of the dead letter, cut to fit the source's max_payload."""
        payload = msg.data
        limit = self._connection.max_payload or 1024 * 1024
        # Our two headers stay well inside the limit however small it is: in bytes, cut at
        # a character boundary (a subject may be long and not ASCII).
        budget = max(64, min(1024, limit // 8))
        headers = publishable_headers(msg.headers)
        headers[ERROR_HEADER] = cut_utf8(rejection.header(), budget // 2)
        headers[SUBJECT_HEADER] = cut_utf8(printable(msg.subject), budget)
        if header_block_size(headers) + len(payload) > limit:
            truncated_note = {TRUNCATED_HEADER: str(len(payload))}
            if header_block_size(headers | truncated_note) > limit // 2:
                # The original headers alone crowd the limit: keep only ours.
                headers = {ERROR_HEADER: headers[ERROR_HEADER], SUBJECT_HEADER: headers[SUBJECT_HEADER]}
            headers |= truncated_note
            payload = payload[: max(0, limit - header_block_size(headers))]
        return payload, headers

    async def send(self, msg: Msg, rejection: Rejection) -> bool:
        """Publish the dead letter (buffered); False if even that failed (counted, logged)."""
        self._stats.dead_lettered[rejection.reason] += 1
        payload, headers = self.build(msg, rejection)
        context: dict[str, str] = {}
        asset = rejection.asset
        if asset is None and rejection.cluster is not None and self.asset_of is not None:
            found = self.asset_of(msg.subject, msg.headers, msg.data)
            asset = shown_asset(found) if found is not None else None
        if asset is not None:
            context["asset"] = asset
        if rejection.cluster is not None:
            context["cluster"] = rejection.cluster
        self._log.warning(
            "dead_letter",
            rejection.reason,
            reason=rejection.reason,
            detail=rejection.detail,
            subject=printable(msg.subject)[:200],
            **context,
        )
        try:
            await self._connection.publish(self.subject, payload, headers)
        except (nats.errors.Error, ConnectionError, OSError) as exc:
            self._stats.dead_letter_failures += 1
            self._log.error("dead_letter_failed", "publish", error=str(exc))
            return False
        return True


def _no_route(subject: str, headers: Mapping[str, str] | None, payload: bytes) -> Rejection:
    raise RuntimeError("use() a router before consuming")


class CorePipeline:
    """At-most-once forwarding: route, publish into the target's buffer, count."""

    def __init__(self, dead_letters: DeadLetters, stats: ForwardingStats) -> None:
        self._route: RouteFn = _no_route
        self._route_subject: Callable[[str], Any] | None = None
        self._dead_letters = dead_letters
        self._stats = stats
        self._log = RateLimitedLogger(get_logger())
        self._grace_id = grace_ids()
        self._stamps: list[float] = []  # receipt times of the fast path's current batch

    def use(self, route: RouteFn, route_subject: Callable[[str], Any] | None = None) -> None:
        """Route with this router from the next message on (at start, and at a topology change).

        ``route_subject``: the router's per-subject shortcut, when the key is in the subject."""
        self._route, self._route_subject = route, route_subject

    def start(self) -> None:
        """Nothing runs beside the handler in at-most-once mode."""

    async def stop(self) -> None:
        """Nothing to confirm: published messages are already in the targets' buffers."""

    def handle_nowait(self, msg: Any) -> bool:
        """The whole job for an ordinary message, without awaiting: a cached route and a
        buffered publish. False when the message needs ``handle`` (headers, a dead letter,
        a grace window, a full or absent connection); nothing was done or counted then."""
        if msg.headers is not None:
            return False
        by_subject = self._route_subject
        data = msg.data
        route = by_subject(msg.subject) if by_subject is not None else self._route(msg.subject, None, data)
        if route.__class__ is not tuple:
            return False
        cluster, subject = route
        if not cluster.try_publish(subject, data):
            return False
        self._stats.received += 1
        cluster.forwarded += 1
        self._stamps.append(msg.received_at)
        return True

    def batch_done(self) -> None:
        """The fast path's latencies, once per batch: its publishes reach the sockets only
        after this (when the consume loop yields to the connections' flushers)."""
        stamps = self._stamps
        if stamps:
            self._stats.latency.observe_batch(time.perf_counter(), stamps)
            stamps.clear()

    async def handle(self, msg: Any) -> None:
        if self.handle_nowait(msg):
            # Routed and buffered after all (a route that changed, a buffer with room again):
            # observe what the batch holds now, as the consume loop would before awaiting.
            self.batch_done()
            return
        stats = self._stats
        stats.received += 1
        data = msg.data
        headers = msg.headers
        by_subject = self._route_subject
        route: Any = (
            by_subject(msg.subject) if by_subject is not None else self._route(msg.subject, headers, data)
        )
        if route.__class__ is not tuple:
            if route.__class__ is GraceRoute:
                await self._publish_twice(msg, route)
            else:
                await self._dead_letters.send(msg, route)
            return
        cluster, subject = route
        if headers is not None or not cluster.try_publish(subject, data):
            try:
                await cluster.publish(subject, data, headers)
            except Exception as exc:
                await self._failed(msg, cluster, exc)
                return
        cluster.forwarded += 1
        stats.latency.observe(time.perf_counter() - msg.received_at)

    async def _publish_twice(self, msg: Any, route: GraceRoute) -> None:
        """A moved asset in a grace window: its new cluster and, as a courtesy to subscribers
        still there, its old one; both copies carry the same ``Forwarder-Grace-Id``."""
        cluster, subject, old = route
        headers = {**(msg.headers or {}), GRACE_ID_HEADER: self._grace_id()}
        try:
            await cluster.publish(subject, msg.data, headers)
        except Exception as exc:
            await self._failed(msg, cluster, exc)
        else:
            cluster.forwarded += 1
            self._stats.latency.observe(time.perf_counter() - msg.received_at)
        try:
            await old.publish(subject, msg.data, headers)
            old.grace_publishes += 1
        except Exception:
            old.publish_errors += 1

    async def _failed(self, msg: Msg, cluster: NatsCluster, exc: Exception) -> None:
        name = cluster.name
        if isinstance(exc, MessageTooLargeError | nats.errors.MaxPayloadError):
            rejection = Rejection(TOO_LARGE, str(exc) or "larger than max_payload", cluster=name)
            await self._dead_letters.send(msg, rejection)
        elif isinstance(exc, nats.errors.BadHeaderError | UnicodeEncodeError):
            await self._dead_letters.send(msg, bad_headers(msg.headers, cluster=name))
        elif isinstance(exc, ClusterError | nats.errors.Error | OSError):
            # At-most-once: a cluster that cannot take the message now loses it, counted.
            cluster.publish_errors += 1
            self._log.warning(
                "publish_failed", name, cluster=name, subject=printable(msg.subject)[:200], error=str(exc)
            )
        else:
            raise exc
