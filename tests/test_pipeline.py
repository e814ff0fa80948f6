"""Unit tests for forwarder.pipeline: dead letters and the header-size arithmetic behind them.

Pure: a fake connection records what would be published. ``header_block_size`` is checked
against the bytes nats-py's own publish code produces (its ``_send_publish`` with the write
replaced by a capture), so a change in nats-py's header encoding fails here.
"""

from __future__ import annotations

import asyncio
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg

from forwarder.natsconn import header_block_size
from forwarder.pipeline import (
    ERROR_HEADER,
    SUBJECT_HEADER,
    TRUNCATED_HEADER,
    DeadLetters,
    printable,
)
from forwarder.router import Rejection
from forwarder.stats import ForwardingStats

DEAD = "forwarder.dead"
REJECTION = Rejection("no_key_header", "no Asset-Id header")


class FakeSourceConnection:
    """Where dead letters go; records each publish."""

    def __init__(self, max_payload: int = 1024 * 1024, fail: BaseException | None = None) -> None:
        self._max_payload = max_payload
        self.fail = fail
        self.published: list[tuple[str, bytes, dict[str, str] | None]] = []

    @property
    def max_payload(self) -> int:
        return self._max_payload

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        if self.fail is not None:
            raise self.fail
        self.published.append((subject, payload, headers))


def message(
    subject: str = "assets.x", data: bytes = b"payload", headers: dict[str, str] | None = None
) -> Msg:
    return Msg(_client=None, subject=subject, data=data, headers=headers)  # type: ignore[arg-type]


def dead_letters(max_payload: int = 1024 * 1024) -> tuple[DeadLetters, FakeSourceConnection, ForwardingStats]:
    conn = FakeSourceConnection(max_payload)
    stats = ForwardingStats()
    return DeadLetters(DEAD, conn, stats), conn, stats


# --------------------------------------------------------------------------- nats-py's bytes

HPUB_RE = re.compile(rb"HPUB (\S+) +(\d+) (\d+)\r\n")


def nats_py_header_block(headers: dict[str, str], payload: bytes = b"data") -> bytes:
    """The header block that nats-py itself writes for ``headers``, taken from its HPUB command."""
    client = Client()
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    asyncio.run(client._send_publish("subj", "", payload, len(payload), headers))
    (command,) = sent
    m = HPUB_RE.match(command)
    assert m is not None, command[:80]
    header_len, total = int(m.group(2)), int(m.group(3))
    assert total == header_len + len(payload)
    block = command[m.end() : m.end() + header_len]
    assert block.startswith(b"NATS/1.0\r\n")
    assert block.endswith(b"\r\n\r\n")
    assert command[m.end() + header_len :] == payload + b"\r\n"
    return block


@pytest.mark.parametrize(
    "headers",
    [
        {"A": "b"},
        {"Forwarder-Error": "no_key_token: subject has no token 1", "Forwarder-Subject": "assets"},
        {"Nats-Msg-Id": "S:1", "X": "ä東京🙂"},
        {"Empty": ""},
        {"K": " padded value \t"},
        {" Spaced-Key ": "v"},
        {"Multi": "line1\r\nline2\nline3"},
        {"A": "1", " ": "skipped", "B": "2"},
        {},
    ],
    ids=lambda h: repr(h)[:40],
)
def test_header_block_size_is_what_nats_py_writes(headers: dict[str, str]) -> None:
    assert header_block_size(headers) == len(nats_py_header_block(headers))


def test_no_headers_is_no_header_block() -> None:
    assert header_block_size(None) == 0


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
HEADER_KEY = st.text(alphabet=TOKEN_CHARS, min_size=1)
HEADER_VALUE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)  # no lone surrogates


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.tuples(st.sampled_from(["", " ", "\t"]), HEADER_KEY, st.sampled_from(["", " "])).map("".join),
        HEADER_VALUE,
        max_size=6,
    )
)
def test_header_block_size_matches_nats_py_for_any_headers(headers: dict[str, str]) -> None:
    assert header_block_size(headers) == len(nats_py_header_block(headers))


# --------------------------------------------------------------------------- dead letters


def test_our_headers_are_added_and_the_original_headers_kept() -> None:
    dl, _, _ = dead_letters()
    msg = message("assets.x", b'{"v": 1}', {"Trace-Id": "abc", "Content-Type": "application/json"})
    payload, headers = dl.build(msg, REJECTION)
    assert payload == b'{"v": 1}'
    assert headers == {
        "Trace-Id": "abc",
        "Content-Type": "application/json",
        ERROR_HEADER: "no_key_header: no Asset-Id header",
        SUBJECT_HEADER: "assets.x",
    }
    assert msg.headers == {"Trace-Id": "abc", "Content-Type": "application/json"}  # not modified


def test_a_message_without_headers_gets_ours_only() -> None:
    dl, _, _ = dead_letters()
    payload, headers = dl.build(message("assets", b"x"), Rejection("no_key_token", "subject has no token 1"))
    assert payload == b"x"
    assert headers == {ERROR_HEADER: "no_key_token: subject has no token 1", SUBJECT_HEADER: "assets"}


def test_our_headers_replace_earlier_ones_of_the_same_name() -> None:
    # A dead letter that is fed back in and rejected again carries the new reason.
    dl, _, _ = dead_letters()
    old = {ERROR_HEADER: "old: reason", SUBJECT_HEADER: "old.subject"}
    _, headers = dl.build(message("new.subject", b"x", old), REJECTION)
    assert headers[ERROR_HEADER] == REJECTION.header()
    assert headers[SUBJECT_HEADER] == "new.subject"


def test_a_subject_that_is_not_utf8_is_shown_escaped() -> None:
    # The source decodes subjects with surrogateescape: the byte 0xff arrives as U+DCFF.
    subject = b"assets.p\xff\xfe.x".decode("utf-8", "surrogateescape")
    dl, _, _ = dead_letters()
    _, headers = dl.build(message(subject), REJECTION)
    assert headers[SUBJECT_HEADER] == "assets.p\\xff\\xfe.x"
    headers[SUBJECT_HEADER].encode("utf-8")  # publishable: no surrogate left
    assert printable("assets.ä") == "assets.ä"  # valid UTF-8 is shown as it is


def test_long_reasons_and_subjects_are_capped() -> None:
    dl, _, _ = dead_letters()
    _, headers = dl.build(message("a." + "s" * 5000), Rejection("bad_target_subject", "d" * 5000))
    assert len(headers[ERROR_HEADER]) == 512
    assert headers[ERROR_HEADER].startswith("bad_target_subject: ddd")
    assert headers[SUBJECT_HEADER] == ("a." + "s" * 5000)[:1024]


def test_a_long_non_ascii_subject_fits_a_small_max_payload() -> None:
    limit = 1024
    dl, _, _ = dead_letters(limit)
    payload, headers = dl.build(message("a." + "ü" * 4000, b"x" * 100), REJECTION)
    assert len(nats_py_header_block(headers, payload)) + len(payload) <= limit
    assert headers[SUBJECT_HEADER].startswith("a.üü")
    headers[SUBJECT_HEADER].encode("utf-8")  # cut at a character boundary


def test_a_dead_letter_that_fits_is_not_cut() -> None:
    limit = 2048
    dl, _, _ = dead_letters(limit)
    ours = header_block_size({ERROR_HEADER: REJECTION.header(), SUBJECT_HEADER: "assets.x"})
    data = b"p" * (limit - ours)  # exactly the limit with our headers
    payload, headers = dl.build(message("assets.x", data), REJECTION)
    assert payload == data
    assert TRUNCATED_HEADER not in headers


def test_a_dead_letter_over_max_payload_is_cut_to_fit() -> None:
    limit = 4096
    dl, _, _ = dead_letters(limit)
    data = bytes(range(256)) * 40  # 10240 bytes
    msg = message("assets.x", data, {"Trace-Id": "abc"})
    payload, headers = dl.build(msg, REJECTION)
    assert headers[TRUNCATED_HEADER] == "10240"
    assert headers["Trace-Id"] == "abc"  # small original headers survive the cut
    assert headers[ERROR_HEADER] == REJECTION.header()
    assert data.startswith(payload)
    size = len(nats_py_header_block(headers, payload)) + len(payload)
    assert size == limit  # cut to fit, and not shorter than it has to be


async def test_a_cut_dead_letter_is_published_and_counted() -> None:
    dl, conn, stats = dead_letters(4096)
    assert await dl.send(message("assets.x", b"z" * 100_000), REJECTION)
    (subject, payload, headers) = conn.published[0]
    assert subject == DEAD
    assert headers is not None
    assert headers[TRUNCATED_HEADER] == "100000"
    assert header_block_size(headers) + len(payload) <= 4096
    assert stats.dead_lettered == {"no_key_header": 1}
    assert stats.dead_letter_failures == 0


def test_original_headers_that_crowd_the_limit_give_way_to_ours() -> None:
    limit = 4096
    dl, _, _ = dead_letters(limit)
    big = {f"Big-{i}": "v" * 500 for i in range(6)}  # about 3 KB of headers alone
    payload, headers = dl.build(message("assets.x", b"q" * 1000, big), REJECTION)
    assert headers == {
        ERROR_HEADER: REJECTION.header(),
        SUBJECT_HEADER: "assets.x",
        TRUNCATED_HEADER: "1000",
    }
    assert payload == b"q" * 1000  # with the big headers gone, the payload fits whole
    assert len(nats_py_header_block(headers, payload)) + len(payload) <= limit


def test_headers_larger_than_the_limit_alone_give_way_to_ours() -> None:
    limit = 4096
    dl, _, _ = dead_letters(limit)
    payload, headers = dl.build(message("assets.x", b"q" * 10, {"Huge": "h" * 10_000}), REJECTION)
    assert "Huge" not in headers
    assert headers[TRUNCATED_HEADER] == "10"
    assert len(nats_py_header_block(headers, payload)) + len(payload) <= limit


@settings(max_examples=100, deadline=None)
@given(
    limit=st.integers(min_value=1024, max_value=70_000),
    size=st.integers(min_value=0, max_value=100_000),
    original=st.dictionaries(
        st.text(alphabet="ABCDEFGHIJ-", min_size=1, max_size=12),
        st.text(max_size=3000).map(str.strip),
        max_size=5,
    ),
    subject=st.text(min_size=1, max_size=3000),
)
def test_every_dead_letter_fits_the_source_max_payload(
    limit: int, size: int, original: dict[str, str], subject: str
) -> None:
    dl, _, _ = dead_letters(limit)
    payload, headers = dl.build(message(subject, b"d" * size, original), REJECTION)
    assert len(nats_py_header_block(headers, payload)) + len(payload) <= limit
    if header_block_size(headers) + size > limit:
        assert headers[TRUNCATED_HEADER] == str(size)


async def test_a_failed_dead_letter_is_counted_and_reported() -> None:
    import nats.errors

    conn = FakeSourceConnection(fail=nats.errors.ConnectionClosedError())
    stats = ForwardingStats()
    dl = DeadLetters(DEAD, conn, stats)
    assert not await dl.send(message(), REJECTION)
    assert stats.dead_lettered == {"no_key_header": 1}
    assert stats.dead_letter_failures == 1
