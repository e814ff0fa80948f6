"""Helpers for the asset client tests: connections seen by the servers, a simulated forwarder."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client

from forwarder.client import AssetMessage
from forwarder.embedded import LocalCluster, LocalServer
from forwarder.topology import GRACE_ID_HEADER, Topology

Target = LocalServer | LocalCluster


def urls(target: Target) -> list[str]:
    return target.urls if isinstance(target, LocalCluster) else [target.url]


def nodes(target: Target) -> list[LocalServer]:
    return target.nodes if isinstance(target, LocalCluster) else [target]


def client_connections(target: Target, prefix: str = "asset-client") -> list[str]:
    """Names of the connections whose name starts with ``prefix``, as the servers report them (/connz)."""
    names = []
    for node in nodes(target):
        for conn in node.monitor("/connz?limit=1024").get("connections") or []:
            if str(conn.get("name", "")).startswith(prefix):
                names.append(conn["name"])
    return names


class Received:
    """What an application callback got, per asset, in arrival order."""

    def __init__(self) -> None:
        self.by_asset: dict[str, list[AssetMessage]] = defaultdict(list)

    async def __call__(self, msg: AssetMessage) -> None:
        self.by_asset[msg.asset].append(msg)

    def count(self) -> int:
        return sum(len(v) for v in self.by_asset.values())

    def payloads(self, asset: str) -> list[str]:
        return [m.data.decode() for m in self.by_asset.get(asset, [])]


@dataclass
class SimulatedForwarder:
    """The forwarder's side of a topology change, as issue 9 specifies it, played by the test.

    Routes every message with ``old`` until ``switch()``; then with ``new``, and for ``grace``
    seconds after the switch a message of an asset that moved goes to both its old and its
    new cluster, both copies carrying the same ``Forwarder-Grace-Id``.

    ``lag`` delays everything sent to a cluster (in order) by that many seconds: a slow path to
    it, so that a copy sent there arrives after later messages sent elsewhere.
    """

    old: Topology
    new: Topology
    conns: Mapping[str, Client]
    grace: float
    lag: Mapping[str, float] = field(default_factory=dict)
    switched_at: float | None = None
    published: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    double_published: int = 0
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _queues: dict[str, asyncio.Queue[tuple[float, str, bytes, dict[str, str] | None]]] = field(
        default_factory=dict
    )
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for cluster, delay in self.lag.items():
            queue: asyncio.Queue[tuple[float, str, bytes, dict[str, str] | None]] = asyncio.Queue()
            self._queues[cluster] = queue
            self._tasks.append(asyncio.get_running_loop().create_task(self._late(cluster, delay, queue)))

    async def _late(self, cluster: str, delay: float, queue: asyncio.Queue[Any]) -> None:
        while True:
            sent_at, subject, data, headers = await queue.get()
            await asyncio.sleep(max(0.0, sent_at + delay - time.monotonic()))
            await self.conns[cluster].publish(subject, data, headers=headers)
            queue.task_done()

    def switch(self) -> None:
        self.switched_at = time.monotonic()

    @property
    def in_grace(self) -> bool:
        return self.switched_at is not None and time.monotonic() < self.switched_at + self.grace

    async def _send(
        self, cluster: str, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> None:
        queue = self._queues.get(cluster)
        if queue is not None:
            queue.put_nowait((time.monotonic(), subject, data, headers))
        else:
            await self.conns[cluster].publish(subject, data, headers=headers)

    async def publish(self, asset: str, payload: str) -> None:
        subject = f"assets.{asset}.value"
        data = payload.encode()
        if self.switched_at is None:
            await self._send(self.old.cluster_for(asset), subject, data)
        else:
            before, after = self.old.cluster_for(asset), self.new.cluster_for(asset)
            if before != after and self.in_grace:
                headers = {GRACE_ID_HEADER: f"g-{next(self._ids)}"}
                await self._send(before, subject, data, headers)
                await self._send(after, subject, data, headers)
                self.double_published += 1
            else:
                await self._send(after, subject, data)
        self.published[asset].append(payload)

    async def flush(self) -> None:
        for queue in self._queues.values():
            await queue.join()
        for nc in self.conns.values():
            await nc.flush()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def connect_all(targets: Mapping[str, Target]) -> dict[str, Client]:
    return {name: await nats.connect(urls(target)) for name, target in targets.items()}


async def close_all(conns: Iterable[Client]) -> None:
    for nc in conns:
        await nc.close()
