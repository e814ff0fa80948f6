"""The HTTP port: ``/metrics``, ``/healthz``, ``/readyz``, ``/route/{asset}``, ``/clusters``.

A deliberately small HTTP/1.1 server: GET and HEAD, one request per connection,
bounded request size, a read timeout and a cap on concurrent connections, so a
scraper or a hostile client cannot slow the forwarding down. Every body is computed
from state that never holds a secret (server URLs are redacted).

The service runs it on an event loop of its own, in a thread (``HttpThread``): under
full load one turn of the forwarding loop takes 10-40 ms (nats-py's subscription task
works through every message read so far before it yields, by design: that is what
lets TCP push back on the source server), and a request needs several turns, so on
the forwarding loop every endpoint took about 100 ms. On its own loop a request waits
only for the GIL (released at least every ``sys.getswitchinterval()``, 5 ms).
Everything a provider method reads is plain attributes, or a C-level copy of a dict.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import threading
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from .logs import get_logger
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

MAX_REQUEST_BYTES = 16 * 1024
MAX_ASSET_BYTES = 1024
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 64

_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    413: "Content Too Large", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
}  # fmt: skip


class StatusProvider(Protocol):
    """What the HTTP endpoints show; implemented by the service."""

    def metrics(self) -> bytes: ...

    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def route(self, asset: str) -> dict[str, Any]: ...

    def clusters_state(self) -> dict[str, Any]: ...


Response = tuple[int, str, bytes]


def _json(status: int, body: Any) -> Response:
    return status, "application/json", json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def decode_asset(raw: str) -> str | Response:
    """Percent-decode an asset id from the path; a 400 response if it is not usable."""
    try:
        data = unquote_to_bytes(raw)
    except (ValueError, TypeError):
        return _error(400, "malformed asset id")
    if not data:
        return _error(400, "empty asset id")
    if len(data) > MAX_ASSET_BYTES:
        return _error(400, f"asset id longer than {MAX_ASSET_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _error(400, "asset id is not valid UTF-8")


class HttpServer:
    def __init__(
        self, host: str, port: int, provider: StatusProvider, *, unix_path: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.unix_path = unix_path  # a worker under the supervisor listens here instead (workers.py)
        self._provider = provider
        self._server: asyncio.Server | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._log = get_logger(component="http")
        self._routes: dict[str, Callable[[], Response]] = {
            "/metrics": lambda: (200, METRICS_CONTENT_TYPE, provider.metrics()),
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/clusters": lambda: _json(200, provider.clusters_state()),
        }

    async def start(self) -> None:
        if self.unix_path is not None:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.unix_path, limit=MAX_REQUEST_BYTES
            )
            self._log.info("http_listening", path=self.unix_path)
            return
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True, limit=MAX_REQUEST_BYTES
        )
        sockets = self._server.sockets
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._log.info("http_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _healthz(self) -> Response:
        # A provider may tell whether the process still works (its event loop turns);
        # without that, answering at all is the proof of life.
        liveness = getattr(self._provider, "liveness", None)
        if liveness is None:
            return _json(200, {"status": "ok"})
        alive, body = liveness()
        return _json(200 if alive else 503, body)

    def _readyz(self) -> Response:
        ready, body = self._provider.readiness()
        return _json(200 if ready else 503, body)

    async def respond_async(self, method: str, target: str) -> Response:
        """What the server loop calls: ``respond``; a subclass may answer some paths asynchronously."""
        return self.respond(method, target)

    def respond(self, method: str, target: str) -> Response:
        """The response for one request line; pure, so it is easy to test."""
        if method not in ("GET", "HEAD"):
            return _error(405, "only GET and HEAD")
        path = target.split("?", 1)[0]
        handler = self._routes.get(path)
        if handler is not None:
            return handler()
        if path.startswith("/route/"):
            asset = decode_asset(path[len("/route/") :])
            if isinstance(asset, tuple):
                return asset
            return _json(200, self._provider.route(asset))
        return _error(404, "no such endpoint")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()  # at capacity: refuse rather than queue work behind the forwarding
            return
        async with self._slots:
            try:
                request = await self._handle(reader)
                if request is not None:
                    response, head_only = request
                    await self._write(writer, *response, head_only=head_only)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except Exception as exc:  # never a traceback to the client; one log line
                self._log.error("http_handler_failed", error=type(exc).__name__)
                await self._write(writer, *_error(500, "internal error"))
            finally:
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[Response, bool] | None:
        """Read one request head; the response and whether it is for a HEAD request."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _error(431, "request head too large"), False
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _error(400, "malformed request line"), False
        try:
            method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
        except UnicodeDecodeError:
            return _error(400, "request line is not ASCII"), False
        return await self.respond_async(method, target), method == "HEAD"

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter, status: int, ctype: str, body: bytes, *, head_only: bool = False
    ) -> None:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Internal Server Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head if head_only else head + body)
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)


class HttpThread:
    """Runs an ``HttpServer`` on its own event loop in a daemon thread.

    ``start()`` returns once the port is bound (and raises what binding raised, e.g. a
    port in use); ``close()`` stops the server and joins the thread.
    """

    JOIN_TIMEOUT = 5.0

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="http", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(started)

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        if not started.set_running_or_notify_cancel():
            return  # start() was cancelled before the thread ran
        loop = _new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self.server.start())
            except BaseException as exc:
                started.set_exception(exc)
                return
            self._loop = loop
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.server.close())
            # Requests still being answered end with the loop.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    async def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed in the meantime
                loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread.is_alive():
            await asyncio.to_thread(thread.join, self.JOIN_TIMEOUT)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
