"""Read asset data wherever it lives: ``AssetClient`` (asyncio), following moves between clusters.

The forwarder spreads assets over target clusters by consistent hashing. An application
that wants asset X must read it on X's cluster, and follow X when the topology changes.
This module does both, with the forwarder's own routing (``hashring`` through
``topology``): client and forwarder can never disagree about where an asset lives.

Needs nats-py and pyyaml only (no structlog, prometheus_client or uvloop): it imports
``config``, ``hashring``, ``topology``, ``topology_store``, ``natsconn`` and ``redact``.

Where the routing comes from (one of):

- the forwarder's config file (``AssetClient.from_config``): clusters, routing key,
  subject template, and the same ``auth``/``tls`` blocks per cluster, by cluster name;
- the live topology in the key-value bucket, when the config sets ``topology.kv_bucket``:
  read at start, then watched (and re-read every ``topology.poll_interval`` seconds);
  a cluster the bucket names but the file does not is reached at the bucket's servers
  with ``defaults`` (auth/tls), or with none;
- the forwarder's HTTP ``/route/{asset}`` (``AssetClient.from_forwarder_url``): one lookup
  per asset, cached, refreshed every ``refresh_interval`` seconds.

**Subjects.** ``subscribe(asset)`` without a subject derives it from the config: the
source subject with the key token replaced by the asset id, then the target template
applied. ``assets.>`` with ``key: {subject_token: 1}`` and ``subject: "{subject}"`` gives
``assets.<asset>.>`` (a message on exactly ``assets.<asset>``, with no further token, is
not matched: pass ``subject=`` for that). With ``key: {header: ...}`` or ``{json_field:
...}`` the asset id is not in the source subject: if the template has ``{asset}``, the
subject is exact; otherwise the client subscribes to the template's pattern and keeps
only the messages whose header or JSON field is the asset (every message of that
pattern on the cluster then reaches the client: put ``{asset}`` in the template when
that matters).

**Following moves.** On a new topology, for each subscribed asset whose cluster changed,
the client subscribes on the new cluster first and keeps the old subscription for
``grace + move_margin`` seconds (the forwarder's grace window, plus the spread between
the replicas' switches). While both are open, the OLD subscription stays the primary:
its messages are delivered at once, the new one's are held back in order. A message the
forwarder published to both clusters carries the same ``Forwarder-Grace-Id`` header on
both copies: the first copy delivered wins, its twin is dropped (a held-back twin is
removed as soon as the primary delivers its copy). When the old subscription retires it
is drained (what it already received is delivered), then what the new one held back is
delivered in order, and the new one becomes the primary. An old subscription that
still gets messages without a grace id after the margin means a replica still routes by
the old topology (one that failed to apply the new version): it is kept another window,
and again, until they stop. So per asset: every message once, in the forwarder's order,
with no gap, however late the replicas switch. The price: messages that only the new
cluster gets (after the forwarder's grace window) wait up to ``move_margin`` seconds.
Grace ids are remembered in one set per client, bounded by age (``2 * (grace +
move_margin)`` seconds) and by count (``max_grace_ids``, oldest dropped first), so memory
stays bounded however long the client runs. A lane holding back more than
``max_held_back`` messages stops holding back and delivers directly (no loss, no
duplicate; the order may then break; counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import itertools
import json
import logging
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import IO, Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .config import (
    ENV_CLUSTER_PREFIX,
    TEMPLATE_FIELD_RE,
    ConfigError,
    ConnectionSettings,
    KeySettings,
    RoutingSettings,
    Settings,
    load_config,
    load_config_mapping,
    redact_url,
)
from .hashring import CachedRing
from .natsconn import connect_options, describe_error, telling_reason
from .topology import GRACE_ID_HEADER, Topology, strip_userinfo
from .topology_store import Stored, StoreError, TopologyStore

__all__ = [
    "ENV_HELP",
    "AssetClient",
    "AssetClientError",
    "AssetMessage",
    "derive_subject",
    "settings_from_env",
]

log = logging.getLogger("forwarder.client")

DEFAULT_SOURCE = "nats://127.0.0.1:4222"
DEFAULT_MOVE_MARGIN = 5.0
DEFAULT_CONNECT_WAIT = 10.0
MAX_ASSET_BYTES = 1024
_RETRY_DELAY = 2.0


class AssetClientError(Exception):
    """The client cannot do what was asked (no route, no connection, bad subject): one line."""


@dataclass(frozen=True, slots=True)
class AssetMessage:
    """One message of an asset, as the application sees it."""

    asset: str
    subject: str
    data: bytes
    headers: Mapping[str, str] | None
    cluster: str  # where it was read


Callback = Callable[[AssetMessage], Awaitable[None] | None]
MsgFilter = Callable[[Msg], bool]


# --------------------------------------------------------------------------- subjects


def derive_subject(asset: str, source_subject: str, routing: RoutingSettings) -> tuple[str, MsgFilter | None]:
    """The subject to read ``asset`` on its cluster, and a filter when that subject is shared.

    Pure. Raises ``AssetClientError`` when the config gives no way to narrow the subject
    down (the template drops the asset id) or the asset id cannot be a subject token.
    """
    _check_asset(asset)
    key = routing.key
    template = routing.subject_template
    if key.kind == "subject_token":
        if not _is_token(asset):
            raise AssetClientError(f"asset id {asset!r} cannot be a subject token (no '.', '*', '>', spaces)")
        if not any(f in template for f in ("{asset}", "{subject}", f"{{token[{key.token}]}}")):
            raise AssetClientError(
                f"the target subject template {template!r} drops the asset id: pass subject="
            )
        pattern = _with_token(source_subject.split("."), key.token, asset)
        exact = True
    else:
        pattern = source_subject.split(".")
        exact = "{asset}" in template
        if exact and not _is_token(asset):
            raise AssetClientError(f"asset id {asset!r} cannot be a subject token (no '.', '*', '>', spaces)")
    subject = _render(template, pattern, asset)
    problem = _pattern_problem(subject)
    if problem is not None:
        raise AssetClientError(
            f"cannot derive a subject for {asset!r} from the template {template!r} ({problem}): pass subject="
        )
    return subject, None if exact else _key_filter(key, asset)


def _check_asset(asset: str) -> None:
    if not isinstance(asset, str) or not asset:
        raise AssetClientError("an asset id is a non-empty string")
    if len(asset.encode("utf-8", "surrogatepass")) > MAX_ASSET_BYTES:
        raise AssetClientError(f"asset id longer than {MAX_ASSET_BYTES} bytes")


def _is_token(text: str) -> bool:
    return bool(text) and not any(c in ".*>" or c.isspace() or not c.isprintable() for c in text)


def _with_token(tokens: list[str], index: int, asset: str) -> list[str]:
    """The source pattern with token ``index`` set to ``asset`` (wildcards elsewhere kept)."""
    if index < len(tokens) and tokens[index] != ">":
        out = list(tokens)
        out[index] = asset
        return out
    # ``>`` at position p <= index (the loader guarantees one): single wildcards up to the asset.
    p = len(tokens) - 1
    return [*tokens[:p], *["*"] * (index - p), asset, ">"]


def _render(template: str, pattern: list[str], asset: str) -> str:
    tail = pattern.index(">") if ">" in pattern else len(pattern)

    def field(m: Any) -> str:
        name = m.group(1)
        if name == "subject":
            return ".".join(pattern)
        if name == "asset":
            return asset
        index = int(name[6:-1])  # token[N]
        return pattern[index] if index < tail else "*"

    return TEMPLATE_FIELD_RE.sub(field, template)


def _pattern_problem(subject: str) -> str | None:
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token:
            return "an empty token"
        if token in ("*", ">"):
            if token == ">" and i != len(tokens) - 1:
                return "'>' before the last token"
            continue
        if "*" in token or ">" in token:
            return "a wildcard inside a token"
        if any(c.isspace() or not c.isprintable() for c in token):
            return "whitespace or a control character"
    return None


def _key_filter(key: KeySettings, asset: str) -> MsgFilter:
    if key.kind == "header":
        name = key.header

        def by_header(msg: Msg) -> bool:
            headers = msg.headers
            return headers is not None and headers.get(name, "").strip() == asset

        return by_header
    field, limit = key.field, key.max_json_bytes

    def by_field(msg: Msg) -> bool:
        if len(msg.data) > limit:
            return False
        try:
            doc = json.loads(msg.data)
        except (ValueError, RecursionError):
            return False
        return isinstance(doc, dict) and doc.get(field) == asset

    return by_field


# --------------------------------------------------------------------------- bookkeeping


class GraceIds:
    """Grace ids already delivered: bounded by age and by count (the oldest go first)."""

    def __init__(self, ttl: float, max_entries: int) -> None:
        self.ttl = ttl
        self.max_entries = max(1, max_entries)
        self._ids: OrderedDict[str, float] = OrderedDict()  # id -> expiry, in insertion order

    def __contains__(self, gid: str) -> bool:
        return gid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, gid: str, now: float | None = None) -> bool:
        """Remember ``gid``; False when it was already there (a duplicate)."""
        now = time.monotonic() if now is None else now
        ids = self._ids
        while ids:
            oldest, expiry = next(iter(ids.items()))
            if expiry > now and len(ids) < self.max_entries:
                break
            del ids[oldest]
        if gid in ids:
            return False
        ids[gid] = now + self.ttl
        return True


class _Events:
    """nats-py callbacks of one client connection: counted, and logged with stdlib logging."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.client: Client | None = None
        self.connected = False
        self.disconnects = 0
        self.reconnects = 0
        self.errors = 0
        self.slow_consumer_dropped = 0
        self.last_error: str | None = None
        self.first_connect = True  # failed attempts then end in one AssetClientError, not a log line each
        self.closing = False  # our own close: its disconnect is no event
        self._last_slow_log = 0.0
        self._reason_sticks_until = 0.0

    async def error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_dropped += 1  # nats-py reports each dropped message once
            now = time.monotonic()
            if now - self._last_slow_log >= 10.0:
                self._last_slow_log = now
                log.warning("%s: slow consumer: %d messages dropped", self.label, self.slow_consumer_dropped)
            return
        self.errors += 1
        self.last_error, self._reason_sticks_until = telling_reason(
            exc, self.last_error, self._reason_sticks_until
        )
        level = logging.DEBUG if self.first_connect else logging.WARNING
        log.log(level, "%s: %s", self.label, describe_error(exc))

    async def disconnected(self) -> None:
        if self.connected and not self.closing:
            self.disconnects += 1
            log.warning("%s: disconnected", self.label)
        self.connected = False

    def now_connected(self) -> None:
        self.connected = True
        self._reason_sticks_until = 0.0  # a refused login no longer explains what comes next

    async def reconnected(self) -> None:
        self.reconnects += 1
        self.now_connected()
        log.info("%s: reconnected", self.label)

    async def closed(self) -> None:
        self.connected = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "error_cb": self.error,
            "disconnected_cb": self.disconnected,
            "reconnected_cb": self.reconnected,
            "closed_cb": self.closed,
        }

    def snapshot(self) -> dict[str, Any]:
        server = None
        url = self.client.connected_url if self.client is not None else None
        if self.connected and url is not None:
            server = redact_url(url.geturl())
        return {
            "connected": self.connected,
            "server": server,
            "disconnects": self.disconnects,
            "reconnects": self.reconnects,
            "errors": self.errors,
            "slow_consumer_dropped": self.slow_consumer_dropped,
            "last_error": self.last_error,
        }


class _Conn:
    """One shared connection (a cluster, or the source), opened on first use."""

    def __init__(self, label: str, settings: ConnectionSettings, name: str, connect_wait: float) -> None:
        self.label = label
        self.settings = settings
        self.name = name
        self.connect_wait = connect_wait
        self.events = _Events(label)
        self.nc: Client | None = None
        self.lanes: set[_Lane] = set()
        self.closing = False
        self._lock = asyncio.Lock()
        self._failure: str | None = None
        self._failed_at = 0.0

    async def client(self) -> Client:
        async with self._lock:
            if self.closing:
                raise AssetClientError(f"{self.label}: the connection is closing")
            if self.nc is not None:
                return self.nc
            if self._failure is not None and time.monotonic() - self._failed_at < _RETRY_DELAY:
                raise AssetClientError(self._failure)  # the callers queued behind a failed attempt
            nc = Client()
            self.events.client = nc
            options = {
                **connect_options(self.settings, self.events),
                "name": self.name,
                "skip_subject_validation": False,
                "drain_timeout": 10,
            }
            try:
                # nats-py retries an initial connect forever (max_reconnect_attempts -1): bounded here.
                await asyncio.wait_for(nc.connect(**options), self.connect_wait)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                with contextlib.suppress(Exception):
                    await nc.close()
                reason = self.events.last_error or describe_error(exc)
                servers = ", ".join(redact_url(u) for u in self.settings.servers)
                self._failure = f"{self.label}: cannot connect to {servers}: {reason}"
                self._failed_at = time.monotonic()
                raise AssetClientError(self._failure) from None
            self.nc = nc
            self._failure = None
            self.events.first_connect = False
            self.events.now_connected()
            log.info("%s: connected", self.label)
            return nc

    async def close(self) -> None:
        async with self._lock:
            self.closing = True
            self.events.closing = True
            nc, self.nc = self.nc, None
        if nc is None or nc.is_closed:
            return
        try:
            if nc.is_connected:
                await nc.drain()  # delivers what the subscriptions hold, flushes, closes
            else:
                await nc.close()
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            log.warning("%s: close: %s", self.label, describe_error(exc))
            with contextlib.suppress(Exception):
                await nc.close()
        self.events.connected = False


class _Lane:
    """An asset's subscription on one cluster. An asset's first lane is its primary."""

    __slots__ = (
        "cluster", "conn", "draining", "held", "last_plain_at", "overflowed", "primary", "retire_at", "sub",
    )  # fmt: skip

    def __init__(self, cluster: str, conn: _Conn, *, primary: bool) -> None:
        self.cluster = cluster
        self.conn = conn
        self.sub: Subscription | None = None
        self.primary = primary
        self.held: OrderedDict[str | int, Msg] = OrderedDict()  # grace id (or a number) -> message
        self.retire_at: float | None = None
        self.draining = False
        self.overflowed = False
        self.last_plain_at = 0.0  # retiring lanes: when a message without a grace id last arrived


class _Asset:
    def __init__(self, asset: str, subject: str, cb: Callback, msg_filter: MsgFilter | None) -> None:
        self.asset = asset
        self.subject = subject
        self.cb = cb
        self.filter = msg_filter
        self.lanes: list[_Lane] = []
        self.lock = asyncio.Lock()
        self.closed = False
        self.retry_at: float | None = None

    def gone(self) -> bool:
        return self.closed

    def lane_on(self, cluster: str) -> _Lane | None:
        return next((lane for lane in self.lanes if lane.cluster == cluster and not lane.draining), None)


# --------------------------------------------------------------------------- the client


class AssetClient:
    """Subscribe to assets wherever they live; one shared connection per cluster.

    Build it with ``from_config``, ``from_env`` or ``from_forwarder_url`` (or the
    constructor, for embedding). Use it as an async context manager, or call ``start()``
    and ``close()``. One event loop only: the synchronous bridge
    (``forwarder.client_sync.SyncAssetClient``) runs one in a thread for you. A callback
    must not await ``close()``.
    """

    def __init__(
        self,
        *,
        topology: Topology | None = None,
        routing: RoutingSettings | None = None,
        source_subject: str = "assets.>",
        source: ConnectionSettings | None = None,
        clusters: Mapping[str, ConnectionSettings] | None = None,
        defaults: ConnectionSettings | None = None,
        kv_bucket: str | None = None,
        route_url: str | None = None,
        grace: float = 30.0,
        move_margin: float = DEFAULT_MOVE_MARGIN,
        poll_interval: float = 10.0,
        refresh_interval: float | None = 30.0,
        connect_wait: float = DEFAULT_CONNECT_WAIT,
        name: str = "asset-client",
        pending_msgs_limit: int = 65536,
        pending_bytes_limit: int = 64 * 1024 * 1024,
        max_held_back: int = 100_000,
        max_grace_ids: int = 1_000_000,
    ) -> None:
        if topology is None and route_url is None:
            raise AssetClientError("an AssetClient needs a topology (config file, bucket) or a forwarder URL")
        self._topology = topology
        self._ring: CachedRing | None = topology.cached(65536) if topology is not None else None
        self._revision = 0
        self._routing = routing or RoutingSettings(key=KeySettings(kind="subject_token", token=1))
        self._source_subject = source_subject
        self._source_settings = source or ConnectionSettings(servers=(DEFAULT_SOURCE,), name=f"{name}-source")
        self._local = dict(clusters or {})
        self._defaults = defaults
        self._kv_bucket = kv_bucket
        self._route_url = route_url.rstrip("/") if route_url else None
        self.grace = grace
        self.move_margin = move_margin
        self._poll_interval = poll_interval
        self._refresh_interval = refresh_interval
        self._connect_wait = connect_wait
        self._name = name
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._max_held_back = max_held_back
        self._drain_wait = 30.0
        self._grace_ids = GraceIds(ttl=2 * self.window, max_entries=max_grace_ids)

        self._assets: dict[str, _Asset] = {}
        self._conns: dict[str, _Conn] = {}
        self._conns_lock = asyncio.Lock()
        self._source: _Conn | None = None
        self._routes: dict[str, tuple[str, tuple[str, ...]]] = {}  # HTTP mode: asset -> (cluster, servers)
        self._store: TopologyStore | None = None
        self._topology_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._seq = itertools.count()
        self._unreachable_logged: dict[str, float] = {}
        self._started = False
        self._closed = False
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "delivered",
                "duplicates_dropped",
                "filtered_out",
                "moves_started",
                "moves_completed",
                "retirements_postponed",
                "held_back_overflows",
                "callback_errors",
                "topology_changes",
            ),
            0,
        )

    # ---- building

    @classmethod
    def from_settings(cls, settings: Settings, **kw: Any) -> AssetClient:
        """From the forwarder's validated settings; ``kw`` overrides (e.g. ``kv_bucket=None``)."""
        name = kw.get("name", "asset-client")
        args: dict[str, Any] = {
            "topology": Topology.from_settings(settings),
            "routing": settings.routing,
            "source_subject": settings.source.subject,
            "source": replace(settings.source.connection, name=f"{name}-source"),
            "clusters": {c.name: c.connection for c in settings.clusters},
            "kv_bucket": settings.topology.kv_bucket,
            "grace": settings.topology.grace,
            "poll_interval": settings.topology.poll_interval,
        }
        args.update(kw)
        return cls(**args)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **kw: Any) -> AssetClient:
        """From the forwarder's config file (the same file, with the same auth/tls blocks)."""
        return cls.from_settings(load_config(path, require_files=False), **kw)

    @classmethod
    def from_forwarder_url(
        cls, url: str, *, config: str | os.PathLike[str] | Settings | None = None, **kw: Any
    ) -> AssetClient:
        """Per-asset lookups on the forwarder's ``/route/{asset}`` (cached; refreshed every
        ``refresh_interval`` seconds, and a changed answer is followed like a move).

        Connections: with ``config``, each cluster's block by name; otherwise the servers
        the forwarder names, with ``defaults`` (auth/tls) for all of them.
        """
        if not url.startswith(("http://", "https://")):
            raise AssetClientError(f"a forwarder URL starts with http:// or https://, got {url!r}")
        if config is not None:
            settings = config if isinstance(config, Settings) else load_config(config, require_files=False)
            return cls.from_settings(
                settings, **{"kv_bucket": None, **kw, "route_url": url, "topology": None}
            )
        return cls(route_url=url, **kw)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kw: Any) -> AssetClient:
        """The common case in one line; the variables are in ``ENV_HELP``."""
        env = os.environ if env is None else env
        if env.get("FORWARDER_CONFIG"):
            return cls.from_config(env["FORWARDER_CONFIG"], **kw)
        if env.get("FORWARDER_URL"):
            source = env_connection(env, name="asset-client-source")
            args: dict[str, Any] = {
                "defaults": source,
                "source": source,
                "source_subject": env.get("FORWARDER_SUBJECT") or "assets.>",
                **kw,
            }
            return cls.from_forwarder_url(env["FORWARDER_URL"], **args)
        settings = settings_from_env(env)
        return cls.from_settings(settings, **{"defaults": settings.clusters[0].connection, **kw})

    # ---- what it knows

    @property
    def window(self) -> float:
        """Seconds an old subscription is kept after a move: the grace window plus the margin."""
        return self.grace + self.move_margin

    @property
    def topology(self) -> Topology | None:
        return self._topology

    def cluster_for(self, asset: str) -> str:
        """The cluster that holds ``asset`` now (HTTP mode: the cached answer; see ``resolve``)."""
        if self._ring is not None:
            return self._ring.cluster_for(asset)
        route = self._routes.get(asset)
        if route is None:
            raise AssetClientError(f"{asset!r} was not looked up yet: await client.resolve(asset)")
        return route[0]

    async def resolve(self, asset: str) -> str:
        """The cluster of ``asset``, asking the forwarder in HTTP mode."""
        _check_asset(asset)
        if self._ring is not None:
            return self._ring.cluster_for(asset)
        cluster, servers = await self._lookup(asset)
        self._routes[asset] = (cluster, servers)
        return cluster

    def subscriptions(self) -> dict[str, str]:
        """asset -> the cluster it is read from now (its primary subscription)."""
        return {a: st.lanes[0].cluster for a, st in self._assets.items() if st.lanes}

    def connected_clusters(self) -> list[str]:
        """The clusters this client holds a connection to."""
        return sorted(name for name, conn in self._conns.items() if conn.nc is not None)

    def stats(self) -> dict[str, Any]:
        held = sum(len(lane.held) for st in self._assets.values() for lane in st.lanes)
        return {
            "mode": "http" if self._ring is None else "bucket" if self._kv_bucket else "file",
            "topology_version": self._topology.version if self._topology is not None else None,
            "subscriptions": {
                a: {"subject": st.subject, "clusters": [lane.cluster for lane in st.lanes]}
                for a, st in self._assets.items()
            },
            "connections": {name: conn.events.snapshot() for name, conn in sorted(self._conns.items())},
            "source": self._source.events.snapshot() if self._source is not None else None,
            "held_back": held,
            "grace_ids": len(self._grace_ids),
            **self.counters,
        }

    # ---- lifecycle

    async def __aenter__(self) -> AssetClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Read the live topology (with a bucket configured) and start the background tasks."""
        if self._closed:
            raise AssetClientError("the client is closed")
        if self._started:
            return
        loop = asyncio.get_running_loop()
        if self._kv_bucket:
            self._store = TopologyStore(await self._source_client(), self._kv_bucket)
            try:
                stored = await self._store.read()
            except (StoreError, TimeoutError, nats.errors.Error) as exc:
                log.warning("topology bucket: %s: routing by the config file until it can be read",
                            describe_error(exc))  # fmt: skip
            else:
                if stored is not None:
                    await self._apply_stored(stored)
                else:
                    log.warning("bucket %s holds no topology: routing by the config file", self._kv_bucket)
            self._tasks.append(loop.create_task(self._watch_loop(), name="asset-client-watch"))
            self._tasks.append(loop.create_task(self._poll_loop(), name="asset-client-poll"))
        elif self._ring is None and self._refresh_interval:
            self._tasks.append(loop.create_task(self._refresh_loop(), name="asset-client-refresh"))
        self._tasks.append(loop.create_task(self._housekeeping(), name="asset-client-housekeeping"))
        self._started = True

    async def close(self) -> None:
        """Stop following; drain every subscription (what arrived is delivered); close every connection."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.gather(*(conn.close() for conn in list(self._conns.values())), return_exceptions=True)
        for st in list(self._assets.values()):  # what was held back, after the primaries drained
            for lane in st.lanes:
                if not lane.primary:
                    await self._flush(st, lane)
            st.closed = True
        self._assets.clear()
        self._conns.clear()
        if self._source is not None:
            await self._source.close()
            self._source = None

    # ---- subscribing and publishing

    async def subscribe(self, asset: str, subject: str | None = None, cb: Callback | None = None) -> str:
        """Read ``asset`` on its cluster: ``cb(AssetMessage)`` (a function or a coroutine
        function) gets each message once, in order. Returns the subject used, once the
        server has the subscription (a message published afterwards is received)."""
        if cb is None:
            raise TypeError("subscribe() needs cb=: a function or coroutine function taking an AssetMessage")
        await self.start()
        if asset in self._assets:
            raise AssetClientError(f"already subscribed to {asset!r}: unsubscribe first")
        if subject is None:
            subject, msg_filter = derive_subject(asset, self._source_subject, self._routing)
        else:
            _check_asset(asset)
            problem = _pattern_problem(subject)
            if problem is not None:
                raise AssetClientError(f"bad subject {subject!r}: {problem}")
            msg_filter = None
        st = _Asset(asset, subject, cb, msg_filter)
        self._assets[asset] = st
        try:
            async with st.lock:
                cluster = await self.resolve(asset)
                lane = await self._open_lane(st, cluster, primary=True)
                st.lanes.append(lane)
                assert lane.conn.nc is not None
                await lane.conn.nc.flush()
        except BaseException:
            if self._assets.get(asset) is st:
                del self._assets[asset]
            st.closed = True
            await self._drop_lanes(st)
            raise
        log.debug("subscribed to %s on %s (%s)", asset, cluster, subject)
        return subject

    async def unsubscribe(self, asset: str) -> bool:
        """Stop reading ``asset``; a connection no asset needs any more is closed. False if unknown."""
        st = self._assets.pop(asset, None)
        if st is None:
            return False
        st.closed = True
        await self._drop_lanes(st)
        return True

    async def publish(
        self, subject: str, data: bytes | str, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish to the source (for producers): the forwarder routes it like any asset message."""
        nc = await self._source_client()
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        await nc.publish(subject, payload, headers=dict(headers) if headers else None)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until the source server has everything published so far."""
        if self._source is not None and self._source.nc is not None:
            await self._source.nc.flush(timeout)  # type: ignore[arg-type]

    # ---- delivery

    def _handler(self, st: _Asset, lane: _Lane) -> Callable[[Msg], Awaitable[None]]:
        async def on_msg(msg: Msg) -> None:
            if st.closed:
                return
            if st.filter is not None and not st.filter(msg):
                self.counters["filtered_out"] += 1
                return
            headers = msg.headers
            gid = headers.get(GRACE_ID_HEADER) if headers else None
            if gid is None and lane.retire_at is not None:
                lane.last_plain_at = time.monotonic()
            if lane.primary or lane.overflowed:
                await self._deliver(st, lane.cluster, msg, gid)
                return
            if gid is not None and gid in self._grace_ids:
                self.counters["duplicates_dropped"] += 1
                return
            if len(lane.held) >= self._max_held_back:
                # Holding back more would cost unbounded memory: deliver directly from now on.
                lane.overflowed = True
                self.counters["held_back_overflows"] += 1
                log.warning("%s: more than %d messages held back on %s: delivering directly, order may break",
                            st.asset, self._max_held_back, lane.cluster)  # fmt: skip
                await self._flush(st, lane)
                await self._deliver(st, lane.cluster, msg, gid)
                return
            lane.held[gid if gid is not None else next(self._seq)] = msg

        return on_msg

    async def _deliver(self, st: _Asset, cluster: str, msg: Msg, gid: str | None) -> None:
        if gid is not None:
            if not self._grace_ids.add(gid):
                self.counters["duplicates_dropped"] += 1
                return
            for other in st.lanes:
                if other.held and other.held.pop(gid, None) is not None:
                    self.counters["duplicates_dropped"] += 1
        if st.closed:
            return
        self.counters["delivered"] += 1
        message = AssetMessage(st.asset, msg.subject, msg.data, msg.headers, cluster)
        try:
            result = st.cb(message)
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.counters["callback_errors"] += 1
            log.exception("the callback for %s failed", st.asset)

    async def _flush(self, st: _Asset, lane: _Lane) -> None:
        """Deliver what ``lane`` held back, in order (new arrivals queue behind until it is empty)."""
        while lane.held and not st.closed:
            key, msg = lane.held.popitem(last=False)
            await self._deliver(st, lane.cluster, msg, key if isinstance(key, str) else None)

    # ---- lanes and connections

    async def _open_lane(self, st: _Asset, cluster: str, *, primary: bool) -> _Lane:
        conn = await self._conn_for(cluster)
        lane = _Lane(cluster, conn, primary=primary)
        conn.lanes.add(lane)  # claimed before the connect: nobody closes it meanwhile
        try:
            nc = await conn.client()
            lane.sub = await nc.subscribe(
                st.subject,
                cb=self._handler(st, lane),
                pending_msgs_limit=self._pending_msgs_limit,
                pending_bytes_limit=self._pending_bytes_limit,
            )
        except BaseException:
            conn.lanes.discard(lane)
            await self._release(conn)
            raise
        return lane

    async def _conn_for(self, cluster: str) -> _Conn:
        async with self._conns_lock:
            conn = self._conns.get(cluster)
            if conn is None:
                settings = self._cluster_settings(cluster)
                conn = _Conn(f"cluster {cluster}", settings, f"{self._name}-{cluster}", self._connect_wait)
                self._conns[cluster] = conn
            return conn

    async def _release(self, conn: _Conn) -> None:
        """Close ``conn`` when no subscription uses it any more."""
        async with self._conns_lock:
            if conn.lanes or conn.closing or self._closed:
                return
            name = next((n for n, c in self._conns.items() if c is conn), None)
            if name is not None:
                del self._conns[name]
            conn.closing = True
            was_open = conn.nc is not None
        await conn.close()
        if name is not None and was_open:
            log.info("closed the connection to %s: no subscription needs it", name)

    async def _drop_lanes(self, st: _Asset) -> None:
        """Unsubscribe every lane of a closed asset (a lane being drained finishes by itself)."""
        for lane in list(st.lanes):
            lane.held.clear()
            if lane.draining:
                continue
            st.lanes.remove(lane)
            await self._end_lane(lane, drain=False)

    async def _end_lane(self, lane: _Lane, *, drain: bool) -> None:
        sub, lane.sub = lane.sub, None
        nc = lane.conn.nc
        if sub is not None and nc is not None and not nc.is_closed and not nc.is_draining:
            try:
                if drain and nc.is_connected:
                    await asyncio.wait_for(sub.drain(), self._drain_wait)  # type: ignore[no-untyped-call]
                else:
                    await sub.unsubscribe()
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning("%s: leaving a subscription: %s", lane.conn.label, describe_error(exc))
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        lane.conn.lanes.discard(lane)
        await self._release(lane.conn)

    def _cluster_settings(self, cluster: str) -> ConnectionSettings:
        """A cluster's connection: the config's block by name (auth, tls, options), at the
        servers the live topology names when they differ from the file's."""
        servers: tuple[str, ...] | None = None
        if self._topology is not None and cluster in self._topology.clusters:
            servers = self._topology.clusters[cluster].servers
        else:
            answered = {c: s for c, s in self._routes.values()}.get(cluster)
            if answered is not None and not any("@" in s for s in answered):  # /route redacts user info
                servers = answered
        local = self._local.get(cluster)
        if local is not None:
            if servers is None or tuple(strip_userinfo(u) for u in local.servers) == servers:
                return local
            return replace(local, servers=servers)
        if servers is None:
            raise AssetClientError(
                f"cluster {cluster} is not in the local config and its servers are unknown: "
                "give the client the forwarder's config file"
            )
        if self._defaults is not None:
            return replace(self._defaults, servers=servers, name=f"{self._name}-{cluster}")
        return ConnectionSettings(servers=servers, name=f"{self._name}-{cluster}")

    async def _source_client(self) -> Client:
        if self._source is None:
            self._source = _Conn("source", self._source_settings, f"{self._name}-source", self._connect_wait)
        return await self._source.client()

    # ---- following moves

    def _target(self, asset: str) -> str:
        return self.cluster_for(asset)

    async def _steer(self, st: _Asset, target: str) -> None:
        """Make ``target`` the asset's newest lane; the others retire after the window."""
        async with st.lock:
            if st.closed or self._closed:
                return
            existing = st.lane_on(target)
            if existing is not None and existing is st.lanes[-1] and existing.retire_at is None:
                st.retry_at = None
                return
            if existing is not None:  # moved back to a cluster still open: keep that lane
                existing.retire_at = None
            else:
                try:
                    lane = await self._open_lane(st, target, primary=not st.lanes)
                    try:
                        assert lane.conn.nc is not None
                        await lane.conn.nc.flush()  # the server has the subscription before the window starts
                    except BaseException:
                        await self._end_lane(lane, drain=False)
                        raise
                    st.lanes.append(lane)
                except (AssetClientError, TimeoutError, nats.errors.Error, OSError) as exc:
                    now = time.monotonic()
                    st.retry_at = now + _RETRY_DELAY
                    if now - self._unreachable_logged.get(target, -60.0) >= 30.0:  # once per 30 s a cluster
                        self._unreachable_logged[target] = now
                        log.warning("cannot follow assets to %s yet (%s): retrying every %gs",
                                    target, exc, _RETRY_DELAY)  # fmt: skip
                    self._wake.set()
                    return
                self.counters["moves_started"] += 1
                if len(st.lanes) > 1:
                    log.info("%s moves %s -> %s", st.asset, st.lanes[0].cluster, target)
            st.retry_at = None
            retire_at = time.monotonic() + self.window
            for lane in st.lanes:
                if lane.cluster != target and lane.retire_at is None:
                    lane.retire_at = retire_at
            self._wake.set()

    async def _retire_due(self, st: _Asset) -> None:
        async with st.lock:
            now = time.monotonic()
            while not st.closed:
                due = next((ln for ln in st.lanes if ln.retire_at is not None and ln.retire_at <= now), None)
                if due is None:
                    return
                assert due.retire_at is not None
                if due.last_plain_at > due.retire_at - self.grace:
                    # Messages the forwarder did not double-publish still arrive here after the
                    # margin: a replica is still on the old routing (it may have failed to apply the
                    # new version). Leaving now would lose its messages: wait another window.
                    due.retire_at = now + self.window
                    self.counters["retirements_postponed"] += 1
                    log.warning("%s: %s still gets messages routed by the old topology: kept %gs more",
                                st.asset, due.cluster, self.window)  # fmt: skip
                    self._wake.set()
                    continue
                was_primary = due is st.lanes[0]
                due.draining = True
                await self._end_lane(due, drain=True)  # a primary delivers what it already received
                if due in st.lanes:
                    st.lanes.remove(due)
                if st.gone():  # unsubscribed while it drained
                    return
                if was_primary and st.lanes:
                    successor = st.lanes[0]
                    await self._flush(st, successor)
                    successor.primary = True  # no await since the flush found nothing held back
                    self.counters["moves_completed"] += 1
                    log.info("%s: read on %s only (left %s)", st.asset, successor.cluster, due.cluster)
                else:
                    await self._flush(st, due)  # a lane that never became primary: what it held

    async def _housekeeping(self) -> None:
        """Retire old lanes when their window is over; retry subscriptions that failed."""
        while True:
            self._wake.clear()
            deadlines = [
                lane.retire_at
                for st in self._assets.values()
                for lane in st.lanes
                if lane.retire_at is not None and not lane.draining
            ]
            deadlines += [st.retry_at for st in self._assets.values() if st.retry_at is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            now = time.monotonic()
            jobs = [
                self._retire_due(st)
                for st in self._assets.values()
                if any(
                    ln.retire_at is not None and ln.retire_at <= now and not ln.draining for ln in st.lanes
                )
            ]
            jobs += [
                self._steer(st, self._target(st.asset))
                for st in self._assets.values()
                if st.retry_at is not None and st.retry_at <= now
            ]
            for result in await asyncio.gather(*jobs, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("following a move failed: %s", describe_error(result))

    async def _apply_stored(self, stored: Stored) -> None:
        async with self._topology_lock:
            if stored.revision <= self._revision:
                return
            self._revision = stored.revision
            old, new = self._topology, stored.topology
            self._topology = new
            if old is not None and old.same_routing(new):
                return
            self._ring = new.cached(65536)
            self.counters["topology_changes"] += 1
            log.info("topology v%d: %s", new.version, ", ".join(sorted(new.clusters)))
            moved = [
                st
                for st in self._assets.values()
                if not st.lanes or st.lanes[-1].cluster != self._target(st.asset)
            ]
        await asyncio.gather(*(self._steer(st, self._target(st.asset)) for st in moved))

    async def _watch_loop(self) -> None:
        assert self._store is not None
        while True:
            try:
                async for stored in self._store.watch():
                    await self._apply_stored(stored)
            except (StoreError, TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning("topology watch: %s: retrying", describe_error(exc))
            await asyncio.sleep(self._poll_interval)

    async def _poll_loop(self) -> None:
        """Behind the watch: a watch that silently stopped must not freeze the routing."""
        assert self._store is not None
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                stored = await self._store.read()
            except (StoreError, TimeoutError, nats.errors.Error, OSError) as exc:
                log.warning("topology read: %s", describe_error(exc))
                continue
            if stored is not None:
                await self._apply_stored(stored)

    async def _refresh_loop(self) -> None:
        assert self._refresh_interval
        while True:
            await asyncio.sleep(self._refresh_interval)
            for asset, st in list(self._assets.items()):
                try:
                    cluster, servers = await self._lookup(asset)
                except AssetClientError as exc:
                    log.warning("route lookup for %s: %s", asset, exc)
                    continue
                self._routes[asset] = (cluster, servers)
                if st.lanes and st.lanes[-1].cluster != cluster:
                    await self._steer(st, cluster)

    async def _lookup(self, asset: str) -> tuple[str, tuple[str, ...]]:
        assert self._route_url is not None
        url = f"{self._route_url}/route/{urllib.parse.quote(asset, safe='')}"
        return await asyncio.to_thread(_http_route, url, self._connect_wait)


def _http_route(url: str, timeout: float) -> tuple[str, tuple[str, ...]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            reason = exc.reason
        raise AssetClientError(f"GET {redact_url(url)}: {exc.code} {reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise AssetClientError(f"GET {redact_url(url)}: {exc}") from None
    if not (
        isinstance(doc, dict) and isinstance(doc.get("cluster"), str) and isinstance(doc.get("servers"), list)
    ):
        raise AssetClientError(f"GET {redact_url(url)}: not a /route answer")
    return doc["cluster"], tuple(str(s) for s in doc["servers"])


# --------------------------------------------------------------------------- the environment

ENV_HELP = """\
FORWARDER_CONFIG     the forwarder's config file: everything comes from it (wins over the rest)
FORWARDER_URL        the forwarder's HTTP address: per-asset lookups on /route/{asset}
NATS_CLUSTER_<NAME>  url1,url2: the clusters (the OpenFactory convention, as for the forwarder)
FORWARDER_SOURCE     url1,url2: the source, for publish() and the topology bucket
                     (default: NATS_URL, else nats://127.0.0.1:4222)
FORWARDER_SUBJECT    the source subject (assets.>)    FORWARDER_KEY_TOKEN   the asset id's token (1)
FORWARDER_ALGORITHM  rendezvous or openfactory        FORWARDER_KV_BUCKET   follow the live topology
FORWARDER_GRACE      the forwarder's grace window, seconds (30)
credentials, for every connection (the nats CLI's names): NATS_USER and NATS_PASSWORD,
or NATS_TOKEN, or NATS_CREDS (a .creds file), or NATS_NKEY (a seed file);
NATS_CA, NATS_CERT and NATS_KEY for TLS
"""


def _env_auth_tls(env: Mapping[str, str]) -> dict[str, Any]:
    """``auth``/``tls`` blocks of ``${VAR}`` references: the loader expands them from ``env``, so a
    value is taken literally (a ``$`` in a password stays one) and an error names the key."""
    auth: dict[str, str] = {}
    if env.get("NATS_USER"):
        auth = {"user": "${NATS_USER}", "password": "${NATS_PASSWORD:-}"}
    for var, key in (("NATS_TOKEN", "token"), ("NATS_CREDS", "credentials"), ("NATS_NKEY", "nkeys_seed")):
        if env.get(var):
            auth[key] = f"${{{var}}}"
    tls = {key: f"${{{var}}}" for var, key in (("NATS_CA", "ca"), ("NATS_CERT", "cert"), ("NATS_KEY", "key"))
           if env.get(var)}  # fmt: skip
    out: dict[str, Any] = {}
    if auth:
        out["auth"] = auth
    if tls:
        out["tls"] = tls
    return out


def _env_source_servers(env: Mapping[str, str]) -> str:
    if env.get("FORWARDER_SOURCE"):
        return "${FORWARDER_SOURCE}"
    return f"${{NATS_URL:-{DEFAULT_SOURCE}}}"


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from environment variables (``ENV_HELP``), validated by the forwarder's own loader."""
    env = os.environ if env is None else env
    common = _env_auth_tls(env)
    clusters = {
        var[len(ENV_CLUSTER_PREFIX) :]: {"servers": f"${{{var}}}", **common}
        for var, value in sorted(env.items())
        if var.startswith(ENV_CLUSTER_PREFIX) and value.strip()
    }
    if not clusters:
        raise ConfigError(
            "environment", "", "set FORWARDER_CONFIG, FORWARDER_URL or NATS_CLUSTER_<NAME>=url1,url2"
        )
    topology: dict[str, Any] = {"grace": "${FORWARDER_GRACE:-30}"}
    if env.get("FORWARDER_KV_BUCKET"):
        topology["kv_bucket"] = "${FORWARDER_KV_BUCKET}"
    doc: dict[str, Any] = {
        "source": {
            "servers": _env_source_servers(env),
            "subject": "${FORWARDER_SUBJECT:-assets.>}",
            **common,
        },
        "routing": {
            "key": {"subject_token": "${FORWARDER_KEY_TOKEN:-1}"},
            "hashing": {"algorithm": "${FORWARDER_ALGORITHM:-rendezvous}"},
        },
        "clusters": clusters,
        "topology": topology,
    }
    return load_config_mapping(doc, "environment", env, require_files=False)


def env_connection(env: Mapping[str, str], *, name: str) -> ConnectionSettings:
    """The environment's source (``FORWARDER_SOURCE``, ``NATS_URL``) with its credentials."""
    doc = {
        "source": {"servers": _env_source_servers(env), **_env_auth_tls(env)},
        "clusters": {"unused": {"servers": ["nats://127.0.0.1:1"]}},
    }
    settings = load_config_mapping(doc, "environment", env, require_files=False)
    return replace(settings.source.connection, name=name)


# --------------------------------------------------------------------------- forwarder watch


def printable(data: bytes, limit: int = 4096) -> str:
    """A payload on one terminal line: UTF-8 where it is, escapes for the rest."""
    text = data[:limit].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text + ("..." if len(data) > limit else "")


async def watch_asset(client: AssetClient, asset: str, subject: str | None, out: IO[str]) -> int:
    """Print ``asset``'s messages until SIGINT or SIGTERM: time, cluster, subject, payload."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def show(msg: AssetMessage) -> None:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        out.write(f"{now} {msg.cluster} {msg.subject} {printable(msg.data)}\n")
        out.flush()

    try:
        async with client:
            used = await client.subscribe(asset, subject, cb=show)
            topology = client.topology
            where = f"topology v{topology.version}" if topology is not None else "the forwarder's /route"
            print(f"forwarder watch: {asset} on {client.cluster_for(asset)} ({used}, {where}); Ctrl-C stops",
                  file=sys.stderr, flush=True)  # fmt: skip
            await stop.wait()
    except AssetClientError as exc:
        print(f"forwarder watch: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def run_watch(settings: Settings, asset: str, subject: str | None) -> int:
    """``forwarder watch``: the operator's first tool when data "does not arrive"."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("forwarder watch: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return asyncio.run(watch_asset(AssetClient.from_settings(settings, name="forwarder-watch"),
                                       asset, subject, sys.stdout))  # fmt: skip
    finally:
        log.removeHandler(handler)
