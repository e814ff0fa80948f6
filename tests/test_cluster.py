"""``PubAckWindow``: the bound on JetStream publishes awaiting their PubAck, and how replies settle them.

The window's logic only: the client is a recorder of publishes and the replies are handed
in as the reply subscription would. The same window against real JetStream targets is
covered by tests/integration/test_jetstream.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import nats.js.errors
import pytest
from nats.aio.msg import Msg

from forwarder.cluster import PubAckWindow
from tests.helpers import async_wait_until

PREFIX = "_INBOX.test."


class RecordingClient:
    """What the window calls on a nats-py client: ``publish`` with a reply subject."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, str, dict[str, str]]] = []

    async def publish(self, subject: str, payload: bytes, *, reply: str, headers: dict[str, str]) -> None:
        self.published.append((subject, payload, reply, headers))


def reply_to(reply_subject: str, body: dict[str, Any] | None = None, status: str | None = None) -> Msg:
    data = json.dumps(body).encode() if body is not None else b""
    headers = {"Status": status} if status is not None else None
    return Msg(_client=None, subject=reply_subject, data=data, headers=headers)  # type: ignore[arg-type]


async def publish(window: PubAckWindow, nc: RecordingClient, n: int) -> asyncio.Future[Any]:
    # No buffered writer: every publish goes through the client's ``publish``, which records it.
    return await window.publish(nc, None, f"out.{n}", b"x", {"Nats-Msg-Id": f"S:{n}"})  # type: ignore[arg-type]


async def test_no_more_than_max_pending_publishes_await_their_pub_ack() -> None:
    window, nc = PubAckWindow(PREFIX, 2), RecordingClient()
    first = await publish(window, nc, 1)
    await publish(window, nc, 2)
    third = asyncio.ensure_future(publish(window, nc, 3))
    fourth = asyncio.ensure_future(publish(window, nc, 4))
    for _ in range(20):  # let both run as far as they can
        await asyncio.sleep(0)
    assert [p[0] for p in nc.published] == ["out.1", "out.2"]
    assert not third.done()
    assert not fourth.done()

    await window._on_reply(reply_to(nc.published[0][2], {"stream": "OUT", "seq": 1}))
    assert first.result().seq == 1
    await async_wait_until(lambda: len(nc.published) == 3, 5)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(nc.published) == 3, "one PubAck frees one place, not two"

    await window._on_reply(reply_to(nc.published[1][2], {"stream": "OUT", "seq": 2}))
    await async_wait_until(lambda: len(nc.published) == 4, 5)
    assert third.done()
    assert fourth.done()


async def test_a_cancelled_waiter_leaves_the_others_waiting_and_frees_nothing() -> None:
    window, nc = PubAckWindow(PREFIX, 1), RecordingClient()
    await publish(window, nc, 1)
    waiting = [asyncio.ensure_future(publish(window, nc, n)) for n in (2, 3)]
    await asyncio.sleep(0)
    waiting[0].cancel()
    await asyncio.gather(waiting[0], return_exceptions=True)
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting[1].done(), "the cancelled waiter gave the other a place it never had"
    await window._on_reply(reply_to(nc.published[0][2], {"stream": "OUT", "seq": 1}))
    await async_wait_until(lambda: waiting[1].done(), 5)
    assert [p[0] for p in nc.published] == ["out.1", "out.3"]


async def test_a_pub_ack_a_refusal_and_no_responders_each_settle_their_own_publish() -> None:
    window, nc = PubAckWindow(PREFIX, 10), RecordingClient()
    accepted, duplicate, refused, no_stream = [await publish(window, nc, n) for n in range(4)]
    replies = [p[2] for p in nc.published]
    assert len(set(replies)) == 4
    assert all(r.startswith(PREFIX) for r in replies)
    refusal = {"error": {"code": 400, "err_code": 10054, "description": "message size exceeds maximum"}}
    await window._on_reply(reply_to(replies[2], refusal))
    await window._on_reply(reply_to(replies[3], status="503"))
    await window._on_reply(reply_to(replies[1], {"stream": "OUT", "seq": 7, "duplicate": True}))
    await window._on_reply(reply_to(replies[0], {"stream": "OUT", "seq": 8, "domain": "hub"}))

    assert (accepted.result().stream, accepted.result().seq, accepted.result().duplicate) == ("OUT", 8, None)
    assert duplicate.result().duplicate is True
    assert isinstance(refused.exception(), nats.js.errors.APIError)
    assert refused.exception().err_code == 10054
    assert isinstance(no_stream.exception(), nats.js.errors.NoStreamResponseError)


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"seq": 1}', b"[" * 100_000],
    ids=["not-json", "a-list", "no-stream", "nested-past-the-recursion-limit"],
)
async def test_an_unreadable_pub_ack_fails_its_publish_instead_of_hanging(body: bytes) -> None:
    window, nc = PubAckWindow(PREFIX, 10), RecordingClient()
    future = await publish(window, nc, 1)
    await window._on_reply(Msg(_client=None, subject=nc.published[0][2], data=body))  # type: ignore[arg-type]
    assert isinstance(future.exception(), nats.js.errors.Error)
    assert "unreadable PubAck" in str(future.exception())


async def test_replies_from_the_read_loop_settle_like_those_through_nats_py() -> None:
    """``settle`` takes the bytes as the parser has them (TargetClient); it must never raise."""
    window, nc = PubAckWindow(PREFIX, 10), RecordingClient()
    accepted, no_stream = [await publish(window, nc, n) for n in range(2)]
    replies = [p[2].encode() for p in nc.published]
    window.settle(replies[1], b"", b"NATS/1.0 503\r\n\r\n")
    window.settle(replies[0], b'{"stream":"OUT","seq":5}', None)
    window.settle(replies[0], b'{"stream":"OUT","seq":6}', None)  # a second reply: ignored
    window.settle(PREFIX.encode() + b"999", b"{}", None)  # no such publish: ignored
    window.settle(PREFIX.encode(), b"", None)
    assert accepted.result().seq == 5
    assert isinstance(no_stream.exception(), nats.js.errors.NoStreamResponseError)


class FailingClient(RecordingClient):
    async def publish(self, subject: str, payload: bytes, *, reply: str, headers: dict[str, str]) -> None:
        raise OSError("connection lost mid-write")


async def test_a_publish_that_fails_to_write_gives_its_place_back() -> None:
    window = PubAckWindow(PREFIX, 1)
    for _ in range(3):  # with a window of one, a place not given back would block the second
        with pytest.raises(OSError, match="mid-write"):
            await asyncio.wait_for(publish(window, FailingClient(), 1), 5)
    nc = RecordingClient()
    await asyncio.wait_for(publish(window, nc, 2), 5)
    assert len(nc.published) == 1
