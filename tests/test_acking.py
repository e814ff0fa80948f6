"""Unit tests of the at-least-once pipeline (forwarder/acking.py): when a source message is
acknowledged, negatively acknowledged, parked or dead-lettered, and what is counted.

Pure logic with fakes: ``FakeSource`` stands in for the JetStream source (acks, naks with
their delays, parks whose PubAck futures the test resolves or fails, flushes that succeed,
fail or hang until the test lets them go) and for the connection dead letters go out on;
``FakeCluster`` for a target cluster (fast and awaited publishes, PubAck futures, flushes,
``has_stream_for``, the counters). Nothing here says what NATS does: the integration tests
(tests/integration/test_jetstream.py) do that with real servers.

Deterministic: no timers in the tests. The lanes' tasks are driven by futures the test
controls, by events the fakes set, and by ``Lane.stop()``/``AckingPipeline.stop()``, which
return once everything submitted is settled. Where a test must let the tasks run without
anything to wait for, ``spin()`` yields to the event loop (``asyncio.sleep(0)``, no timer).
Only the "late PubAck" cases give a lane a real confirmation timeout, of 10 ms, and never
resolve the future in time: their outcome does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js.api import PubAck

from forwarder.acking import (
    MAX_PAYLOAD_API_ERROR,
    MSG_ID_HEADER,
    NO_STREAM,
    AckingPipeline,
    ClusterLane,
    DeadLetterLane,
    JetStreamLane,
    ParkLane,
    source_msg_id,
)
from forwarder.cluster import ClusterError, ClusterUnavailableError, MessageTooLargeError
from forwarder.pipeline import ERROR_HEADER, SUBJECT_HEADER, TOO_LARGE, DeadLetters
from forwarder.router import BAD_HEADERS, GraceRoute, Rejection
from forwarder.source import PARKED_ID_HEADER, SourceMsg
from forwarder.stats import ForwardingStats
from forwarder.topology import GRACE_ID_HEADER

DEAD = "forwarder.dead"
PARK_PREFIX = "parked"
STREAM = "ASSETS"

_sequence = itertools.count(1000)  # above the explicit sequences of the tests


def ack_subject(seq: int, stream: str = STREAM) -> str:
    """A 9-token JetStream ack subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<seq>...``."""
    return f"$JS.ACK.{stream}.forwarder.1.{seq}.{seq}.1700000000000000000.0"


def message(
    subject: str = "assets.pump-1.temp",
    *,
    headers: dict[str, str] | None = None,
    seq: int | None = None,
    origin_id: str | None = None,
    reply: str | None = None,
) -> SourceMsg:
    """A source message with a unique ack subject (its ``reply``), which the fakes record."""
    n = next(_sequence) if seq is None else seq
    msg = SourceMsg(
        _client=None,  # type: ignore[arg-type]
        subject=subject,
        reply=reply if reply is not None else ack_subject(n),
        data=b'{"v": %d}' % n,
        headers=headers,
        received_at=time.perf_counter(),
    )
    msg.origin_id = origin_id
    return msg


def pub_ack(seq: int = 1, duplicate: bool | None = None) -> PubAck:
    return PubAck(stream="TARGET", seq=seq, duplicate=duplicate)


async def spin(times: int = 20) -> None:
    """Let the lanes' tasks run as far as they can: bare yields to the event loop, no timer."""
    for _ in range(times):
        await asyncio.sleep(0)


class FakeSource:
    """The JetStream source as the lanes use it (``ParkingSource``), and the connection that
    dead letters are published on. ``events`` keeps the order of what happened."""

    max_payload = 1024 * 1024

    def __init__(self) -> None:
        self.parking = True
        self.events: list[tuple[Any, ...]] = []  # ("ack"|"nak"|"park", reply), ("flush",), ("dead", reason)
        self.ack_calls: list[list[str]] = []
        self.naks: list[tuple[str, float]] = []
        self.backoffs: dict[str, float] = {}  # reply -> back-off; 3.0 otherwise
        self.parks: list[tuple[str, str, str, dict[str, str] | None, asyncio.Future[PubAck]]] = []
        self.park_error: BaseException | None = None
        self.park_resolves = False  # True: a park's PubAck future is resolved at once
        self.flush_gates: list[asyncio.Future[None]] = []  # each flush waits for the next one, if any
        self.flush_error: BaseException | None = None
        self.flush_started = asyncio.Event()
        self.dead_letters: list[tuple[str, bytes, dict[str, str]]] = []
        self.publish_error: BaseException | None = None

    # SourceAcks
    async def ack(self, msgs: Any) -> None:
        replies = [m.reply for m in msgs]
        self.ack_calls.append(replies)
        self.events.extend(("ack", r) for r in replies)

    async def nak(self, msg: Any, delay: float) -> None:
        self.naks.append((msg.reply, delay))
        self.events.append(("nak", msg.reply))

    def backoff(self, msg: Any) -> float:
        return self.backoffs.get(msg.reply, 3.0)

    async def flush(self, timeout: float) -> None:
        self.events.append(("flush",))
        self.flush_started.set()
        if self.flush_gates:
            await self.flush_gates.pop(0)
        if self.flush_error is not None:
            raise self.flush_error

    # ParkingSource
    async def park(self, msg: Any, cluster: str, origin_id: str) -> asyncio.Future[PubAck]:
        if self.park_error is not None:
            raise self.park_error
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        if self.park_resolves:
            future.set_result(pub_ack())
        self.parks.append((msg.reply, cluster, origin_id, msg.headers, future))
        self.events.append(("park", msg.reply))
        return future

    def unpark_subject(self, cluster: str, subject: str) -> str:
        return subject[len(PARK_PREFIX) + len(cluster) + 2 :]

    # the dead-letter connection
    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        if self.publish_error is not None:
            raise self.publish_error
        assert headers is not None
        self.dead_letters.append((subject, payload, headers))
        self.events.append(("dead", headers[ERROR_HEADER].split(":")[0]))

    # what the tests read
    @property
    def acked(self) -> list[str]:
        return [r for call in self.ack_calls for r in call]

    def outcomes(self) -> dict[str, list[str]]:
        """Each message's acks and naks, in order: a settled message has exactly one."""
        out: dict[str, list[str]] = {}
        for event in self.events:
            if event[0] in ("ack", "nak"):
                out.setdefault(event[1], []).append(event[0])
        return out


class FakeCluster:
    """A target cluster as the lanes use it: ``NatsCluster``'s surface, recorded and controlled."""

    def __init__(self, name: str = "C1", *, jetstream: bool = False, ack_timeout: float = 5.0) -> None:
        self.name = name
        js = SimpleNamespace(ack_timeout=ack_timeout) if jetstream else None
        self.settings = SimpleNamespace(jetstream=js)
        self.connected = True
        self.fast = True  # try_publish takes a message (when connected)
        # (subject, data, headers, how: "fast" | "publish" | "async")
        self.published: list[tuple[str, bytes, dict[str, str] | None, str]] = []
        self.publish_error: BaseException | None = None
        self.pub_acks: list[asyncio.Future[PubAck]] = []
        self.flush_gates: list[asyncio.Future[None]] = []
        self.flush_error: BaseException | None = None
        self.flush_started = asyncio.Event()
        self.flushes = 0
        self.has_stream: bool | BaseException = False
        self.stream_checks: list[str] = []
        self.forwarded = 0
        self.publish_errors = 0
        self.redeliveries = 0
        self.parked = 0
        self.duplicates = 0
        self.grace_publishes = 0

    def try_publish(self, subject: str, payload: bytes) -> bool:
        if not (self.connected and self.fast):
            return False
        self.published.append((subject, payload, None, "fast"))
        return True

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        if self.publish_error is not None:
            raise self.publish_error
        self.published.append((subject, payload, None if headers is None else dict(headers), "publish"))

    async def publish_async(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> asyncio.Future[PubAck]:
        if self.publish_error is not None:
            raise self.publish_error
        future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self.published.append((subject, payload, dict(headers), "async"))
        self.pub_acks.append(future)
        return future

    async def flush(self, timeout: float) -> None:
        self.flushes += 1
        self.flush_started.set()
        if self.flush_gates:
            await self.flush_gates.pop(0)
        if self.flush_error is not None:
            raise self.flush_error

    async def has_stream_for(self, subject: str) -> bool:
        self.stream_checks.append(subject)
        if isinstance(self.has_stream, BaseException):
            raise self.has_stream
        return self.has_stream


class Rig:
    """An ``AckingPipeline`` with its dead-letter and park lanes over a ``FakeSource``."""

    def __init__(self, timeout: float = 5.0, *, park: bool = True) -> None:
        self.source = FakeSource()
        self.stats = ForwardingStats()
        self.dead_letters = DeadLetters(DEAD, self.source, self.stats)
        self.dead = DeadLetterLane(self.dead_letters, self.source, self.stats, timeout=timeout)
        self.park = ParkLane(self.source, self.stats, timeout=timeout) if park else None  # type: ignore[arg-type]
        self.pipeline = AckingPipeline(self.dead, self.stats, self.park)
        self.routes: dict[str, Any] = {}  # source subject -> (lane, subject) | GraceRoute | Rejection
        self.pipeline.use(lambda subject, headers, data: self.routes[subject], self.routes.__getitem__)

    def lane(self, name: str = "C1", *, jetstream: bool = False, ack_timeout: float = 5.0) -> Any:
        cluster = FakeCluster(name, jetstream=jetstream, ack_timeout=ack_timeout)
        return self.pipeline.new_lane(cluster)  # type: ignore[arg-type]

    def tasks(self) -> list[asyncio.Task[None]]:
        lanes: list[Any] = [*self.pipeline._lanes, self.dead, self.park]
        return [lane._task for lane in lanes if lane is not None and lane._task is not None]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    made = Rig()
    yield made
    for task in made.tasks():  # a failed test may leave a lane waiting
        task.cancel()
    await asyncio.gather(*made.tasks(), return_exceptions=True)


def gate() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


def resolve(future: asyncio.Future[Any], result: Any = None) -> None:
    future.set_result(result)


def stats_of(cluster: Any) -> dict[str, int]:
    names = ("forwarded", "publish_errors", "redeliveries", "parked", "duplicates", "grace_publishes")
    return {n: getattr(cluster, n) for n in names if getattr(cluster, n)}


# ------------------------------------------------------------------ source_msg_id


@pytest.mark.parametrize(
    ("reply", "origin", "expected"),
    [
        ("$JS.ACK.ASSETS.forwarder.1.42.17.1700000000000000000.3", None, "ASSETS:42"),
        ("$JS.ACK.hub.ACCHASH.ASSETS.forwarder.2.42.17.1700000000000000000.3.rnd", None, "ASSETS:42"),
        ("$JS.ACK.hub.ACCHASH.ASSETS.forwarder.2.42.17.1700000000000000000.3", None, "ASSETS:42"),
        ("$JS.ACK.PARK.forwarder-parked-C1.1.7.7.1700000000000000000.0", "ASSETS:42", "ASSETS:42"),
        ("not-an-ack-subject", None, "not-an-ack-subject"),
    ],
)
def test_source_msg_id_is_stream_and_sequence_and_prefers_the_origin(
    reply: str, origin: str | None, expected: str
) -> None:
    assert source_msg_id(message(reply=reply, origin_id=origin)) == expected


# ------------------------------------------------------------------ a core target: one flush per batch


async def test_a_batch_is_acked_only_after_its_flush_confirmed_it(rig: Rig) -> None:
    lane = rig.lane()
    assert type(lane) is ClusterLane
    assert lane.timeout == rig.dead.timeout  # a core lane's flush: the confirm timeout
    cluster = lane.cluster
    flush = gate()
    cluster.flush_gates.append(flush)
    rig.pipeline.start()
    msgs = [message() for _ in range(3)]
    for m in msgs:
        await lane.submit(m, m.subject)
    await cluster.flush_started.wait()
    await spin()
    assert rig.source.events == []  # in the connection's buffer: not acknowledged yet
    assert cluster.forwarded == 0
    assert lane.waiting == 3
    resolve(flush)
    await lane.stop()
    assert rig.source.ack_calls == [[m.reply for m in msgs]]  # one write for the batch
    assert rig.source.outcomes() == {m.reply: ["ack"] for m in msgs}
    assert stats_of(cluster) == {"forwarded": 3}
    assert [how for *_, how in cluster.published] == ["fast"] * 3
    assert rig.stats.latency.count == 3
    assert lane.waiting == 0


async def test_a_failed_flush_naks_every_message_of_the_batch_with_its_backoff(rig: Rig) -> None:
    lane = rig.lane()
    cluster = lane.cluster
    cluster.flush_error = TimeoutError()
    msgs = [message() for _ in range(3)]
    for i, m in enumerate(msgs):
        rig.source.backoffs[m.reply] = 1.0 + i
    rig.pipeline.start()
    for m in msgs:
        await lane.submit(m, m.subject)
    await lane.stop()
    assert rig.source.naks == [(m.reply, 1.0 + i) for i, m in enumerate(msgs)]
    assert rig.source.outcomes() == {m.reply: ["nak"] for m in msgs}
    assert rig.source.parks == []
    assert stats_of(cluster) == {"publish_errors": 3, "redeliveries": 3}


async def test_batches_grow_while_a_flush_is_in_flight(rig: Rig) -> None:
    lane = rig.lane()
    cluster = lane.cluster
    first = gate()
    cluster.flush_gates.append(first)
    rig.pipeline.start()
    head = message()
    assert lane.submit_nowait(head, head.subject)
    await cluster.flush_started.wait()  # the head's flush is in flight
    rest = [message() for _ in range(50)]
    for m in rest:
        assert lane.submit_nowait(m, m.subject)
    assert lane.waiting == 51
    resolve(first)
    await lane.stop()
    assert cluster.flushes == 2  # one flush confirmed all fifty
    assert rig.source.ack_calls == [[head.reply], [m.reply for m in rest]]
    assert cluster.forwarded == 51


async def test_a_bug_in_a_confirmation_refuses_the_batch_and_the_lane_goes_on(rig: Rig) -> None:
    lane = rig.lane()
    cluster = lane.cluster
    first = gate()
    cluster.flush_gates.append(first)
    rig.pipeline.start()
    bad = message()
    await lane.submit(bad, bad.subject)
    await cluster.flush_started.wait()
    good = message()
    await lane.submit(good, good.subject)  # waits for the next batch
    first.set_exception(RuntimeError("a bug"))
    await lane.stop()
    assert rig.source.outcomes() == {bad.reply: ["nak"], good.reply: ["ack"]}


async def test_a_message_with_headers_is_published_with_them(rig: Rig) -> None:
    lane = rig.lane()
    rig.pipeline.start()
    m = message(headers={"Asset-Id": "pump-1"})
    assert not lane.submit_nowait(m, "out.pump-1")
    await lane.submit(m, "out.pump-1")
    await lane.stop()
    assert lane.cluster.published == [("out.pump-1", m.data, {"Asset-Id": "pump-1"}, "publish")]
    assert rig.source.outcomes() == {m.reply: ["ack"]}


@pytest.mark.parametrize("jetstream", [False, True], ids=["core", "jetstream"])
@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (MessageTooLargeError("C1", 2000, 1000), TOO_LARGE),
        (nats.errors.MaxPayloadError(), TOO_LARGE),
        (nats.errors.BadHeaderError(), BAD_HEADERS),
        (ClusterError("not now"), "nak"),
        (nats.js.errors.TooManyStalledMsgsError(), "nak"),
        (OSError("broken pipe"), "nak"),
    ],
    ids=["too-large", "max-payload", "bad-header", "cluster-error", "stalled", "os-error"],
)
async def test_a_failed_publish_is_dead_lettered_or_retried(
    rig: Rig, jetstream: bool, error: BaseException, outcome: str
) -> None:
    lane = rig.lane(jetstream=jetstream)
    cluster = lane.cluster
    cluster.publish_error = error
    rig.pipeline.start()
    m = message(headers={"Asset-Id": "pump-1"})
    await lane.submit(m, m.subject)
    await rig.pipeline.stop()
    if outcome == "nak":
        assert rig.source.events == [("nak", m.reply)]
        assert stats_of(cluster) == {"publish_errors": 1, "redeliveries": 1}
    else:  # the dead letter, the source flush that confirmed it, then the ack
        assert rig.source.events == [("dead", outcome), ("flush",), ("ack", m.reply)]
        assert rig.stats.dead_lettered == {outcome: 1}
        assert stats_of(cluster) == {}


# ------------------------------------------------------------------ a cluster that is down: parking


async def test_a_disconnected_cluster_parks_a_message_and_acks_it_after_the_park_puback(rig: Rig) -> None:
    lane = rig.lane()
    cluster = lane.cluster
    cluster.connected = False
    rig.pipeline.start()
    m = message(seq=42, headers={"Asset-Id": "pump-1"})
    await lane.submit(m, "out.pump-1")
    [(reply, name, origin, headers, future)] = rig.source.parks
    assert (reply, name, origin, headers) == (m.reply, "C1", f"{STREAM}:42", {"Asset-Id": "pump-1"})
    await spin()
    assert rig.source.acked == []  # not before the park stream confirmed it
    resolve(future, pub_ack())
    await rig.pipeline.stop()
    assert rig.source.outcomes() == {m.reply: ["ack"]}
    assert cluster.published == []
    assert stats_of(cluster) == {"parked": 1}


@pytest.mark.parametrize("case", ["replayed", "parking-off", "no-park-lane"])
async def test_a_message_that_may_not_be_parked_is_nakd(case: str) -> None:
    rig = Rig(park=case != "no-park-lane")
    lane = rig.lane()
    lane.cluster.connected = False
    rig.source.parking = case != "parking-off"
    rig.pipeline.start()
    # A replayed message keeps the identity of the original: never parked a second time.
    m = message(origin_id="ASSETS:42" if case == "replayed" else None)
    rig.source.backoffs[m.reply] = 9.0
    await lane.submit(m, m.subject)
    await rig.pipeline.stop()
    assert rig.source.parks == []
    assert rig.source.naks == [(m.reply, 9.0)]
    assert rig.source.outcomes() == {m.reply: ["nak"]}
    assert stats_of(lane.cluster) == {"redeliveries": 1}


async def test_a_flush_that_fails_because_the_cluster_went_down_parks_the_batch(rig: Rig) -> None:
    lane = rig.lane()
    cluster = lane.cluster
    flush = gate()
    cluster.flush_gates.append(flush)
    rig.source.park_resolves = True
    rig.pipeline.start()
    msgs = [message(), message()]
    for m in msgs:
        await lane.submit(m, m.subject)
    await cluster.flush_started.wait()
    cluster.connected = False
    flush.set_exception(ClusterUnavailableError("C1"))
    await rig.pipeline.stop()
    assert [p[0] for p in rig.source.parks] == [m.reply for m in msgs]
    assert rig.source.outcomes() == {m.reply: ["ack"] for m in msgs}
    assert stats_of(cluster) == {"publish_errors": 2, "parked": 2}


async def test_parked_messages_are_counted_per_cluster(rig: Rig) -> None:
    c1, c2 = rig.lane("C1"), rig.lane("C2")
    c1.cluster.connected = c2.cluster.connected = False
    rig.pipeline.start()
    msgs = [(c1, message()), (c1, message()), (c2, message())]
    for lane, m in msgs:
        await lane.submit(m, m.subject)
    assert [p[1] for p in rig.source.parks] == ["C1", "C1", "C2"]
    for *_, future in rig.source.parks:
        resolve(future, pub_ack())
    await rig.pipeline.stop()
    assert rig.source.outcomes() == {m.reply: ["ack"] for _, m in msgs}
    assert (c1.cluster.parked, c2.cluster.parked) == (2, 1)


@pytest.mark.parametrize("how", ["puback-error", "puback-late", "park-raises"])
async def test_a_message_that_was_not_parked_is_nakd_through_its_cluster_lane(how: str) -> None:
    rig = Rig(timeout=0.01)
    lane = rig.lane()
    cluster = lane.cluster
    cluster.connected = False
    if how == "park-raises":
        rig.source.park_error = nats.errors.ConnectionClosedError()
    rig.pipeline.start()
    m = message()
    rig.source.backoffs[m.reply] = 4.0
    await lane.submit(m, m.subject)
    if how == "puback-error":
        rig.source.parks[0][-1].set_exception(nats.js.errors.ServiceUnavailableError())
    await rig.pipeline.stop()  # "puback-late": never resolved, the park lane's timeout ends it
    assert rig.source.naks == [(m.reply, 4.0)]
    assert rig.source.outcomes() == {m.reply: ["nak"]}
    assert stats_of(cluster) == {"redeliveries": 1}
    if how == "puback-late":
        assert rig.source.parks[0][-1].cancelled()


# ------------------------------------------------------------------ a JetStream target: PubAcks


async def test_a_jetstream_publish_carries_the_source_identity_as_nats_msg_id(rig: Rig) -> None:
    lane = rig.lane(jetstream=True)
    rig.pipeline.start()
    plain = message(seq=7)
    domain = message(reply="$JS.ACK.hub.ACCHASH.ASSETS.forwarder.3.8.2.1700000000000000000.0.rnd")
    replayed = message(
        reply=ack_subject(99, stream="PARK"), origin_id="ASSETS:5", headers={"Asset-Id": "pump-1"}
    )
    for m in (plain, domain, replayed):
        await lane.submit(m, "out." + m.subject)
    assert [headers for _, _, headers, _ in lane.cluster.published] == [
        {MSG_ID_HEADER: "ASSETS:7"},
        {MSG_ID_HEADER: "ASSETS:8"},
        {"Asset-Id": "pump-1", MSG_ID_HEADER: "ASSETS:5"},
    ]
    assert replayed.headers == {"Asset-Id": "pump-1"}  # the message itself is left as it came
    assert [s for s, *_ in lane.cluster.published] == ["out.assets.pump-1.temp"] * 3
    for i, future in enumerate(lane.cluster.pub_acks):
        resolve(future, pub_ack(i))
    await rig.pipeline.stop()
    assert rig.source.outcomes() == {m.reply: ["ack"] for m in (plain, domain, replayed)}


async def test_a_jetstream_batch_is_acked_after_its_pubacks_and_duplicates_count_apart(rig: Rig) -> None:
    lane = rig.lane(jetstream=True)
    cluster = lane.cluster
    rig.pipeline.start()
    msgs = [message() for _ in range(3)]
    for m in msgs:
        await lane.submit(m, m.subject)
    resolve(cluster.pub_acks[0], pub_ack(1))
    resolve(cluster.pub_acks[2], pub_ack(3, duplicate=True))  # the stream had it: a redelivery
    await spin()
    assert rig.source.acked == []  # the second PubAck is still out
    resolve(cluster.pub_acks[1], pub_ack(2, duplicate=False))
    await rig.pipeline.stop()
    assert rig.source.ack_calls == [[m.reply for m in msgs]]
    assert rig.source.outcomes() == {m.reply: ["ack"] for m in msgs}
    assert stats_of(cluster) == {"forwarded": 2, "duplicates": 1}


@pytest.mark.parametrize("connected", [True, False], ids=["connected", "disconnected"])
async def test_a_late_puback_means_retry_later(connected: bool) -> None:
    rig = Rig()
    lane = rig.lane(jetstream=True, ack_timeout=0.01)
    assert type(lane) is JetStreamLane
    assert lane.timeout == 0.01  # a JetStream lane waits ack_timeout for its PubAcks
    cluster = lane.cluster
    rig.source.park_resolves = True
    rig.pipeline.start()
    m = message()
    await lane.submit(m, m.subject)
    cluster.connected = connected
    await rig.pipeline.stop()  # the PubAck never comes
    assert cluster.pub_acks[0].cancelled()
    assert rig.source.outcomes() == {m.reply: ["nak" if connected else "ack"]}
    if connected:
        assert stats_of(cluster) == {"publish_errors": 1, "redeliveries": 1}
    else:
        assert [p[0] for p in rig.source.parks] == [m.reply]
        assert stats_of(cluster) == {"publish_errors": 1, "parked": 1}


async def test_a_cancelled_puback_future_means_retry_later(rig: Rig) -> None:
    lane = rig.lane(jetstream=True)
    cluster = lane.cluster
    rig.pipeline.start()
    m, after = message(), message()
    await lane.submit(m, m.subject)
    cluster.pub_acks[0].cancel()
    await spin()
    await lane.submit(after, after.subject)  # the lane still works
    resolve(cluster.pub_acks[1], pub_ack())
    await rig.pipeline.stop()
    assert rig.source.outcomes() == {m.reply: ["nak"], after.reply: ["ack"]}
    assert stats_of(cluster) == {"publish_errors": 1, "redeliveries": 1, "forwarded": 1}


async def test_no_stream_for_the_subject_is_dead_lettered_and_acked_after_the_source_flush(rig: Rig) -> None:
    lane = rig.lane(jetstream=True)
    cluster = lane.cluster
    cluster.has_stream = False
    source_flush = gate()
    rig.source.flush_gates.append(source_flush)
    rig.pipeline.start()
    m = message(subject="assets.pump-1.temp")
    await lane.submit(m, "out.pump-1")
    cluster.pub_acks[0].set_exception(nats.js.errors.NoStreamResponseError())
    await rig.source.flush_started.wait()
    await spin()
    assert rig.source.acked == []  # the dead letter is not confirmed yet
    resolve(source_flush)
    await rig.pipeline.stop()
    assert cluster.stream_checks == ["out.pump-1"]
    assert rig.source.events == [("dead", NO_STREAM), ("flush",), ("ack", m.reply)]
    [(subject, payload, headers)] = rig.source.dead_letters
    assert (subject, payload, headers[SUBJECT_HEADER]) == (DEAD, m.data, "assets.pump-1.temp")
    assert rig.stats.dead_lettered == {NO_STREAM: 1}
    assert stats_of(cluster) == {}


@pytest.mark.parametrize(
    "has_stream", [True, TimeoutError(), ClusterUnavailableError("C1")], ids=["stream", "timeout", "down"]
)
async def test_no_responders_where_a_stream_exists_or_cannot_be_checked_is_nakd(
    rig: Rig, has_stream: bool | BaseException
) -> None:
    lane = rig.lane(jetstream=True)
    cluster = lane.cluster
    cluster.has_stream = has_stream  # e.g. a leader election
    rig.pipeline.start()
    m = message()
    await lane.submit(m, m.subject)
    cluster.pub_acks[0].set_exception(nats.js.errors.NoStreamResponseError())
    await rig.pipeline.stop()
    assert rig.source.events == [("nak", m.reply)]
    assert rig.source.dead_letters == []
    assert stats_of(cluster) == {"publish_errors": 1, "redeliveries": 1}


@pytest.mark.parametrize(
    ("err_code", "outcome"), [(MAX_PAYLOAD_API_ERROR, TOO_LARGE), (10077, "nak"), (None, "nak")]
)
async def test_a_jetstream_api_error_is_dead_lettered_only_for_a_message_too_large(
    rig: Rig, err_code: int | None, outcome: str
) -> None:
    lane = rig.lane(jetstream=True)
    cluster = lane.cluster
    rig.pipeline.start()
    m = message()
    await lane.submit(m, m.subject)
    error = nats.js.errors.BadRequestError(code=400, err_code=err_code, description="too big for it")
    cluster.pub_acks[0].set_exception(error)
    await rig.pipeline.stop()
    if outcome == "nak":
        assert rig.source.events == [("nak", m.reply)]
        assert stats_of(cluster) == {"publish_errors": 1, "redeliveries": 1}
    else:
        assert rig.source.events == [("dead", TOO_LARGE), ("flush",), ("ack", m.reply)]
        assert rig.source.dead_letters[0][2][ERROR_HEADER] == "too_large: too big for it"
        assert stats_of(cluster) == {}


# ------------------------------------------------------------------ the dead-letter lane


async def test_a_dead_letter_is_acked_after_the_source_flush(rig: Rig) -> None:
    flush = gate()
    rig.source.flush_gates.append(flush)
    rig.pipeline.start()
    msgs = [message(), message()]
    for m in msgs:
        await rig.dead.submit(m, Rejection("no_key_token", "subject has no token 1"))
    await rig.source.flush_started.wait()
    await spin()
    assert rig.source.acked == []
    resolve(flush)
    await rig.dead.stop()
    assert rig.source.ack_calls == [[m.reply for m in msgs]]
    assert rig.source.events[:3] == [("dead", "no_key_token"), ("dead", "no_key_token"), ("flush",)]
    assert rig.source.outcomes() == {m.reply: ["ack"] for m in msgs}


async def test_a_dead_letter_that_could_not_be_published_is_nakd(rig: Rig) -> None:
    rig.source.publish_error = nats.errors.ConnectionClosedError()
    rig.pipeline.start()
    m = message()
    rig.source.backoffs[m.reply] = 6.0
    await rig.dead.submit(m, Rejection("no_key_token", "subject has no token 1"))
    await rig.dead.stop()
    assert rig.source.naks == [(m.reply, 6.0)]
    assert rig.source.outcomes() == {m.reply: ["nak"]}
    assert rig.stats.dead_letter_failures == 1


@pytest.mark.parametrize("error", [TimeoutError(), nats.errors.ConnectionClosedError(), OSError()])
async def test_a_dead_letter_whose_flush_failed_is_nakd(rig: Rig, error: BaseException) -> None:
    rig.source.flush_error = error
    rig.pipeline.start()
    msgs = [message(), message()]
    for m in msgs:
        await rig.dead.submit(m, Rejection("no_key_token", "subject has no token 1"))
    await rig.dead.stop()
    assert rig.source.outcomes() == {m.reply: ["nak"] for m in msgs}


# ------------------------------------------------------------------ the pipeline


async def test_the_fast_path_takes_an_ordinary_message_without_awaiting(rig: Rig) -> None:
    lane = rig.lane()
    m = message(subject="assets.pump-1.temp")
    rig.routes[m.subject] = (lane, "out.pump-1")

    async def no_dispatch(msg: Any) -> None:
        raise AssertionError("the slow path")

    rig.pipeline.dispatch = no_dispatch  # type: ignore[method-assign]
    handling = rig.pipeline.handle(m)
    with pytest.raises(StopIteration):
        handling.send(None)  # ran to its end without giving the loop a turn
    assert lane._batch == [m]
    assert lane.cluster.published == [("out.pump-1", m.data, None, "fast")]
    assert rig.stats.received == 1


async def test_received_counts_each_message_once_on_every_path(rig: Rig) -> None:
    core, other, js = rig.lane("C1"), rig.lane("C2"), rig.lane("C3", jetstream=True)
    other.cluster.fast = False  # its buffer is full: try_publish declines
    rig.source.park_resolves = True
    rig.routes.update(
        {
            "a.fast": (core, "out.fast"),
            "a.headers": (core, "out.headers"),
            "a.declined": (other, "out.declined"),
            "a.js": (js, "out.js"),
            "a.rejected": Rejection("no_key_token", "subject has no token 1"),
        }
    )
    rig.pipeline.start()
    msgs = [
        message("a.fast"),
        message("a.headers", headers={"Asset-Id": "pump-1"}),
        message("a.declined"),
        message("a.js"),
        message("a.rejected"),
    ]
    for m in msgs:
        await rig.pipeline.handle(m)
    assert rig.stats.received == 5
    resolve(js.cluster.pub_acks[0], pub_ack())
    await rig.pipeline.stop()
    assert rig.stats.received == 5
    assert rig.source.outcomes() == {m.reply: ["ack"] for m in msgs}
    assert [how for *_, how in core.cluster.published] == ["fast", "publish"]
    assert [how for *_, how in other.cluster.published] == ["publish"]


@pytest.mark.parametrize("old_jetstream", [False, True], ids=["old-core", "old-jetstream"])
async def test_a_grace_route_copies_to_the_old_cluster_with_the_same_grace_id(
    rig: Rig, old_jetstream: bool
) -> None:
    new, old = rig.lane("C2"), rig.lane("C1", jetstream=old_jetstream)
    m = message(seq=11, subject="assets.pump-1.temp")
    rig.routes[m.subject] = GraceRoute((new, "out.pump-1", old))
    rig.pipeline.start()
    await rig.pipeline.handle(m)
    [(subject, data, headers, _)] = new.cluster.published
    [(old_subject, old_data, old_headers, _)] = old.cluster.published
    grace_id = headers[GRACE_ID_HEADER]
    assert (subject, data) == (old_subject, old_data) == ("out.pump-1", m.data)
    expected_old = {GRACE_ID_HEADER: grace_id}
    if old_jetstream:
        expected_old[MSG_ID_HEADER] = "ASSETS:11"
    assert old_headers == expected_old
    assert old._batch == []  # a copy: not waited for
    assert old.cluster.pub_acks == []
    await rig.pipeline.handle(second := message(subject="assets.pump-1.temp"))
    assert new.cluster.published[1][2][GRACE_ID_HEADER] != grace_id  # one id per message
    await rig.pipeline.stop()
    assert rig.source.outcomes() == {m.reply: ["ack"], second.reply: ["ack"]}
    assert stats_of(new.cluster) == {"forwarded": 2}
    assert stats_of(old.cluster) == {"grace_publishes": 2}
    assert rig.stats.received == 2


async def test_a_failed_grace_copy_is_counted_and_does_not_hold_up_the_ack(rig: Rig) -> None:
    new, old = rig.lane("C2"), rig.lane("C1")
    old.cluster.publish_error = ClusterUnavailableError("C1")
    m = message()
    rig.routes[m.subject] = GraceRoute((new, "out.pump-1", old))
    rig.pipeline.start()
    await rig.pipeline.handle(m)
    await rig.pipeline.stop()
    assert rig.source.outcomes() == {m.reply: ["ack"]}
    assert stats_of(old.cluster) == {"publish_errors": 1}
    assert stats_of(new.cluster) == {"forwarded": 1}


async def test_a_rejection_goes_to_the_dead_letter_lane(rig: Rig) -> None:
    lane = rig.lane()
    m = message(subject="assets")
    rig.routes[m.subject] = Rejection("no_key_token", "subject has no token 1")
    rig.pipeline.start()
    await rig.pipeline.handle(m)
    await rig.pipeline.stop()
    assert rig.source.events == [("dead", "no_key_token"), ("flush",), ("ack", m.reply)]
    assert rig.source.dead_letters[0][2][ERROR_HEADER] == "no_key_token: subject has no token 1"
    assert lane.cluster.published == []
    assert rig.stats.received == 1


def parked_message(headers: dict[str, str] | None) -> SourceMsg:
    """``assets.pump-1.temp`` as the park stream (``PARK``, sequence 3) delivers it back for C1."""
    reply = ack_subject(3, stream="PARK")
    return message(subject="parked.C1.assets.pump-1.temp", reply=reply, headers=headers)


@pytest.mark.parametrize("jetstream", [False, True], ids=["core", "jetstream"])
async def test_the_replayer_restores_the_subject_and_the_identity(rig: Rig, jetstream: bool) -> None:
    lane = rig.lane(jetstream=jetstream)
    rig.routes["assets.pump-1.temp"] = (lane, "out.pump-1")
    rig.pipeline.start()
    replay = rig.pipeline.replayer("C1")
    parked = parked_message({PARKED_ID_HEADER: "ASSETS:42", "Asset-Id": "pump-1"})
    await replay(parked)
    assert parked.subject == "assets.pump-1.temp"
    assert parked.origin_id == "ASSETS:42"
    [(subject, _, headers, _)] = lane.cluster.published
    expected: dict[str, str] = {"Asset-Id": "pump-1"}
    if jetstream:
        expected[MSG_ID_HEADER] = "ASSETS:42"  # the original's identity, not the park stream's
        resolve(lane.cluster.pub_acks[0], pub_ack())
    assert (subject, headers) == ("out.pump-1", expected)
    await rig.pipeline.stop()
    assert rig.source.outcomes() == {parked.reply: ["ack"]}  # acked on the park stream's consumer


async def test_a_replayed_message_whose_original_had_no_headers_goes_out_without_headers(rig: Rig) -> None:
    lane = rig.lane()
    rig.routes["assets.pump-1.temp"] = (lane, "out.pump-1")
    rig.pipeline.start()
    parked = parked_message({PARKED_ID_HEADER: "ASSETS:42"})
    await rig.pipeline.replayer("C1")(parked)
    await rig.pipeline.stop()
    [(subject, _, headers, _)] = lane.cluster.published
    assert (subject, headers) == ("out.pump-1", None)  # not an empty header block


async def test_a_replayed_message_for_a_cluster_still_down_is_nakd_not_parked_again(rig: Rig) -> None:
    lane = rig.lane()
    lane.cluster.connected = False
    rig.routes["assets.pump-1.temp"] = (lane, "out.pump-1")
    rig.pipeline.start()
    parked = parked_message({PARKED_ID_HEADER: "ASSETS:42"})
    await rig.pipeline.replayer("C1")(parked)
    await rig.pipeline.stop()
    assert rig.source.parks == []
    assert rig.source.outcomes() == {parked.reply: ["nak"]}
    assert stats_of(lane.cluster) == {"redeliveries": 1}


async def test_a_replayed_message_without_the_parked_id_keeps_its_park_stream_identity(rig: Rig) -> None:
    lane = rig.lane(jetstream=True)
    rig.routes["assets.pump-1.temp"] = (lane, "out.pump-1")
    parked = parked_message(None)
    await rig.pipeline.replayer("C1")(parked)
    assert parked.origin_id == "PARK:3"
    assert lane.cluster.published[0][2] == {MSG_ID_HEADER: "PARK:3"}


async def test_stop_confirms_what_was_submitted_cluster_lanes_first(rig: Rig) -> None:
    core, js = rig.lane("C1"), rig.lane("C2", jetstream=True)
    core_flush = gate()
    core.cluster.flush_gates.append(core_flush)
    js.cluster.has_stream = False
    rig.source.park_resolves = True
    rig.pipeline.start()
    to_core, to_js, dead = message(), message(), message(subject="assets")
    await core.submit(to_core, to_core.subject)
    await js.submit(to_js, to_js.subject)
    await rig.dead.submit(dead, Rejection("no_key_token", "subject has no token 1"))
    await core.cluster.flush_started.wait()
    stopping = asyncio.get_running_loop().create_task(rig.pipeline.stop())
    await spin()
    # While the cluster lanes finish, they still park and dead-letter: those lanes wait for them.
    assert not stopping.done()
    core.cluster.connected = False
    core_flush.set_exception(TimeoutError())
    js.cluster.pub_acks[0].set_exception(nats.js.errors.NoStreamResponseError())
    await stopping
    assert all(task.done() for task in rig.tasks())
    assert rig.source.outcomes() == {to_core.reply: ["ack"], to_js.reply: ["ack"], dead.reply: ["ack"]}
    assert [p[0] for p in rig.source.parks] == [to_core.reply]
    assert rig.stats.dead_lettered == {"no_key_token": 1, NO_STREAM: 1}


async def test_retire_confirms_a_lanes_batch_before_it_ends(rig: Rig) -> None:
    keep, leave = rig.lane("C1"), rig.lane("C2")
    flush = gate()
    leave.cluster.flush_gates.append(flush)
    rig.pipeline.start()
    m = message()
    await leave.submit(m, m.subject)
    await leave.cluster.flush_started.wait()
    retiring = asyncio.get_running_loop().create_task(rig.pipeline.retire([leave]))
    await spin()
    assert not retiring.done()
    assert rig.pipeline._lanes == [keep]
    resolve(flush)
    await retiring
    assert rig.source.outcomes() == {m.reply: ["ack"]}
    assert leave._task is not None
    assert leave._task.done()
    await rig.pipeline.stop()
