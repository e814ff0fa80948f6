"""The log events of the forwarding path carry ``cluster`` / ``subject`` / ``asset`` where they apply.

Pure logic with fakes: a recording logger stands in for structlog, a fake connection for the
source. (That the lines reach stdout as redacted JSON is tests/test_logs.py; that a real
forwarder writes them is tests/integration/test_observability.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.aio.msg import Msg

from forwarder.acking import ClusterLane, DeadLetterLane, JetStreamLane, ParkLane
from forwarder.cluster import MessageTooLargeError
from forwarder.config import KeySettings, RoutingSettings
from forwarder.hashring import build_ring
from forwarder.logs import RateLimitedLogger
from forwarder.pipeline import TOO_LARGE, CorePipeline, DeadLetters
from forwarder.router import (
    BAD_TARGET_SUBJECT,
    KEY_NOT_UTF8,
    KEY_TOO_LONG,
    NO_KEY_HEADER,
    SHOWN_ASSET_CHARS,
    Rejection,
    Router,
)
from forwarder.stats import ForwardingStats


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))


def router(key: KeySettings, template: str = "{subject}") -> Router[str]:
    routing = RoutingSettings(key=key, subject_template=template)
    return Router(routing, build_ring("rendezvous", {"C1": 1, "C2": 1}), {"C1": "C1", "C2": "C2"})


def msg(subject: str, data: bytes = b"{}", headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=None, subject=subject, reply="", data=data, headers=headers)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the router: asset and rejections


def test_a_rejection_names_the_asset_where_the_key_was_found():
    by_token = router(KeySettings("subject_token", token=1), template="{token[0]}.{asset}.{token[2]}")
    rejection = by_token.route("assets.pump-7", None, b"")
    assert isinstance(rejection, Rejection)
    assert (rejection.reason, rejection.asset) == (BAD_TARGET_SUBJECT, "pump-7")

    by_json = router(KeySettings("json_field", field="id"))
    too_long = by_json.route("assets.x", None, b'{"id": "%s"}' % (b"a" * 2000))
    assert isinstance(too_long, Rejection)
    assert too_long.reason == KEY_TOO_LONG
    assert too_long.asset == "a" * SHOWN_ASSET_CHARS  # bounded

    lone = by_json.route("assets.x", None, b'{"id": "pump\\ud800"}')
    assert isinstance(lone, Rejection)
    assert (lone.reason, lone.asset) == (KEY_NOT_UTF8, "pump\\ud800")  # escaped, printable


def test_a_rejection_without_a_key_names_no_asset():
    rejection = router(KeySettings("header", header="Asset-Id")).route("assets.x", None, b"")
    assert isinstance(rejection, Rejection)
    assert (rejection.reason, rejection.asset, rejection.cluster) == (NO_KEY_HEADER, None, None)


def test_the_context_takes_no_part_in_equality():
    assert Rejection("r", "d", asset="a", cluster="C1") == Rejection("r", "d")
    assert hash(Rejection("r", "d", asset="a")) == hash(Rejection("r", "d"))


@pytest.mark.parametrize(
    ("key", "subject", "headers", "payload", "asset"),
    [
        (KeySettings("subject_token", token=1), "assets.pump-7.temp", None, b"", "pump-7"),
        (KeySettings("subject_token", token=3), "assets.pump-7.temp", None, b"", None),
        (KeySettings("header", header="Asset-Id"), "a.b", {"Asset-Id": " pump-7 "}, b"", "pump-7"),
        (KeySettings("header", header="Asset-Id"), "a.b", None, b"", None),
        (KeySettings("json_field", field="id"), "a.b", None, b'{"id": "pump-7"}', "pump-7"),
        (KeySettings("json_field", field="id"), "a.b", None, b'{"id": 7}', None),
        (KeySettings("json_field", field="id"), "a.b", None, b"[1]", None),
        (KeySettings("json_field", field="id"), "a.b", None, b"not json", None),
        (KeySettings("json_field", field="id", max_json_bytes=4), "a.b", None, b'{"id": "p"}', None),
    ],
)
def test_asset_of_finds_the_key_of_each_mode(key, subject, headers, payload, asset):
    assert router(key).asset_of(subject, headers, payload) == asset


# ------------------------------------------------------------------ dead letters


class FakeSource:
    max_payload = 1024 * 1024

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, dict[str, str] | None]] = []

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.published.append((subject, payload, headers))


def dead_letters(asset_of: Any = None) -> tuple[DeadLetters, Recorder]:
    dl = DeadLetters("forwarder.dead", FakeSource(), ForwardingStats())
    rec = Recorder()
    dl._log = RateLimitedLogger(rec)
    dl.asset_of = asset_of
    return dl, rec


async def test_a_dead_letter_line_names_subject_reason_and_the_asset_the_router_found():
    dl, rec = dead_letters()
    await dl.send(msg("assets.pump-7"), Rejection(BAD_TARGET_SUBJECT, "no token 2", asset="pump-7"))
    [(level, event, kw)] = rec.lines
    assert (level, event) == ("warning", "dead_letter")
    assert kw == {
        "reason": BAD_TARGET_SUBJECT,
        "detail": "no token 2",
        "subject": "assets.pump-7",
        "asset": "pump-7",
    }


async def test_a_dead_letter_refused_by_its_cluster_names_the_cluster_and_looks_up_the_asset():
    seen: list[str] = []

    def asset_of(subject: str, headers: Any, payload: bytes) -> str:
        seen.append(subject)
        return "pump-7"

    dl, rec = dead_letters(asset_of)
    await dl.send(msg("assets.pump-7.temp"), Rejection(TOO_LARGE, "too big", cluster="C2"))
    assert rec.lines[0][2]["cluster"] == "C2"
    assert rec.lines[0][2]["asset"] == "pump-7"
    # Only for messages that were routed: a rejection by the router never re-parses the message.
    await dl.send(msg("assets"), Rejection(NO_KEY_HEADER, "no header"))
    assert seen == ["assets.pump-7.temp"]


async def test_a_dead_letter_subject_that_is_not_utf8_is_escaped():
    dl, rec = dead_letters()
    await dl.send(msg("assets.\udcff.x"), Rejection(KEY_NOT_UTF8, "not UTF-8"))
    assert rec.lines[0][2]["subject"] == "assets.\\xff.x"


class FakeCluster:
    def __init__(self, name: str, error: Exception) -> None:
        self.name = name
        self.error = error
        self.publish_errors = 0
        self.forwarded = 0
        self.redeliveries = 0
        self.parked = 0
        self.connected = True
        self.settings = None

    def try_publish(self, subject: str, payload: bytes) -> bool:
        return False  # the synchronous fast path declines: the awaited publish raises

    async def publish(self, subject: str, payload: bytes, headers: Any = None) -> None:
        raise self.error


async def test_core_pipeline_too_large_dead_letter_names_cluster_and_asset():
    dl, rec = dead_letters(router(KeySettings("subject_token", token=1)).asset_of)
    cluster = FakeCluster("C2", MessageTooLargeError("C2", 2000, 1024))
    pipeline = CorePipeline(dl, ForwardingStats())
    pipeline.use(lambda s, h, d: (cluster, s))
    await pipeline.handle(msg("assets.pump-7.temp"))
    kw = rec.lines[0][2]
    assert (kw["reason"], kw["cluster"], kw["asset"], kw["subject"]) == (
        TOO_LARGE,
        "C2",
        "pump-7",
        "assets.pump-7.temp",
    )


async def test_core_pipeline_publish_failure_names_cluster_and_subject():
    dl, _ = dead_letters()
    cluster = FakeCluster("C3", ConnectionResetError("reset"))
    pipeline = CorePipeline(dl, ForwardingStats())
    pipeline.use(lambda s, h, d: (cluster, s))
    rec = Recorder()
    pipeline._log = RateLimitedLogger(rec)
    await pipeline.handle(msg("assets.pump-7.temp"))
    assert cluster.publish_errors == 1
    [(_, event, kw)] = rec.lines
    assert event == "publish_failed"
    assert (kw["cluster"], kw["subject"]) == ("C3", "assets.pump-7.temp")


# ------------------------------------------------------------------ the acking lanes


class FakeAcks:
    parking = True

    def __init__(self) -> None:
        self.naks: list[tuple[str, float]] = []

    async def ack(self, msgs: Any) -> None: ...

    async def nak(self, msg: Msg, delay: float) -> None:
        self.naks.append((msg.subject, delay))

    def backoff(self, msg: Msg) -> float:
        return 2.0

    async def flush(self, timeout: float) -> None: ...


def bound_context(lane: Any) -> dict[str, Any]:
    return dict(lane.log._log._context)


def test_only_cluster_lanes_say_cluster():
    acks = FakeAcks()
    stats = ForwardingStats()
    dl, _ = dead_letters()
    dead = DeadLetterLane(dl, acks, stats, timeout=1)
    cluster: Any = FakeCluster("C1", OSError())
    assert bound_context(dead) == {"lane": "dead-letter"}
    assert bound_context(ParkLane(acks, stats, timeout=1)) == {"lane": "park"}  # type: ignore[arg-type]
    assert bound_context(ClusterLane(cluster, acks, stats, dead, timeout=1)) == {"cluster": "C1"}
    assert bound_context(JetStreamLane(cluster, acks, stats, dead, timeout=1)) == {"cluster": "C1"}


async def test_a_scheduled_redelivery_names_the_subject_and_its_cluster():
    acks = FakeAcks()
    stats = ForwardingStats()
    dl, _ = dead_letters()
    cluster: Any = FakeCluster("C1", OSError())
    lane = ClusterLane(cluster, acks, stats, DeadLetterLane(dl, acks, stats, timeout=1), timeout=1)
    rec = Recorder()
    lane.log = RateLimitedLogger(rec)
    await lane._refuse(msg("assets.pump-7.temp"), "cluster unavailable")
    assert acks.naks == [("assets.pump-7.temp", 2.0)]
    assert cluster.redeliveries == 1
    [(_, event, kw)] = rec.lines
    assert event == "redelivery_scheduled"
    assert kw == {"reason": "cluster unavailable", "delay": 2.0, "subject": "assets.pump-7.temp"}


async def test_parked_messages_are_logged_per_cluster():
    class ParkingSource(FakeAcks):
        async def park(self, msg: Msg, cluster: str, origin_id: str) -> asyncio.Future[Any]:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_result(object())
            return future

    source = ParkingSource()
    stats = ForwardingStats()
    dl, _ = dead_letters()
    dead = DeadLetterLane(dl, source, stats, timeout=1)
    park = ParkLane(source, stats, timeout=1)  # type: ignore[arg-type]
    rec = Recorder()
    park.log = RateLimitedLogger(rec)
    lanes = {}
    for name in ("C1", "C2"):
        cluster: Any = FakeCluster(name, OSError())
        lanes[name] = ClusterLane(cluster, source, stats, dead, timeout=1)
    for name, n in (("C1", 3), ("C2", 1)):
        for i in range(n):
            await park.submit(msg(f"assets.a{i}.v"), lanes[name])
    await park._confirm(park._batch)
    assert sorted((kw["cluster"], kw["count"]) for _, _, kw in rec.lines) == [("C1", 3), ("C2", 1)]
    assert (lanes["C1"].cluster.parked, lanes["C2"].cluster.parked) == (3, 1)
