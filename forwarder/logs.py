"""Structured logs: short snake_case events with key-value context, one JSON object a line.

Two safety nets live here because every line passes through them:
- redaction: known secret values (passwords, tokens, file contents registered when
  read), NKey seeds, JWTs and URL userinfo are replaced by ``***`` in every value,
  including formatted tracebacks and lines from third-party loggers (nats-py);
- rate limiting: an event that can repeat per message (dead letter, publish error,
  slow consumer) is logged at most once per interval per key, and the next line
  carries ``suppressed=N``, so a flood of bad messages cannot fill a disk.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import weakref
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_PATTERNS = (
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", re.IGNORECASE), r"\1***@"),  # URL userinfo
    (re.compile(r"\bS[UAONCPX][A-Z2-7]{56}\b"), "***"),  # NKey seeds
    (re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "***"),  # JWTs
)


class Redactor:
    """Replaces secrets in log values. Secrets are registered as they become known."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, *secrets: str | None) -> None:
        with self._lock:
            for secret in secrets:
                # Very short values would redact innocent text and are no secret anyway.
                if secret and len(secret) >= 3:
                    self._secrets.add(secret)
                    self._secrets.add(secret.strip())

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def scrub(self, value: Any) -> Any:
        """``value`` with secrets redacted, keeping its JSON shape (dicts, lists, numbers)."""
        if isinstance(value, str):
            return self.redact(value)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, dict):
            return {str(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.scrub(v) for v in value]
        return self.redact(str(value))

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Rebuilt with timestamp, level and event first: easier to read, same JSON.
        head = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
        return {key: self.scrub(value) for key, value in (*head.items(), *event.items())}


redactor = Redactor()


def configure(level: str = "info", fmt: str = "json", *, secrets: Iterable[str | None] = ()) -> None:
    """Set up structlog and route the stdlib ``logging`` (nats-py, asyncio) through it."""
    redactor.add(*secrets)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, redactor, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redactor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])


def bind(**context: Any) -> None:
    """Context on every later log line of this process (e.g. ``worker=2``)."""
    structlog.contextvars.bind_contextvars(**context)


def get_logger(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)


_rate_limited: weakref.WeakSet[RateLimitedLogger] = weakref.WeakSet()


def flush_rate_limited() -> None:
    """Report suppressed counts of every rate-limited logger (called once a second)."""
    for limited in list(_rate_limited):
        limited.flush()


class RateLimitedLogger:
    """Log a repeating event at most once per ``interval`` per key, counting the rest.

    Keys must come from a bounded set (an event and a cluster, a reason): never from
    message content. ``flush()`` reports what was suppressed since the last line, so
    the count is not lost when a flood stops.
    """

    def __init__(self, log: Any, interval: float = 10.0) -> None:
        self._log = log
        self._interval = interval
        self._state: dict[tuple[str, str, str], list[Any]] = {}  # key -> [last time, suppressed, kwargs]
        _rate_limited.add(self)

    def log(self, level: str, event: str, key: str = "", **kw: Any) -> None:
        now = time.monotonic()
        state_key = (level, event, key)
        state = self._state.get(state_key)
        if state is not None and now - state[0] < self._interval:
            state[1] += 1
            state[2] = kw
            return
        if state is not None and state[1]:
            kw["suppressed"] = state[1]
        getattr(self._log, level)(event, **kw)
        self._state[state_key] = [now, 0, kw]

    def warning(self, event: str, key: str = "", **kw: Any) -> None:
        self.log("warning", event, key, **kw)

    def error(self, event: str, key: str = "", **kw: Any) -> None:
        self.log("error", event, key, **kw)

    def flush(self) -> None:
        """Emit one line for every key whose interval passed with suppressed events."""
        now = time.monotonic()
        for (level, event, _key), state in self._state.items():
            if state[1] and now - state[0] >= self._interval:
                getattr(self._log, level)(event, **{**state[2], "suppressed": state[1]})
                state[0], state[1] = now, 0
