"""nats-py connection options from our settings, and the connection's event accounting.

Shared by the source and every target cluster so that auth, TLS and the logging of
connection events are done one way.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import nats.errors

from .config import ConnectionSettings, TlsSettings, connection_secrets, redact_url
from .redact import redactor

# ``forwarder.logs`` (structlog) is imported by ``ConnectionEvents`` only, when the service
# makes one: the asset client uses ``connect_options`` with nats-py and pyyaml alone.


@dataclass
class ConnectionStats:
    """What happened to one connection; read by the metrics collector at scrape time."""

    label: str
    connected: bool = False
    ever_connected: bool = False
    disconnects: int = 0
    reconnects: int = 0
    errors: int = 0
    slow_consumer_events: int = 0
    slow_consumer_dropped: int = 0
    last_error: str | None = None
    connected_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def header_block_size(headers: dict[str, str] | None) -> int:
    """Bytes of the header block nats-py writes for ``headers`` (counts toward max_payload).

    nats-py's arithmetic exactly: keys and values are stripped, blank keys skipped, and
    an empty dict (not None) still writes ``NATS/1.0\r\n\r\n``.
    """
    if headers is None:
        return 0
    size = 12  # "NATS/1.0\r\n" ... "\r\n"
    for key, value in headers.items():
        name = key.strip()
        if name:
            size += len(name) + len(value.strip().encode("utf-8", "surrogateescape")) + 4  # "k: v\r\n"
    return size


async def confirmed_flush(nc: Any, timeout: float) -> None:
    """One round trip that confirms every byte published before it.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of what still
    waits in its buffer for the flusher task, so its PONG can confirm less than was
    published (and a SUB still buffered may not be registered yet). Hand the buffer
    to the socket first, as the flusher would, then flush.
    """
    transport = nc._transport
    if nc.is_connected and nc._pending_data_size and transport is not None:
        transport.writelines(nc._pending)
        nc._pending = []
        nc._pending_data_size = 0
    await nc.flush(timeout=timeout)


def read_secret_file(path: str) -> str:
    """A password or token mounted as a file (a Kubernetes Secret): trailing newline stripped."""
    value = Path(path).read_text(encoding="utf-8").strip()
    redactor.add(value)
    return value


def tls_context(tls: TlsSettings | None, servers: tuple[str, ...]) -> ssl.SSLContext | None:
    """A verifying TLS context: the CA bundle (or the system's), and a client cert for mTLS."""
    if tls is None and not any(s.startswith("tls://") for s in servers):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca if tls else None)
    if tls is not None and tls.cert and tls.key:
        ctx.load_cert_chain(tls.cert, tls.key)
    return ctx


def describe_error(exc: BaseException) -> str:
    """A short, secret-free description of a connection error."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, nats.errors.AuthorizationError) or "authorization" in text.lower():
        return "authorization violation (check the credentials)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {getattr(exc, 'reason', None) or text}"
    return redactor.redact(text)[:300]


class ConnectionEvents:
    """nats-py callbacks that log each event once, with the connection's label, and count it."""

    def __init__(self, stats: ConnectionStats, *, kind: str) -> None:
        from .logs import RateLimitedLogger, get_logger

        self.stats = stats
        self.log = get_logger(**{kind: stats.label})
        self.limited = RateLimitedLogger(self.log)
        self.client: Any = None  # set once the nats-py client exists
        self.closing = False  # set before we close on purpose: no disconnect warning then

    def _server(self) -> str | None:
        url = getattr(self.client, "connected_url", None)
        return redact_url(url.geturl()) if url is not None else None

    async def on_connected(self) -> None:
        self.stats.connected = True
        self.stats.ever_connected = True
        self.stats.connected_url = self._server()
        self.log.info("connected", server=self.stats.connected_url)

    async def disconnected(self) -> None:
        if self.stats.connected and not self.closing:
            self.stats.disconnects += 1
            self.log.warning("disconnected", server=self.stats.connected_url)
        self.stats.connected = False

    async def reconnected(self) -> None:
        self.stats.reconnects += 1
        self.stats.connected = True
        self.stats.connected_url = self._server()
        self.log.info("reconnected", server=self.stats.connected_url)

    async def closed(self) -> None:
        self.stats.connected = False
        if not self.closing:
            self.log.warning("connection_closed")

    async def error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # nats-py reports each dropped message as one event: the count is the drop count.
            self.stats.slow_consumer_events += 1
            self.stats.slow_consumer_dropped += 1
            self.limited.warning("slow_consumer", "slow", subject=_printable(exc.subject))
            return
        self.stats.errors += 1
        self.stats.last_error = describe_error(exc)
        self.limited.warning("connection_error", type(exc).__name__, error=self.stats.last_error)

    def callbacks(self) -> dict[str, Any]:
        return {
            "error_cb": self.error,
            "disconnected_cb": self.disconnected,
            "reconnected_cb": self.reconnected,
            "closed_cb": self.closed,
        }


def _printable(subject: Any) -> str:
    text = subject if isinstance(subject, str) else repr(subject)
    return text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:200]


class EventCallbacks(Protocol):
    """What ``connect_options`` needs from an event handler (``ConnectionEvents`` or the client's)."""

    def callbacks(self) -> dict[str, Any]: ...


def connect_options(conn: ConnectionSettings, events: EventCallbacks) -> dict[str, Any]:
    """Keyword arguments for ``nats.aio.client.Client.connect``."""
    opts: dict[str, Any] = {
        "servers": list(conn.servers),
        "name": conn.name,
        "connect_timeout": conn.connect_timeout,
        "reconnect_time_wait": conn.reconnect_time_wait,
        "max_reconnect_attempts": conn.max_reconnect_attempts,
        "ping_interval": conn.ping_interval,
        "max_outstanding_pings": conn.max_outstanding_pings,
        "pending_size": conn.pending_size,
        "allow_reconnect": True,
        # Subjects are validated once per route (and cached), not once per publish.
        "skip_subject_validation": True,
        **events.callbacks(),
    }
    redactor.add(*connection_secrets(conn))
    auth = conn.auth
    if auth is not None:
        if auth.user is not None:
            opts["user"] = auth.user
            opts["password"] = (
                auth.password.reveal()
                if auth.password is not None
                else read_secret_file(auth.password_file or "")
            )
        elif auth.token is not None or auth.token_file is not None:
            opts["token"] = (
                auth.token.reveal() if auth.token is not None else read_secret_file(auth.token_file or "")
            )
        elif auth.nkeys_seed is not None:
            redactor.add(read_secret_file(auth.nkeys_seed))
            opts["nkeys_seed"] = auth.nkeys_seed
        elif auth.credentials is not None:
            opts["user_credentials"] = auth.credentials
    ctx = tls_context(conn.tls, conn.servers)
    if ctx is not None:
        opts["tls"] = ctx
    return opts
