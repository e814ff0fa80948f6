"""Pure pieces of the hardening, without a server: credentials files, header blocks, dead letters."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import nats.errors
import pytest

from forwarder.logs import redactor
from forwarder.natsconn import (
    ATTENTION_STICKS,
    MAX_CREDENTIALS_BYTES,
    CredentialsError,
    credentials_callbacks,
    describe_error,
    needs_attention,
    read_credentials,
    read_seed,
    telling_reason,
)
from forwarder.pipeline import TRUNCATED_HEADER, DeadLetters
from forwarder.router import BAD_HEADERS, MalformedHeaders, Rejection
from forwarder.source import SourceClient, SourceMsg
from forwarder.stats import ForwardingStats
from tests.security_helpers import OperatorChain, creds_text, user_nkey

# --------------------------------------------------------------------------- credentials files


@pytest.fixture(scope="module")
def user() -> tuple[str, Any]:
    jwt, key = OperatorChain.create("unit").user()
    return jwt, key


def test_a_creds_file_gives_its_jwt_and_seed_and_registers_them_for_redaction(tmp_path, user):
    jwt, key = user
    path = tmp_path / "u.creds"
    path.write_text(creds_text(jwt, key.seed))
    assert read_credentials(str(path)) == (jwt, key.seed)
    assert redactor.redact(f"x {jwt} {key.seed} y") == "x *** *** y"


def test_windows_line_endings_are_fine(tmp_path, user):
    jwt, key = user
    path = tmp_path / "u.creds"
    path.write_bytes(creds_text(jwt, key.seed).replace("\n", "\r\n").encode())
    assert read_credentials(str(path)) == (jwt, key.seed)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("", "no NATS USER JWT block"),
        ("garbage\n", "no NATS USER JWT block"),
        (
            "-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n",
            "no NATS USER JWT block",
        ),
        ("-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n", "no USER NKEY SEED block"),
        (
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n"
            "-----BEGIN USER NKEY SEED-----\nSUNOTASEED\n------END USER NKEY SEED------\n",
            "does not hold a valid NKey seed",
        ),
        ("\x00\xff\xfe" * 10, "no NATS USER JWT block"),
    ],
)
def test_an_unusable_creds_file_is_a_named_retryable_error(tmp_path, user, content, phrase):
    jwt, key = user
    path = tmp_path / "u.creds"
    path.write_text(content.format(jwt=jwt, seed=key.seed), errors="surrogateescape")
    with pytest.raises(CredentialsError) as info:
        read_credentials(str(path))
    assert phrase in str(info.value)
    assert str(path) in str(info.value)
    assert isinstance(info.value, nats.errors.Error)  # nats-py's connect loops retry on it
    assert key.seed not in str(info.value)
    assert jwt not in str(info.value)


def test_a_missing_or_oversized_creds_file(tmp_path):
    with pytest.raises(CredentialsError, match="cannot read credentials file"):
        read_credentials(str(tmp_path / "absent.creds"))
    big = tmp_path / "big.creds"
    big.write_bytes(b"x" * (MAX_CREDENTIALS_BYTES + 1))
    with pytest.raises(CredentialsError, match="larger than"):
        read_credentials(str(big))


def test_the_callbacks_sign_the_nonce_with_the_file_read_at_that_moment(tmp_path, user):
    import base64

    import nkeys

    jwt, key = user
    path = tmp_path / "u.creds"
    path.write_text(creds_text(jwt, key.seed))
    callbacks = credentials_callbacks(str(path))
    signature = base64.b64decode(callbacks["signature_cb"]("nonce-1"))
    kp = nkeys.from_seed(bytearray(key.seed.encode()))
    assert kp.verify(b"nonce-1", signature)
    assert callbacks["user_jwt_cb"]() == jwt.encode()
    fresh_jwt, fresh_key = OperatorChain.create("unit2").user()
    path.write_text(creds_text(fresh_jwt, fresh_key.seed))  # rotated
    callbacks["signature_cb"]("nonce-2")
    assert callbacks["user_jwt_cb"]() == fresh_jwt.encode()


def test_a_seed_file(tmp_path):
    key = user_nkey()
    path = tmp_path / "u.nk"
    path.write_text(key.seed + "\n")
    assert read_seed(str(path)) == key.seed
    path.write_text("not a seed")
    with pytest.raises(CredentialsError, match="does not hold a valid NKey seed"):
        read_seed(str(path))


@pytest.mark.parametrize(
    ("exc", "attention", "shown"),
    [
        (nats.errors.AuthorizationError(), True, "authorization violation"),
        (nats.errors.Error("nats: 'Authorization Violation'"), True, "authorization violation"),
        (nats.errors.Error("nats: 'user authentication expired'"), True, "user authentication expired"),
        (
            CredentialsError("credentials file /x holds no NATS USER JWT block"),
            True,
            "no NATS USER JWT block",
        ),
        (ssl.SSLError(1, "[SSL] tlsv13 alert certificate required"), True, "TLS error"),
        (ConnectionRefusedError(111, "Connection refused"), False, "Connection refused"),
        (nats.errors.UnexpectedEOF(), False, "unexpected EOF"),
    ],
)
def test_errors_that_need_a_human_are_told_apart(exc, attention, shown):
    assert needs_attention(exc) is attention
    assert shown in describe_error(exc)


def test_a_refused_login_stays_the_reason_over_the_resets_that_follow_it(monkeypatch):
    """The server closes the socket after its -ERR, and a client sometimes reads the reset
    first: the refusal, seen once, must still be what a person is told."""
    now = 1000.0
    monkeypatch.setattr("forwarder.natsconn.time.monotonic", lambda: now)
    reset = ConnectionResetError(104, "Connection reset by peer")
    refused = nats.errors.AuthorizationError()
    shown, until = telling_reason(reset, None, 0.0)
    assert "reset" in shown
    shown, until = telling_reason(refused, shown, until)
    assert "authorization" in shown
    assert until == now + ATTENTION_STICKS
    now += ATTENTION_STICKS - 1
    assert telling_reason(reset, shown, until) == (shown, until)  # still the refusal
    now += 2
    later, _ = telling_reason(reset, shown, until)
    assert "reset" in later  # long enough without a refusal: the reset is the news


# --------------------------------------------------------------------------- header blocks


def headers_of(block: bytes | None) -> Any:
    return asyncio.run(SourceClient()._process_headers(block))


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (None, None),
        (b"NATS/1.0\r\n\r\n", None),
        (b"NATS/1.0\r\nA: 1\r\nB:2\r\n\r\n", {"A": "1", "B": "2"}),
        (b"NATS/1.0\r\nA:   padded  \r\n\r\n", {"A": "padded"}),
        (b"NATS/1.0\r\nA: \xc3\xa9\r\n\r\n", {"A": "\u00e9"}),
        (b"NATS/1.0\r\nA: 1\r\na: 2\r\n\r\n", {"A": "1", "a": "2"}),  # names are case-sensitive here
        (b"NATS/1.0", "header block does not begin with a NATS/1.0 line"),
        (b"NATS", "header block does not begin with a NATS/1.0 line"),
        (b"NATS/2.0\r\nA: 1\r\n\r\n", "header block does not begin with a NATS/1.0 line"),
        (b"NATS/1.0 503\r\n\r\n", "header block has a status line"),
        (b"NATS/1.0 \xff\xfe\r\n\r\n", "header block has a status line"),
        (b"NATS/1.0\r\nA: 1\r\nA: 2\r\n\r\n", "header A appears more than once"),
        (b"NATS/1.0\r\nA: 1\r\njunk\r\n\r\n", "a header line is not 'Name: value'"),
        (b"NATS/1.0\r\n: 1\r\n\r\n", "a header line is not 'Name: value'"),
        (b"NATS/1.0\r\nA B: 1\r\n\r\n", "a header line is not 'Name: value'"),
        (b"NATS/1.0\r\nA: 1\r\n\r\n\r\n", "a header line is not 'Name: value'"),
        (b"NATS/1.0\r\nA: 1\r\n", "header block is malformed"),
        (b"NATS/1.0\r\nA: 1\r2\r\n\r\n", "a header holds a bare CR or LF"),
        (b"NATS/1.0\r\nA: 1\n2\r\n\r\n", "a header holds a bare CR or LF"),
        (b"NATS/1.0\r\nA: \xff\r\n\r\n", "a header is not valid UTF-8"),
        (b"NATS/1.0\r\n\xc3\xa9: 1\r\n\r\n", "a header line is not 'Name: value'"),
    ],
)
def test_header_blocks(block, expected):
    got = headers_of(block)
    if isinstance(expected, str):
        assert isinstance(got, MalformedHeaders)
        assert got.rejection == Rejection(BAD_HEADERS, expected)
    else:
        assert got == expected
        assert not isinstance(got, MalformedHeaders)


def test_jetstream_status_messages_are_still_nats_py_s():
    got = headers_of(b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\n\r\n")
    assert got["Status"] == "100"
    assert got["Nats-Last-Consumer"] == "5"


# --------------------------------------------------------------------------- dead letters


class FakeSource:
    """Pure logic only: DeadLetters.build needs the source's max_payload."""

    max_payload = 4096

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        raise AssertionError("not used")


def letter(
    payload: bytes, headers: dict[str, str] | None, subject: str = "assets.a.v"
) -> tuple[bytes, dict[str, str]]:
    msg = SourceMsg(_client=None, subject=subject, data=payload, headers=headers)
    return DeadLetters("dead", FakeSource(), ForwardingStats()).build(msg, Rejection("too_large", "x"))


def test_dead_letter_keeps_publishable_headers_only():
    _, headers = letter(b"x", {"Good": "1", "Bad Name": "2", "A(b)": "3"})
    assert headers == {"Good": "1", "Forwarder-Error": "too_large: x", "Forwarder-Subject": "assets.a.v"}
    _, headers = letter(b"x", MalformedHeaders("header block is malformed"))
    assert set(headers) == {"Forwarder-Error", "Forwarder-Subject"}


def test_dead_letter_cut_payload_or_dropped_headers():
    payload, headers = letter(b"p" * 4050, {"Keep": "1"})
    assert headers[TRUNCATED_HEADER] == "4050"
    assert headers["Keep"] == "1"
    assert payload != b"p" * 4000
    payload, headers = letter(b"p" * 1200, {"Big": "v" * 2900})  # the headers crowd: dropped, payload whole
    assert headers[TRUNCATED_HEADER] == "1200"
    assert "Big" not in headers
    assert payload == b"p" * 1200


def test_dead_letter_subject_not_utf8_is_shown_escaped():
    _, headers = letter(b"x", None, subject=b"assets.\xff.v".decode("utf-8", "surrogateescape"))
    assert headers["Forwarder-Subject"] == "assets.\\xff.v"
