"""Secret redaction for log lines and error texts. Stdlib only.

Kept apart from ``logs.py`` (which needs structlog) so that ``natsconn.py`` and the asset
client can register and redact secrets without importing the service's logging stack.
``forwarder.logs`` re-exports ``Redactor`` and ``redactor``: there is one registry.
"""

from __future__ import annotations

import re
import threading
from collections.abc import MutableMapping
from typing import Any

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
        for secret in tuple(self._secrets):  # a snapshot: the HTTP thread logs too
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
            return {self.redact(str(k)): self.scrub(v) for k, v in value.items()}  # keys may be URLs
        if isinstance(value, list | tuple | set | frozenset):
            return [self.scrub(v) for v in value]
        return self.redact(str(value))

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        # Rebuilt with timestamp, level and event first: easier to read, same JSON.
        head = {k: event.pop(k) for k in ("timestamp", "level", "event") if k in event}
        return {key: self.scrub(value) for key, value in (*head.items(), *event.items())}


redactor = Redactor()
