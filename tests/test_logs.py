"""Structured logs: redaction of every kind of secret, on every path a line takes; rate limiting.

The redaction tests run the real pipeline (``logs.configure``: structlog JSON and the stdlib
``logging`` bridge) and parse what reached stdout. The rate-limiting tests drive
``RateLimitedLogger`` with a fake clock and a recording logger.
"""

from __future__ import annotations

import io
import json
import logging
import random
import sys
from typing import Any

import pytest
import structlog

from forwarder import logs
from forwarder.logs import RateLimitedLogger, Redactor, flush_rate_limited

PASSWORD = "s3cr3t-Pa55word"
TOKEN = "tok_9f8e7d6c5b4a"
SEED = "SUAMLK2ZNL35WSMW37E7UD4VZ7ELPKW7DHC3BWBSD2GPMHDL4LNGEJMVQE"  # an NKey user seed (58 chars)
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJBQkMifQ.c2lnbmF0dXJlLXBhcnQ"
URL = "nats://forwarder:urlpass123@c1.example:4222"
SECRETS = (PASSWORD, TOKEN, SEED, JWT, "urlpass123")


def configure_into(buffer: io.StringIO, level: str, fmt: str, secrets: list[str]) -> None:
    """``logs.configure`` with stdout pointing at ``buffer`` (it binds the stream it finds)."""
    real = sys.stdout
    sys.stdout = buffer
    try:
        logs.configure(level, fmt, secrets=secrets)
    finally:
        sys.stdout = real


@pytest.fixture
def restore_logging():
    """Put the process's logging setup back after a test that ran ``logs.configure``."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_secrets = set(logs.redactor._secrets)
    yield
    structlog.configure(**saved_structlog)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    logs.redactor._secrets = saved_secrets


@pytest.fixture
def output(restore_logging):
    """The JSON lines logged during the test (``output()`` returns those since the last call)."""
    buffer = io.StringIO()
    configure_into(buffer, "debug", "json", [PASSWORD, TOKEN])
    read = 0

    def lines() -> list[dict[str, Any]]:
        nonlocal read
        text = buffer.getvalue()
        new, read = text[read:], len(text)
        return [json.loads(line) for line in new.splitlines() if line.strip()]

    return lines


def assert_clean(entries: list[dict[str, Any]]) -> str:
    text = json.dumps(entries)
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked: {text}"
    return text


# ------------------------------------------------------------------ redaction, end to end


def test_a_line_is_json_with_timestamp_level_and_event_first(output):
    logs.get_logger(cluster="C1").info("connected", server="nats://c1:4222")
    [entry] = output()
    assert list(entry)[:3] == ["timestamp", "level", "event"]
    assert entry["level"] == "info"
    assert entry["event"] == "connected"
    assert entry["cluster"] == "C1"
    assert entry["timestamp"].endswith("Z")


def test_registered_secrets_in_event_values_are_redacted(output):
    logs.get_logger().warning("auth_failed", detail=f"password {PASSWORD} and token {TOKEN} refused")
    [entry] = output()
    assert entry["detail"] == "password *** and token *** refused"
    assert_clean([entry])


def test_a_secret_registered_later_is_redacted_too(output):
    late = "late-registered-secret"
    logs.redactor.add(late)
    logs.get_logger().info("read_secret_file", value=late)
    assert output()[0]["value"] == "***"


def test_url_userinfo_nkey_seeds_and_jwts_are_redacted_without_registration(output):
    logs.get_logger().error("connect_failed", url=URL, seed=f"seed={SEED}", jwt=f"Bearer {JWT}")
    [entry] = output()
    assert entry["url"] == "nats://***@c1.example:4222"
    assert entry["seed"] == "seed=***"
    assert entry["jwt"] == "Bearer ***"
    assert_clean([entry])


def test_secrets_in_nested_dicts_lists_and_keys_are_redacted(output):
    logs.get_logger().info(
        "state",
        clusters={"C1": {"servers": [URL, "nats://c2:4222"], "auth": (PASSWORD,)}, URL: 1},
        counts={"C1": 3},
        flags=[True, None, 1.5],
    )
    [entry] = output()
    assert entry["clusters"]["C1"]["servers"] == ["nats://***@c1.example:4222", "nats://c2:4222"]
    assert entry["clusters"]["C1"]["auth"] == ["***"]
    assert entry["counts"] == {"C1": 3}  # numbers stay numbers
    assert entry["flags"] == [True, None, 1.5]
    assert_clean([entry])


def test_exceptions_and_tracebacks_are_redacted(output):
    try:
        raise ConnectionError(f"cannot reach {URL} with {PASSWORD} / {SEED}")
    except ConnectionError:
        logs.get_logger().exception("connect_failed")
    [entry] = output()
    assert "Traceback" in entry["exception"]
    assert "nats://***@c1.example:4222" in entry["exception"]
    assert_clean([entry])


def test_an_exception_object_as_a_value_is_redacted(output):
    logs.get_logger().warning("connection_error", error=OSError(f"token {TOKEN} rejected"))
    [entry] = output()
    assert entry["error"] == "token *** rejected"


def test_stdlib_logging_lines_from_libraries_are_json_and_redacted(output):
    nats_log = logging.getLogger("nats.aio.client")
    nats_log.error("nats: could not connect to %s (%s)", URL, PASSWORD)
    try:
        raise RuntimeError(f"jwt {JWT}")
    except RuntimeError:
        nats_log.exception("nats: encountered error")
    entries = output()
    assert [e["event"] for e in entries] == [
        "nats: could not connect to nats://***@c1.example:4222 (***)",
        "nats: encountered error",
    ]
    assert entries[0]["level"] == "error"
    assert "jwt ***" in entries[1]["exception"]
    assert_clean(entries)


def test_the_redactor_ignores_values_too_short_to_be_secrets():
    redactor = Redactor()
    redactor.add("ab", "", None, "  padded-secret\n")
    assert redactor.redact("ab cd padded-secret") == "ab cd ***"


# ------------------------------------------------------------------ rate limiting


class Recorder:
    """Stands in for a bound structlog logger: records (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(logs.time, "monotonic", fake)
    return fake


def events_counted(lines: list[tuple[str, str, dict[str, Any]]]) -> int:
    """What the log says happened: each line plus the events it reports as suppressed."""
    return sum(1 + kw.get("suppressed", 0) for _, _, kw in lines)


def test_the_first_event_is_logged_and_repeats_within_the_interval_are_counted(clock):
    rec = Recorder()
    limited = RateLimitedLogger(rec, interval=10)
    for i in range(5):
        limited.warning("dead_letter", "no_key", subject=f"s{i}")
        clock.now += 1
    assert rec.lines == [("warning", "dead_letter", {"subject": "s0"})]
    clock.now += 6  # 11 s after the first line
    limited.warning("dead_letter", "no_key", subject="s5")
    assert rec.lines[1] == ("warning", "dead_letter", {"subject": "s5", "suppressed": 4})
    assert events_counted(rec.lines) == 6


def test_keys_and_levels_are_limited_separately(clock):
    rec = Recorder()
    limited = RateLimitedLogger(rec, interval=10)
    limited.warning("dead_letter", "no_key")
    limited.warning("dead_letter", "not_json")
    limited.error("dead_letter", "no_key")
    limited.warning("dead_letter", "no_key")
    assert [(level, kw) for level, _, kw in rec.lines] == [("warning", {}), ("warning", {}), ("error", {})]


def test_flush_reports_what_was_suppressed_once_the_flood_stops(clock):
    rec = Recorder()
    limited = RateLimitedLogger(rec, interval=10)
    for i in range(100):
        limited.warning("slow_consumer", "slow", subject=f"s{i}")
    limited.flush()
    assert len(rec.lines) == 1  # the interval has not passed yet
    clock.now += 10
    limited.flush()
    # The flush line is the last suppressed event; it reports the 98 others.
    assert rec.lines[1] == ("warning", "slow_consumer", {"subject": "s99", "suppressed": 98})
    assert events_counted(rec.lines) == 100
    clock.now += 100
    limited.flush()
    assert len(rec.lines) == 2  # nothing new: nothing more to say


def test_a_single_suppressed_event_is_flushed_as_itself(clock):
    rec = Recorder()
    limited = RateLimitedLogger(rec, interval=10)
    limited.warning("publish_failed", "C1", cluster="C1")
    limited.warning("publish_failed", "C1", cluster="C1", error="late")
    clock.now += 10
    limited.flush()
    assert rec.lines[1] == ("warning", "publish_failed", {"cluster": "C1", "error": "late"})
    assert events_counted(rec.lines) == 2


def test_a_forced_flush_reports_suppressed_events_before_the_interval(clock):
    rec = Recorder()
    limited = RateLimitedLogger(rec, interval=10)
    for _ in range(3):
        limited.warning("dead_letter", "no_key")
    flush_rate_limited(force=True)  # what the service does at shutdown
    assert rec.lines[1] == ("warning", "dead_letter", {"suppressed": 1})
    assert events_counted(rec.lines) == 3


def test_lines_plus_suppressed_count_every_event_of_a_random_flood(clock):
    rng = random.Random(5)
    rec = Recorder()
    limited = RateLimitedLogger(rec, interval=10)
    sent: dict[str, int] = {}
    for _ in range(5000):
        key = rng.choice(["a", "b", "c"])
        sent[key] = sent.get(key, 0) + 1
        limited.warning("dead_letter", key, reason=key)
        clock.now += rng.expovariate(20)  # about 20 events a second
        if rng.random() < 0.05:
            limited.flush()
    limited.flush(force=True)
    for key, n in sent.items():
        assert events_counted([line for line in rec.lines if line[2]["reason"] == key]) == n
    assert len(rec.lines) < 200  # and the flood did not reach the log


def test_the_service_flushes_once_a_second_through_flush_rate_limited(clock):
    rec = Recorder()
    limited = RateLimitedLogger(rec, interval=10)
    limited.warning("dead_letter", "k")
    limited.warning("dead_letter", "k")
    clock.now += 10
    flush_rate_limited()
    assert len(rec.lines) == 2


def test_rate_limited_lines_are_redacted_json_lines(output):
    limited = RateLimitedLogger(logs.get_logger(cluster="C1"), interval=3600)
    for _ in range(3):
        limited.warning("publish_failed", "C1", error=f"to {URL}")
    limited.flush(force=True)
    entries = output()
    assert [(e["event"], e["cluster"], e.get("suppressed")) for e in entries] == [
        ("publish_failed", "C1", None),
        ("publish_failed", "C1", 1),
    ]
    assert_clean(entries)


def test_console_format_is_redacted_too(restore_logging):
    buffer = io.StringIO()
    configure_into(buffer, "info", "console", [PASSWORD])
    logs.get_logger().info("connected", url=URL, password=PASSWORD)
    out = buffer.getvalue()
    assert "connected" in out
    assert "nats://***@c1.example:4222" in out
    assert PASSWORD not in out
    assert "urlpass123" not in out
