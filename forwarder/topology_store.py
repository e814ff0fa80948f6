"""The topology in a JetStream key-value bucket: read, bootstrap, compare-and-set, watch.

One key (``topology``) holds the JSON of ``topology.Topology``. The bucket's revision
of that key is what a compare-and-set checks, so two operators applying at once get
one winner and one clear conflict.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from .topology import Topology, TopologyError

KEY = "topology"


class StoreError(Exception):
    """The bucket cannot be used (missing, no JetStream, unreachable): one line, for the CLI."""


class ConflictError(StoreError):
    """Someone else changed the topology between our read and our write."""


@dataclass(frozen=True)
class Stored:
    topology: Topology
    revision: int


class TopologyStore:
    def __init__(self, nc: Client, bucket: str) -> None:
        self._nc = nc
        self.bucket = bucket
        self._kv: KeyValue | None = None

    async def open(self, *, create: bool = False) -> KeyValue:
        """The bucket; with ``create``, made (file storage, some history) when missing."""
        if self._kv is not None:
            return self._kv
        js = self._nc.jetstream(timeout=5)
        try:
            self._kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                raise StoreError(f"key-value bucket {self.bucket} does not exist") from None
            self._kv = await js.create_key_value(KeyValueConfig(bucket=self.bucket, history=16))
        except nats.errors.NoRespondersError:
            raise StoreError("the source NATS has no JetStream (the topology bucket needs it)") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise StoreError("the source NATS did not answer the JetStream API in time") from None
        except nats.js.errors.ServiceUnavailableError:
            raise StoreError("the source NATS has no JetStream (the topology bucket needs it)") from None
        return self._kv

    async def read(self) -> Stored | None:
        """The stored topology, or None when the bucket holds none."""
        kv = await self.open()
        try:
            entry = await kv.get(KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return self._decode(entry.value, entry.revision)

    async def bootstrap(self, topology: Topology) -> tuple[Stored, bool]:
        """Write ``topology`` only if the bucket has none; (what is stored, whether we wrote it)."""
        kv = await self.open(create=True)
        try:
            revision = await kv.create(KEY, topology.to_json())
            return Stored(topology, revision), True
        except nats.js.errors.KeyWrongLastSequenceError:
            stored = await self.read()
            if stored is None:  # deleted in between: try once more
                return await self.bootstrap(topology)
            return stored, False

    async def apply(self, topology: Topology, expected_revision: int) -> int:
        """Write ``topology`` if the stored revision is still ``expected_revision``."""
        kv = await self.open()
        try:
            return await kv.update(KEY, topology.to_json(), last=expected_revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise ConflictError(
                f"the topology changed since revision {expected_revision}: someone else applied first"
            ) from None

    async def watch(self) -> AsyncIterator[Stored]:
        """Every stored topology from now on (the current one first, if any)."""
        kv = await self.open()
        watcher = await kv.watch(KEY)
        try:
            async for entry in watcher:
                if entry is None or entry.value is None or entry.operation is not None:
                    continue  # the "caught up" marker, or a delete/purge
                try:
                    yield self._decode(entry.value, entry.revision or 0)
                except StoreError:
                    continue  # a bad value was refused when written; never route by it
        finally:
            with contextlib.suppress(nats.errors.Error, AttributeError):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _decode(self, value: bytes | None, revision: int | None) -> Stored:
        try:
            return Stored(Topology.from_json(value or b""), revision or 0)
        except TopologyError as exc:
            raise StoreError(f"bucket {self.bucket} holds an invalid topology: {exc}") from None
