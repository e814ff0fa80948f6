"""Live topology: follow the topology bucket and apply each new version without a restart.

A watch on the bucket's key brings a new version within moments; a slow poll behind
it catches anything a broken watch missed. Versions are applied one at a time: the
host connects the new clusters, switches routing in one step and, after the grace
window, lets go of the clusters that left. A version that cannot be applied (a new
cluster unreachable) leaves the old routing in place, is reported on ``/readyz`` and
in the logs, and is tried again on the next poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client

from .config import TopologySettings
from .logs import get_logger
from .topology import Topology
from .topology_store import Stored, StoreError, TopologyStore

WATCH_RETRY = 1.0


class ApplyError(Exception):
    """A version that could not be applied; the old routing is still in place."""

    def __init__(self, version: int, clusters: list[str], cause: BaseException) -> None:
        reason = type(cause).__name__ if not str(cause) else f"{type(cause).__name__}: {cause}"
        super().__init__(
            f"version {version} not applied: cluster {', '.join(clusters)} unreachable ({reason})"
        )
        self.version = version
        self.clusters = clusters


Finish = Callable[[float], Coroutine[Any, Any, None]]  # the rest of a switch: grace window, then retirement


class TopologyHost(Protocol):
    """What the manager needs from the service."""

    topology: Topology

    async def switch_topology(self, new: Topology, timeout: float) -> Finish: ...


class TopologyManager:
    def __init__(self, settings: TopologySettings, host: TopologyHost) -> None:
        assert settings.kv_bucket is not None
        self.settings = settings
        self.bucket = settings.kv_bucket
        self._host = host
        self.log = get_logger(component="topology", bucket=settings.kv_bucket)
        self._store: TopologyStore | None = None
        self._lock = asyncio.Lock()
        self._finishing: asyncio.Task[None] | None = None
        self.revision = 0  # the bucket revision that routing follows
        self.changes = 0
        self.apply_errors = 0
        self.problem: str | None = None  # why the bucket's version is not applied (for /readyz)

    @property
    def version(self) -> int:
        return self._host.topology.version

    async def bootstrap(self, nc: Client, file_topology: Topology) -> Topology:
        """The topology to start with: the bucket's, or the file's when the bucket has none
        (then written there). If the bucket cannot be used, the file's, and the problem is
        reported until it can."""
        self._store = TopologyStore(nc, self.bucket)
        try:
            stored, wrote = await self._store.bootstrap(file_topology)
        except (StoreError, nats.errors.Error, TimeoutError) as exc:
            self.problem = f"bucket {self.bucket} unusable: {exc}"
            self.log.error("topology_bucket_unusable", error=str(exc), using="config file")
            return file_topology
        self.revision = stored.revision
        if wrote:
            self.log.info("topology_bootstrapped", version=stored.topology.version, source="config file")
        elif stored.topology.same_routing(file_topology):
            self.log.info("topology_from_bucket", version=stored.topology.version)
        else:
            self.log.warning(
                "topology_from_bucket", version=stored.topology.version,
                note="the bucket's topology differs from the config file and wins",
            )  # fmt: skip
        return stored.topology

    async def run(self) -> None:
        """Watch the bucket (and poll it, slowly) until cancelled."""
        watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            while True:
                await asyncio.sleep(self.settings.poll_interval)
                await self._poll()
        finally:
            watcher.cancel()
            if self._finishing is not None:
                self._finishing.cancel()
            await asyncio.gather(watcher, *(t for t in (self._finishing,) if t), return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            try:
                assert self._store is not None
                async for stored in self._store.watch():
                    await self.consider(stored)
            except (StoreError, nats.errors.Error, TimeoutError) as exc:
                self.log.warning("topology_watch_failed", error=str(exc))
            await asyncio.sleep(WATCH_RETRY)

    async def _poll(self) -> None:
        try:
            assert self._store is not None
            stored = await self._store.read()
        except (StoreError, nats.errors.Error, TimeoutError) as exc:
            self.log.warning("topology_read_failed", error=str(exc))
            return
        if stored is not None:
            await self.consider(stored)

    async def consider(self, stored: Stored) -> None:
        """Apply ``stored`` unless routing already follows it (or a newer revision)."""
        async with self._lock:
            if stored.revision < self.revision or (stored.revision == self.revision and self.problem is None):
                return
            if self._finishing is not None:  # one change at a time: the last grace window first
                await self._finishing
                self._finishing = None
            new = stored.topology
            try:
                finish = await self._host.switch_topology(new, self.settings.apply_timeout)
            except ApplyError as exc:
                self.apply_errors += 1
                self.problem = str(exc)
                self.log.error(
                    "topology_apply_failed", version=new.version, error=str(exc), clusters=exc.clusters
                )
                return
            self.revision = stored.revision
            self.changes += 1
            self.problem = None
            self.log.info("topology_applied", version=new.version, revision=stored.revision)
            self._finishing = asyncio.get_running_loop().create_task(finish(self.settings.grace))
