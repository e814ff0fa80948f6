"""Structured logs: short snake_case events with key-value context, one JSON object a line.

Two safety nets live here because every line passes through them:
- redaction: known secret values (passwords, tokens, file contents registered when
  read), NKey seeds, JWTs and URL userinfo are replaced by ``***`` in every value,
  including formatted tracebacks and lines from third-party loggers (nats-py);
- rate limiting: an event that can repeat per message (dead letter, publish error,
  slow consumer) is logged at most once per interval per key, and the next line
  carries ``suppressed=N``, so a flood of bad messages cannot fill a disk. Every line
  stands for itself plus the ``suppressed`` events before it: the number of events is
  the number of lines plus the sum of ``suppressed``.
"""

from __future__ import annotations

import logging
import sys
import time
import weakref
from collections.abc import Iterable
from typing import Any

import structlog

from .redact import Redactor, redactor

__all__ = ["RateLimitedLogger", "Redactor", "configure", "flush_rate_limited", "get_logger", "redactor"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


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


def flush_rate_limited(*, force: bool = False) -> None:
    """Report suppressed counts of every rate-limited logger (called once a second, and
    with ``force`` at shutdown so that no count is lost)."""
    for limited in list(_rate_limited):
        limited.flush(force=force)


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

    def flush(self, *, force: bool = False) -> None:
        """Emit one line for every key whose interval passed with suppressed events (with
        ``force``: every key with suppressed events).

        The line is the last suppressed event (its values) and carries the number of
        the others, so that lines plus ``suppressed`` still count every event.
        """
        now = time.monotonic()
        for (level, event, _key), state in list(self._state.items()):
            if state[1] and (force or now - state[0] >= self._interval):
                fields = {k: v for k, v in state[2].items() if k != "suppressed"}
                if state[1] > 1:
                    fields["suppressed"] = state[1] - 1
                getattr(self._log, level)(event, **fields)
                state[0], state[1] = now, 0
