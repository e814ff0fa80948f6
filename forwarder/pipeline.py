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
from .logs import RateLimitedLogger, get_logger
from .natsconn import header_block_size
from .router import Rejection
from .stats import ForwardingStats

ERROR_HEADER = "Forwarder-Error"
SUBJECT_HEADER = "Forwarder-Subject"
TRUNCATED_HEADER = "Forwarder-Truncated"

TOO_LARGE = "too_large"  # a dead-letter reason: the target's max_payload is smaller
BAD_HEADERS = "bad_headers"  # a dead-letter reason: headers the target protocol cannot carry

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


class DeadLetters:
    """Publishes unroutable messages to the dead-letter subject, with the reason."""

    def __init__(self, subject: str, connection: DeadLetterConnection, stats: ForwardingStats) -> None:
        self.subject = subject
        self._connection = connection
        self._stats = stats
        self._log = RateLimitedLogger(get_logger())

    def build(self, msg: Msg, rejection: Rejection) -> tuple[bytes, dict[str, str]]:
        """The payload and headers of the dead letter, cut to fit the source's max_payload."""
        original = printable(msg.subject)
        headers: dict[str, str] = dict(msg.headers or {})
        headers[ERROR_HEADER] = rejection.header()[:512]
        headers[SUBJECT_HEADER] = original[:1024]
        payload = msg.data
        limit = self._connection.max_payload or 1024 * 1024
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
        self._log.warning(
            "dead_letter",
            rejection.reason,
            reason=rejection.reason,
            detail=rejection.detail,
            subject=printable(msg.subject)[:200],
        )
        try:
            await self._connection.publish(self.subject, payload, headers)
        except (nats.errors.Error, ConnectionError, OSError) as exc:
            self._stats.dead_letter_failures += 1
            self._log.error("dead_letter_failed", "publish", error=str(exc))
            return False
        return True


class CorePipeline:
    """At-most-once forwarding: route, publish into the target's buffer, count."""

    def __init__(self, route: RouteFn, dead_letters: DeadLetters, stats: ForwardingStats) -> None:
        self._route = route
        self._dead_letters = dead_letters
        self._stats = stats
        self._log = RateLimitedLogger(get_logger())

    def start(self) -> None:
        """Nothing runs beside the handler in at-most-once mode."""

    async def stop(self) -> None:
        """Nothing to confirm: published messages are already in the targets' buffers."""

    async def handle(self, msg: Any) -> None:
        stats = self._stats
        stats.received += 1
        data = msg.data
        route = self._route(msg.subject, msg.headers, data)
        if route.__class__ is not tuple:
            await self._dead_letters.send(msg, route)  # type: ignore[arg-type]
            return
        cluster, subject = route
        try:
            await cluster.publish(subject, data, msg.headers)
        except Exception as exc:
            await self._failed(msg, cluster, exc)
            return
        cluster.forwarded += 1
        stats.latency.observe(time.perf_counter() - msg.received_at)

    async def _failed(self, msg: Msg, cluster: NatsCluster, exc: Exception) -> None:
        if isinstance(exc, MessageTooLargeError | nats.errors.MaxPayloadError):
            await self._dead_letters.send(msg, Rejection(TOO_LARGE, str(exc) or "larger than max_payload"))
        elif isinstance(exc, nats.errors.BadHeaderError | UnicodeEncodeError):
            await self._dead_letters.send(msg, Rejection(BAD_HEADERS, "a header cannot be forwarded"))
        elif isinstance(exc, ClusterError | nats.errors.Error | OSError):
            # At-most-once: a cluster that cannot take the message now loses it, counted.
            cluster.publish_errors += 1
            self._log.warning("publish_failed", cluster.name, cluster=cluster.name, error=str(exc))
        else:
            raise exc


class UnaccountedCorePipeline(CorePipeline):
    """``CorePipeline.handle`` without counting and timing: ``FORWARDER_ACCOUNTING=off``.

    For the benchmark only (it measures what the accounting costs); keep it in step
    with ``CorePipeline.handle``.
    """

    async def handle(self, msg: Any) -> None:
        data = msg.data
        route = self._route(msg.subject, msg.headers, data)
        if route.__class__ is not tuple:
            await self._dead_letters.send(msg, route)  # type: ignore[arg-type]
            return
        cluster, subject = route
        try:
            await cluster.publish(subject, data, msg.headers)
        except Exception as exc:
            await self._failed(msg, cluster, exc)
