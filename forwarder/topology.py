"""The topology: the routing algorithm, the clusters with their servers and weights, a version.

Pure data and pure computation (no I/O): the forwarder, ``forwarder topology plan`` and
the asset client all route with it, so they can never disagree. ``topology_store.py``
keeps it in a JetStream key-value bucket.

Secrets never belong here: a cluster's auth and TLS settings stay in each replica's
config file, and server URLs are stored without user info.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from .config import (
    CLUSTER_NAME_RE,
    ClusterSettings,
    ConnectionSettings,
    JetStreamTargetSettings,
    Settings,
    redact_url,
    server_address,
)
from .hashring import CachedRing, Ring, build_ring

GRACE_ID_HEADER = "Forwarder-Grace-Id"  # on both copies of a message published to two clusters
PLAN_SAMPLE = 100_000  # ids a plan estimates shares and moves from (deterministic)
_FORMAT = 1


class TopologyError(ValueError):
    """A topology that cannot be used: the message names the field."""


@dataclass(frozen=True)
class ClusterSpec:
    servers: tuple[str, ...]
    weight: float = 1.0
    jetstream: bool = False


@dataclass(frozen=True)
class Topology:
    version: int
    algorithm: str
    clusters: Mapping[str, ClusterSpec]
    replicas: int = 128

    # ---- building

    @classmethod
    def from_settings(cls, settings: Settings, version: int = 1) -> Topology:
        """The topology a config file describes (URLs stripped of user info)."""
        return cls(
            version=version,
            algorithm=settings.routing.hashing.algorithm,
            replicas=settings.routing.hashing.replicas,
            clusters={c.name: spec_of(c) for c in settings.clusters},
        )

    @classmethod
    def from_json(cls, data: bytes | str | Mapping[str, Any]) -> Topology:
        try:
            doc = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        except ValueError as exc:
            raise TopologyError(f"not JSON: {exc}") from None
        return cls.from_mapping(doc)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], *, version: int | None = None) -> Topology:
        """From the JSON document (or a YAML file's ``topology``-shaped mapping), validated."""
        if not isinstance(doc, Mapping):
            raise TopologyError("a topology is a mapping")
        unknown = set(doc) - {"format", "version", "algorithm", "replicas", "clusters"}
        if unknown:
            raise TopologyError(f"unknown field {sorted(unknown)[0]!r}")
        clusters_doc = doc.get("clusters")
        if not isinstance(clusters_doc, Mapping) or not clusters_doc:
            raise TopologyError("clusters: at least one cluster is required")
        clusters: dict[str, ClusterSpec] = {}
        seen: dict[tuple[str, int], str] = {}
        for name, spec in clusters_doc.items():
            if not isinstance(name, str) or not CLUSTER_NAME_RE.match(name):
                raise TopologyError(f"clusters: bad cluster name {name!r}")
            clusters[name] = _spec(name, spec, seen)
        raw_version = doc.get("version", 1) if version is None else version
        if isinstance(raw_version, bool) or not isinstance(raw_version, int) or raw_version < 1:
            raise TopologyError("version: must be an integer >= 1")
        topology = cls(
            version=raw_version,
            algorithm=doc.get("algorithm", "rendezvous"),
            replicas=doc.get("replicas", 128),
            clusters=clusters,
        )
        topology.validate()
        return topology

    def validate(self) -> None:
        if self.algorithm not in ("rendezvous", "openfactory"):
            raise TopologyError(f"algorithm: must be rendezvous or openfactory, got {self.algorithm!r}")
        if (
            isinstance(self.replicas, bool)
            or not isinstance(self.replicas, int)
            or not 1 <= self.replicas <= 100_000
        ):
            raise TopologyError("replicas: must be an integer from 1 to 100000")
        if self.algorithm == "openfactory" and any(c.weight != 1.0 for c in self.clusters.values()):
            raise TopologyError("clusters: weights are not supported with algorithm openfactory")

    def to_json(self) -> bytes:
        return json.dumps(self.to_mapping(), sort_keys=True, separators=(",", ":")).encode()

    def to_mapping(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": self.version,
            "algorithm": self.algorithm,
            "replicas": self.replicas,
            "clusters": {
                name: {"servers": list(c.servers), "weight": c.weight, "jetstream": c.jetstream}
                for name, c in sorted(self.clusters.items())
            },
        }

    def with_version(self, version: int) -> Topology:
        return Topology(
            version=version, algorithm=self.algorithm, clusters=self.clusters, replicas=self.replicas
        )

    def same_routing(self, other: Topology) -> bool:
        """Everything but the version is equal."""
        return self.to_mapping() | {"version": 0} == other.to_mapping() | {"version": 0}

    # ---- routing

    @cached_property
    def ring(self) -> Ring:
        """The ring of this topology (built once; cached_property writes past the frozen guard)."""
        return build_ring(
            self.algorithm, {n: c.weight for n, c in self.clusters.items()}, replicas=self.replicas
        )

    def cluster_for(self, asset: str) -> str:
        return self.ring.cluster_for(asset)

    def cached(self, size: int = 262144) -> CachedRing:
        return CachedRing(self.ring, size)


def cluster_settings(name: str, spec: ClusterSpec, local: Settings) -> ClusterSettings:
    """How to connect to a cluster the topology names: its servers and weight from the
    topology; auth, TLS, timeouts and buffers from the local config entry of that name
    (user info in a local server URL is put back on the same host:port)."""
    try:
        mine = local.cluster(name)
    except KeyError:
        mine = None
    if mine is not None:
        connection = mine.connection
        userinfo = {server_address(u): u for u in connection.servers if "@" in u.partition("://")[2]}
        servers = tuple(userinfo.get(server_address(u), u) for u in spec.servers)
    else:
        connection = ConnectionSettings(servers=spec.servers, name=f"asset-forwarder-{name}")
        servers = spec.servers
    jetstream = None
    if spec.jetstream:
        jetstream = mine.jetstream if mine is not None and mine.jetstream else JetStreamTargetSettings()
    return ClusterSettings(
        name=name,
        connection=replace(connection, servers=servers),
        weight=spec.weight,
        weight_set=mine.weight_set if mine is not None else False,
        jetstream=jetstream,
    )


def grace_ids() -> Callable[[], str]:
    """Unique values for ``Forwarder-Grace-Id``: this process's random prefix and a counter."""
    prefix = uuid.uuid4().hex[:12]
    counter = itertools.count(1)
    return lambda: f"{prefix}.{next(counter)}"


def spec_of(cluster: ClusterSettings) -> ClusterSpec:
    return ClusterSpec(
        servers=tuple(strip_userinfo(u) for u in cluster.connection.servers),
        weight=cluster.weight,
        jetstream=cluster.jetstream is not None,
    )


def strip_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://{rest.rpartition('@')[2]}"


def _spec(name: str, spec: Any, seen: dict[tuple[str, int], str]) -> ClusterSpec:
    where = f"clusters.{name}"
    if not isinstance(spec, Mapping):
        raise TopologyError(f"{where}: must be a mapping")
    unknown = set(spec) - {"servers", "weight", "jetstream"}
    if unknown:
        raise TopologyError(
            f"{where}.{sorted(unknown)[0]}: unknown field (auth and tls stay in the config file)"
        )
    servers = spec.get("servers")
    if isinstance(servers, str):
        servers = [s.strip() for s in servers.split(",") if s.strip()]
    if not isinstance(servers, list) or not servers or not all(isinstance(s, str) and s for s in servers):
        raise TopologyError(f"{where}.servers: a non-empty list of URLs is required")
    for url in servers:
        if not url.startswith(("nats://", "tls://")):
            raise TopologyError(f"{where}.servers: bad URL {redact_url(url)} (nats:// or tls://)")
        if "@" in url.partition("://")[2]:
            raise TopologyError(
                f"{where}.servers: no user info in URLs (credentials stay in the config file)"
            )
        try:
            address = server_address(url)
        except ValueError:
            raise TopologyError(f"{where}.servers: bad URL {url}") from None
        other = seen.setdefault(address, name)
        if other != name or servers.count(url) > 1:
            raise TopologyError(f"{where}.servers: duplicate server {url}")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise TopologyError(f"{where}.weight: must be a number > 0")
    jetstream = spec.get("jetstream", False)
    if not isinstance(jetstream, bool):
        raise TopologyError(f"{where}.jetstream: must be true or false")
    return ClusterSpec(servers=tuple(servers), weight=float(weight), jetstream=jetstream)


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """What a change of topology does to the routing."""

    before: Mapping[str, float]  # share of the key space per cluster, before
    after: Mapping[str, float]
    moves: Mapping[tuple[str, str], float]  # (from, to) -> share of the key space moving
    sample: int  # ids the shares and moves were estimated from (0: exact from the ring)
    asset_moves: Mapping[str, tuple[str, str]] | None = None  # asset -> (from, to), with --assets

    @property
    def moved(self) -> float:
        return sum(self.moves.values())

    def to_mapping(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "before": dict(self.before),
            "after": dict(self.after),
            "moved": self.moved,
            "moves": [{"from": a, "to": b, "share": s} for (a, b), s in sorted(self.moves.items())],
            "sample": self.sample,
        }
        if self.asset_moves is not None:
            doc["assets"] = [
                {"asset": a, "from": f, "to": t} for a, (f, t) in sorted(self.asset_moves.items())
            ]
        return doc


def sample_ids(count: int = PLAN_SAMPLE, seed: int = 20261123) -> list[str]:
    """The deterministic ids a plan is estimated from (random UUIDs, like asset ids)."""
    rnd = random.Random(seed)
    return [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(count)]


def plan(
    old: Topology, new: Topology, assets: Iterable[str] | None = None, *, sample: int = PLAN_SAMPLE
) -> Plan:
    """Shares before and after (exact, from the rings), the share moving between each pair of
    clusters (estimated on ``sample`` ids), and with ``assets`` exactly which of them move."""
    moves: Counter[tuple[str, str]] = Counter()
    ids = sample_ids(sample)
    old_ring, new_ring = old.ring, new.ring
    for asset in ids:
        a, b = old_ring.cluster_for(asset), new_ring.cluster_for(asset)
        if a != b:
            moves[(a, b)] += 1
    asset_moves = None
    if assets is not None:
        asset_moves = {}
        for asset in assets:
            a, b = old_ring.cluster_for(asset), new_ring.cluster_for(asset)
            if a != b:
                asset_moves[asset] = (a, b)
    return Plan(
        before=old_ring.shares(),
        after=new_ring.shares(),
        moves={pair: n / len(ids) for pair, n in moves.items()},
        sample=len(ids),
        asset_moves=asset_moves,
    )


def render_plan(p: Plan, old: Topology, new: Topology) -> str:
    """The plan as a person reads it."""
    names = sorted(set(p.before) | set(p.after))
    lines = [f"topology v{old.version} -> v{new.version} ({new.algorithm})", "", "cluster   before   after"]
    for name in names:
        before, after = p.before.get(name, 0.0), p.after.get(name, 0.0)
        note = " (new)" if name not in p.before else " (removed)" if name not in p.after else ""
        lines.append(f"{name:<8} {before:7.2%} {after:7.2%}{note}")
    lines += ["", f"moving: {p.moved:.2%} of the assets (estimated on {p.sample:,} sample ids)"]
    for (a, b), share in sorted(p.moves.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {a} -> {b}: {share:.2%}")
    if p.asset_moves is not None:
        lines += ["", f"assets that move: {len(p.asset_moves)}"]
        lines += [f"  {asset}\t{a} -> {b}" for asset, (a, b) in sorted(p.asset_moves.items())]
    return "\n".join(lines)
