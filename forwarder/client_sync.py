"""``SyncAssetClient``: the asset client for plain synchronous code (msight's NATSPubSub style).

``subscribe(asset)``, ``publish(subject, data)``, ``listen()`` yielding messages, ``close()``.
An ``AssetClient`` runs on an asyncio loop in one background thread; messages cross to
the application through one bounded queue.

**Slow reader policy: drop the newest, count it.** When the application does not read
fast enough and the queue holds ``queue_size`` messages, a new message is dropped (not
queued) and counted, in total and per asset: ``stats()["dropped"]`` and
``stats()["dropped_by_asset"]``, with a warning logged at most every 10 seconds. The
background loop never waits for the application, so following moves, draining and
``close()`` keep working whatever the reader does, and memory stays bounded. (Blocking
the delivery instead would only move the loss into nats-py, whose pending limits drop
messages as a "slow consumer" once they fill, and would let a stalled reader hold up
the moves.) What the queue holds is always a gap-free prefix of what arrived.

Ctrl-C: a ``KeyboardInterrupt`` in the caller's thread (typically while ``listen()``
waits) propagates as usual; the ``with`` block (or ``close()``, or an ``atexit`` hook for
clients never closed) drains the connections and joins the thread. After ``close()`` no
thread and no connection of the client is left.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, TypeVar

from .client import AssetClient, AssetClientError, AssetMessage

__all__ = ["SyncAssetClient"]

T = TypeVar("T")
log = logging.getLogger("forwarder.client")

DEFAULT_QUEUE_SIZE = 10_000
CLOSE_TIMEOUT = 30.0

_open_clients: weakref.WeakSet[SyncAssetClient] = weakref.WeakSet()


class _Queue:
    """Bounded, thread-safe; ``put`` (loop thread) never blocks: when full it drops and counts."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(1, maxsize)
        self._items: collections.deque[AssetMessage] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False
        self.received = 0
        self.taken = 0
        self.dropped = 0
        self.dropped_by_asset: collections.Counter[str] = collections.Counter()
        self._last_warning = 0.0

    def put(self, msg: AssetMessage) -> None:
        with self._cond:
            if self.closed:
                return
            self.received += 1
            if len(self._items) >= self.maxsize:
                self.dropped += 1
                self.dropped_by_asset[msg.asset] += 1
                now = time.monotonic()
                warn = now - self._last_warning >= 10.0
                if warn:
                    self._last_warning = now
            else:
                self._items.append(msg)
                self._cond.notify()
                return
        if warn:
            log.warning("the application reads too slowly: %d messages dropped so far (queue_size %d)",
                        self.dropped, self.maxsize)  # fmt: skip

    def get(self, timeout: float | None) -> AssetMessage | None:
        """The next message; None after ``timeout`` seconds or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._items and not self.closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)
            if self.closed:
                return None
            self.taken += 1
            return self._items.popleft()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._items.clear()
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)


class SyncAssetClient:
    """An ``AssetClient`` for synchronous code: a background event loop, one bounded queue.

    ``SyncAssetClient.from_env()`` covers the common case in one line (the variables are in
    ``forwarder.client.ENV_HELP``); ``from_config(path)`` and ``from_forwarder_url(url)``
    take the same keyword arguments as ``AssetClient``'s.
    """

    def __init__(self, client: AssetClient, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._client = client
        self._queue = _Queue(queue_size)
        self._closed = False
        self._close_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="forwarder-asset-client", daemon=True)
        self._thread.start()
        _open_clients.add(self)
        try:
            self._call(client.start())
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_config(
        cls, path: str | os.PathLike[str], *, queue_size: int = DEFAULT_QUEUE_SIZE, **kw: Any
    ) -> SyncAssetClient:
        return cls(AssetClient.from_config(path, **kw), queue_size=queue_size)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, queue_size: int = DEFAULT_QUEUE_SIZE, **kw: Any
    ) -> SyncAssetClient:
        return cls(AssetClient.from_env(env, **kw), queue_size=queue_size)

    @classmethod
    def from_forwarder_url(
        cls, url: str, *, queue_size: int = DEFAULT_QUEUE_SIZE, **kw: Any
    ) -> SyncAssetClient:
        return cls(AssetClient.from_forwarder_url(url, **kw), queue_size=queue_size)

    # ---- the loop thread

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed or not self._thread.is_alive():
            coro.close()
            raise AssetClientError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("the asset client did not answer in time") from None

    # ---- the API

    def subscribe(self, asset: str, subject: str | None = None) -> str:
        """Read ``asset`` (on whichever cluster holds it, following moves); returns the subject used."""
        return self._call(self._client.subscribe(asset, subject, cb=self._queue.put))

    def unsubscribe(self, asset: str) -> bool:
        return self._call(self._client.unsubscribe(asset))

    def publish(self, subject: str, data: bytes | str, headers: Mapping[str, str] | None = None) -> None:
        """Publish to the source (for producers); ``flush()`` waits until the server has it."""
        self._call(self._client.publish(subject, data, headers))

    def flush(self, timeout: float = 10.0) -> None:
        self._call(self._client.flush(timeout))

    def listen(self, timeout: float | None = None) -> Iterator[AssetMessage]:
        """Yield messages as they arrive. With ``timeout``, stop after that many seconds without
        one; without, run until ``close()``."""
        while True:
            msg = self._queue.get(timeout)
            if msg is None:
                return
            yield msg

    def cluster_for(self, asset: str) -> str:
        return self._call(self._client.resolve(asset))

    def stats(self) -> dict[str, Any]:
        """The queue (``queued``, ``queue_size``, ``received``, ``taken``, ``dropped``,
        ``dropped_by_asset``, ``policy``) and the client's own counters and connections."""

        async def snapshot() -> dict[str, Any]:
            return self._client.stats()

        client = self._call(snapshot()) if not self._closed else {}
        q = self._queue
        return {
            **client,
            "policy": "drop-newest",
            "queued": len(q),
            "queue_size": q.maxsize,
            "received": q.received,
            "taken": q.taken,
            "dropped": q.dropped,
            "dropped_by_asset": dict(q.dropped_by_asset),
        }

    def connected_clusters(self) -> list[str]:
        async def names() -> list[str]:
            return self._client.connected_clusters()

        return self._call(names())

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Drain and close every connection, stop the loop, join the thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._queue.close()  # nothing waits on the reader from now on
            try:
                if self._thread.is_alive():
                    future = asyncio.run_coroutine_threadsafe(self._client.close(), self._loop)
                    try:
                        future.result(timeout)
                    except concurrent.futures.TimeoutError:
                        log.warning("closing the asset client took longer than %gs", timeout)
                        future.cancel()
                    except Exception as exc:
                        log.warning("closing the asset client: %s", exc)
            finally:
                self._closed = True
                if self._thread.is_alive():
                    self._loop.call_soon_threadsafe(self._loop.stop)
                    self._thread.join(timeout)
                _open_clients.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SyncAssetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    """A script that never called close(): drain at exit rather than drop what is buffered."""
    for client in list(_open_clients):
        client.close(timeout=5.0)
