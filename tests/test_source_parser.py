"""SourceParser against nats-py's own parser: the same callbacks for any split into reads."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.protocol.parser import Parser

from forwarder.source import SOURCE_MSG_FIELDS, SourceClient, SourceMsg, SourceParser, UnstampedSourceClient


class Recorder:
    """Stands in for the client: records what the parser hands it, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), data, headers))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


def op_msg(subject: str, sid: int, payload: bytes, reply: str = "") -> bytes:
    reply_part = f" {reply}" if reply else ""
    return f"MSG {subject} {sid}{reply_part} {len(payload)}\r\n".encode() + payload + b"\r\n"


def op_hmsg(subject: str, sid: int, headers: bytes, payload: bytes) -> bytes:
    line = f"HMSG {subject} {sid} {len(headers)} {len(headers) + len(payload)}\r\n".encode()
    return line + headers + payload + b"\r\n"


ops = st.one_of(
    st.builds(
        op_msg,
        st.sampled_from(["assets.a.b", "assets.x\x0by.z", "a"]),
        st.integers(1, 9),
        st.binary(max_size=300),
        st.sampled_from(["", "_INBOX.abc"]),
    ),
    st.builds(
        op_hmsg,
        st.sampled_from(["assets.a.b", "x.y"]),
        st.integers(1, 9),
        st.sampled_from([b"NATS/1.0\r\nA: b\r\n\r\n", b"NATS/1.0\r\n\r\n"]),
        st.binary(max_size=100),
    ),
    st.just(b"PING\r\n"),
    st.just(b"PONG\r\n"),
    st.just(b"+OK\r\n"),
    st.just(b'INFO {"server_id":"x","max_payload":1048576}\r\n'),
)


async def feed(parser_class: type[Parser], stream: bytes, cuts: list[int]) -> list[tuple[Any, ...]]:
    rec = Recorder()
    parser = parser_class(rec)
    last = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        await parser.parse(stream[last:cut])
        last = cut
    return rec.calls


def nats_py_parser() -> type[Parser]:
    """nats-py's own loop with our patterns: the reference."""

    class Reference(Parser):
        parse = SourceParser._nats_py_parse  # type: ignore[assignment]

    return Reference


@settings(max_examples=300, deadline=None)
@given(data=st.data())
async def test_any_split_into_reads_gives_the_same_callbacks_as_nats_py(data: st.DataObject) -> None:
    stream = b"".join(data.draw(st.lists(ops, min_size=1, max_size=30)))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    expected = await feed(nats_py_parser(), stream, [])
    assert await feed(SourceParser, stream, cuts) == expected
    assert await feed(nats_py_parser(), stream, cuts) == expected


class CountingBuffer(bytearray):
    """The parser's read buffer, counting the deletions that move what follows."""

    deletions = 0

    def __delitem__(self, key: Any) -> None:
        self.deletions += 1
        super().__delitem__(key)


async def test_a_read_of_many_messages_compacts_the_buffer_once() -> None:
    stream = b"".join(op_msg("assets.a.b", 1, b"x" * 100) for _ in range(300)) + b"MSG assets.a.b 1 10\r\nabc"
    parser = SourceParser(Recorder())
    buffer = parser.buf = CountingBuffer()
    await parser.parse(stream)
    assert len(parser.nc.calls) == 300
    assert buffer.deletions == 1  # nats-py's loop deletes once per message: 300
    assert bytes(parser.buf) == b"abc"  # the message that has not fully arrived yet
    await parser.parse(b"defghij\r\n")
    assert parser.nc.calls[-1][4] == b"abcdefghij"
    assert not parser.buf


def test_messages_are_built_with_every_field_where_its_name_says() -> None:
    # _build_message passes the fields by position: nats-py's Msg must still have this order.
    assert tuple(f.name for f in dataclasses.fields(SourceMsg)) == SOURCE_MSG_FIELDS
    client = SourceClient()
    client.read_at = 12.5
    msg = client._build_message(7, b"assets.a\xff.b", b"$JS.ACK.S.C.1.2.3.4.0", b"data", {"A": "b"})
    assert (msg._client, msg._sid, msg.data, msg.headers) == (client, 7, b"data", {"A": "b"})
    assert msg.subject == "assets.a\udcff.b"  # undecodable bytes kept as lone surrogates
    assert (msg.reply, msg.reply_bytes) == ("$JS.ACK.S.C.1.2.3.4.0", b"$JS.ACK.S.C.1.2.3.4.0")
    assert (msg.received_at, msg._metadata, msg._ackd, msg.origin_id) == (12.5, None, False, None)
    unstamped = UnstampedSourceClient()._build_message(3, b"a.b", b"", b"x", None)
    assert (unstamped.subject, unstamped.reply, unstamped._sid, unstamped.received_at) == ("a.b", "", 3, 0.0)
    assert (unstamped._metadata, unstamped._ackd, unstamped.headers) == (None, False, None)
