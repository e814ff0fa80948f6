"""nats-py connection options from our settings, and the connection's event accounting.

Shared by the source and every target cluster so that auth, TLS and the logging of
connection events are done one way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import nats.errors
import nkeys
from nats.aio.client import DEFAULT_BUFFER_SIZE, Client
from nats.aio.transport import TcpTransport
from nats.protocol.parser import PERMISSIONS_ERR, STALE_CONNECTION

from .config import ConnectionSettings, TlsSettings, connection_secrets, redact_url
from .redact import redactor

# ``forwarder.logs`` (structlog) is imported by ``ConnectionEvents`` only, when the service
# makes one: the asset client uses ``connect_options`` with nats-py and pyyaml alone.

MAX_CREDENTIALS_BYTES = 64 * 1024
ATTENTION_STICKS = 10.0  # seconds an auth/TLS error outranks the connection errors that follow it
CONNECT_RETRY_MAX = 30.0  # seconds: the longest pause between connect rounds that failed outright


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


def secret_file(path: str) -> Callable[[], str]:
    """nats-py's password or token callback for a file: read (and checked) now and at each connect."""
    read_secret_file(path)
    return lambda: read_secret_file(path)


class CredentialsError(nats.errors.Error):
    """A credentials or seed file that cannot be used. A ``nats.errors.Error``, so that
    nats-py's connect and reconnect loops count it as a failed attempt and retry (a
    Kubernetes Secret may be fixed while the forwarder runs). The message names the file,
    never its content."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


_CREDS_BLOCK = re.compile(r"^-{3,}BEGIN ([A-Z ]+?)-{3,}[ \t]*\r?\n\s*(\S+)", re.MULTILINE)


def _read_small(path: str, what: str) -> str:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CREDENTIALS_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CredentialsError(f"cannot read {what} file {path} ({reason})") from None
    if len(raw) > MAX_CREDENTIALS_BYTES:
        raise CredentialsError(f"{what} file {path} is larger than {MAX_CREDENTIALS_BYTES} bytes")
    return raw.decode("utf-8", "replace")


def _check_seed(seed: str, path: str, what: str) -> None:
    try:
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except Exception:  # nkeys raises several types, some not its own
        raise CredentialsError(f"{what} file {path} does not hold a valid NKey seed") from None


def read_seed(path: str) -> str:
    """An NKey seed file: the seed, checked and registered with the log redactor."""
    seed = _read_small(path, "nkeys_seed").strip()
    redactor.add(seed)
    _check_seed(seed, path, "nkeys_seed")
    return seed


def read_credentials(path: str) -> tuple[str, str]:
    """A ``.creds`` file: (user JWT, user seed), both registered with the log redactor.

    nats-py's own reader loops for ever on a file without a JWT block (the event loop
    hangs) and raises a ``TypeError`` on one without a seed: a broken Secret must be an
    error that names the file, and one that the reconnect loop can retry.
    """
    text = _read_small(path, "credentials")
    blocks = {name: value for name, value in _CREDS_BLOCK.findall(text)}
    jwt, seed = blocks.get("NATS USER JWT"), blocks.get("USER NKEY SEED")
    redactor.add(jwt, seed)
    if not jwt:
        raise CredentialsError(f"credentials file {path} holds no NATS USER JWT block")
    if not seed:
        raise CredentialsError(f"credentials file {path} holds no USER NKEY SEED block")
    _check_seed(seed, path, "credentials")
    return jwt, seed


def credentials_callbacks(path: str) -> dict[str, Any]:
    """nats-py's ``signature_cb`` and ``user_jwt_cb`` for a credentials file.

    The file is read again at every connect, so a renewed JWT (a rotated Secret) is used
    on the next reconnect without a restart. nats-py asks for the signature first, then
    for the JWT: both come from the same reading of the file.
    """
    jwt_of_this_attempt: list[str] = []

    def signature_cb(nonce: str) -> bytes:
        jwt, seed = read_credentials(path)
        jwt_of_this_attempt[:] = [jwt]
        kp = nkeys.from_seed(bytearray(seed.encode()))
        try:
            return base64.b64encode(kp.sign(nonce.encode()))
        finally:
            kp.wipe()

    def user_jwt_cb() -> bytes:
        jwt = jwt_of_this_attempt.pop() if jwt_of_this_attempt else read_credentials(path)[0]
        return jwt.encode()

    return {"signature_cb": signature_cb, "user_jwt_cb": user_jwt_cb}


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
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return redactor.redact(f"TLS error: certificate verify failed: {exc.verify_message}")[:300]
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {getattr(exc, 'reason', None) or text}"
    return redactor.redact(text)[:300]


def needs_attention(exc: BaseException) -> bool:
    """Errors that retrying alone will not cure (credentials, certificates): logged as errors."""
    if isinstance(exc, nats.errors.AuthorizationError | CredentialsError | ssl.SSLError):
        return True
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text


def telling_reason(exc: BaseException, shown: str | None, sticks_until: float) -> tuple[str, float]:
    """The reason to show after ``exc``, and until when it outranks what follows: an auth or TLS
    error stays the reason for ``ATTENTION_STICKS`` seconds, so that the connection reset which
    follows a refused login (the server closes the socket, sometimes before its ``-ERR`` is
    read) does not hide why the connection fails. ``shown``: the reason shown so far."""
    now = time.monotonic()
    if needs_attention(exc):
        return describe_error(exc), now + ATTENTION_STICKS
    if now < sticks_until and shown is not None:
        return shown, sticks_until
    return describe_error(exc), sticks_until


class ConnectionEvents:
    """nats-py callbacks that log each event once, with the connection's label, and count it."""

    def __init__(self, stats: ConnectionStats, *, kind: str) -> None:
        from .logs import RateLimitedLogger, get_logger

        self.stats = stats
        self.log = get_logger(**{kind: stats.label})
        self.limited = RateLimitedLogger(self.log)
        self.client: Any = None  # set once the nats-py client exists
        self._attention_until = 0.0  # an auth/TLS error is the reason shown until then (or a connect)
        self.closing = False  # set before we close on purpose: no disconnect warning then

    def _server(self) -> str | None:
        url = getattr(self.client, "connected_url", None)
        return redact_url(url.geturl()) if url is not None else None

    async def on_connected(self) -> None:
        self._attention_until = 0.0
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
        self._attention_until = 0.0
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
        text = self._record(exc)
        level = "error" if needs_attention(exc) else "warning"
        self.limited.log(level, "connection_error", type(exc).__name__, error=text)

    def _record(self, exc: BaseException) -> str:
        """Set ``last_error`` (see ``telling_reason``); the text of this error, for the log."""
        stats = self.stats
        stats.last_error, self._attention_until = telling_reason(exc, stats.last_error, self._attention_until)
        return describe_error(exc)

    def connect_failed(self, exc: BaseException, retry_in: float) -> None:
        """A connect round that nats-py gave up on (or that could not start): said, then retried."""
        self.stats.errors += 1
        self.stats.last_error = describe_error(exc)
        self._attention_until = time.monotonic() + ATTENTION_STICKS
        self.limited.error(
            "connect_failed", type(exc).__name__, error=self.stats.last_error, retry_in=round(retry_in, 1)
        )

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
        # A password or token file is read now (an unreadable one fails this attempt, named) and
        # again at every reconnect, so a rotated Kubernetes Secret is used without a restart.
        if auth.user is not None:
            opts["user"] = auth.user
            opts["password"] = (
                auth.password.reveal() if auth.password is not None else secret_file(auth.password_file or "")
            )
        elif auth.token is not None or auth.token_file is not None:
            opts["token"] = (
                auth.token.reveal() if auth.token is not None else secret_file(auth.token_file or "")
            )
        elif auth.nkeys_seed is not None:
            # Read and checked here: nats-py would raise a bare nkeys error out of connect().
            opts["nkeys_seed_str"] = read_seed(auth.nkeys_seed)
        elif auth.credentials is not None:
            read_credentials(auth.credentials)  # fail now, with the file named, if it is unusable
            opts.update(credentials_callbacks(auth.credentials))
    ctx = tls_context(conn.tls, conn.servers)
    if ctx is not None:
        opts["tls"] = ctx
    return opts


class SafeTcpTransport(TcpTransport):
    """nats-py's TCP transport, whose close cannot hang after a failed TLS upgrade.

    When the TLS handshake fails (an untrusted certificate, a name that does not match),
    asyncio has already moved the socket to the TLS protocol, so the plain stream's
    ``wait_closed()`` never completes. nats-py's connect loop awaits it before the next
    attempt: after the first certificate error it stopped retrying, for good and silently.
    """

    _tls_failed = False

    async def connect(self, uri: Any, buffer_size: int, connect_timeout: int) -> None:
        self._tls_failed = False
        await super().connect(uri, buffer_size, connect_timeout)

    async def connect_tls(self, uri: Any, ssl_context: Any, buffer_size: int, connect_timeout: int) -> None:
        try:
            await super().connect_tls(uri, ssl_context, buffer_size, connect_timeout)
        except BaseException:
            self._tls_failed = True
            raise

    async def wait_closed(self) -> None:
        if not self._tls_failed:  # else the socket is closed already and nothing would wake us
            await super().wait_closed()  # type: ignore[no-untyped-call]


class ResilientClient(Client):
    """nats-py's client, which keeps retrying whatever goes wrong (docs/upstream-nats-py.md).

    - Its TCP transport is ``SafeTcpTransport``: a certificate error no longer ends the
      connect loop.
    - An ``-ERR`` from the server while connected: nats-py closes the client for good on
      any other than a permissions violation or a stale connection ('Authorization
      Violation', 'User Authentication Expired' for a JWT that expired while connected,
      'Maximum Connections Exceeded'...). A closed client never reconnects, so the
      forwarder would stop talking to that server until restarted, even after the
      credentials were renewed. Here the error is reported through ``error_cb`` and handled
      like a lost connection: nats-py's reconnect loop takes over, with its
      ``reconnect_time_wait`` and ``max_reconnect_attempts``.
    """

    async def _connect_to_server(self, s: Any) -> None:
        if s.uri.scheme in ("ws", "wss"):
            await super()._connect_to_server(s)
            return
        # nats-py's own code for a TCP server, with SafeTcpTransport in place of TcpTransport.
        if not isinstance(self._transport, SafeTcpTransport):
            self._transport = SafeTcpTransport()  # type: ignore[no-untyped-call]
        s.last_attempt = time.monotonic()
        await self._transport.connect(
            s.uri, buffer_size=DEFAULT_BUFFER_SIZE, connect_timeout=self.options["connect_timeout"]
        )

    async def _process_err(self, err_msg: str) -> None:
        if STALE_CONNECTION in err_msg or PERMISSIONS_ERR in err_msg or not self.options["allow_reconnect"]:
            await super()._process_err(err_msg)
            return
        text = err_msg.strip("'")
        err: nats.errors.Error = (
            nats.errors.AuthorizationError()
            if "authorization violation" in text
            else nats.errors.Error(f"nats: {text}")
        )
        self._err = err
        await self._error_cb(err)
        await self._process_op_err(err)


C = TypeVar("C", bound=Client)


async def connect_with_retry(
    factory: Callable[[], C], conn: ConnectionSettings, events: ConnectionEvents
) -> C:
    """A connected client, however long it takes.

    nats-py retries refused connections, timeouts, TLS and authorization failures itself
    (reporting each through ``error_cb``). What escapes its loop (an unreadable or invalid
    credentials, seed or certificate file, or ``max_reconnect_attempts`` used up) is
    logged with the connection's name and retried after a back-off that doubles up to
    ``CONNECT_RETRY_MAX``: the forwarder never gives up silently and never exits for it.
    """
    delay = max(conn.reconnect_time_wait, 0.5)
    while True:
        nc = factory()
        events.client = nc
        try:
            await nc.connect(**connect_options(conn, events))
            return nc
        except Exception as exc:
            events.connect_failed(exc, delay)
            with contextlib.suppress(Exception):  # a failed attempt may leave its socket open
                await nc._close(Client.CLOSED, do_cbs=False)
        await asyncio.sleep(delay)
        delay = min(delay * 2, CONNECT_RETRY_MAX)
