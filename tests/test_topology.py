"""The topology data and plans (pure)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from forwarder.config import load_config
from forwarder.topology import (
    ClusterSpec,
    Topology,
    TopologyError,
    cluster_settings,
    plan,
    sample_ids,
    strip_userinfo,
)


def topo(version: int = 1, **clusters: float) -> Topology:
    return Topology(
        version=version,
        algorithm="rendezvous",
        clusters={n: ClusterSpec((f"nats://{n.lower()}:4222",), w) for n, w in clusters.items()},
    )


def test_json_round_trip_keeps_everything() -> None:
    t = topo(3, C1=1, C2=2.5)
    back = Topology.from_json(t.to_json())
    assert back == t
    assert back.version == 3
    assert back.clusters["C2"].weight == 2.5


@pytest.mark.parametrize(
    ("doc", "phrase"),
    [
        ({"clusters": {}}, "at least one cluster"),
        ({"clusters": {"C1": {"servers": []}}}, "C1.servers"),
        ({"clusters": {"C1": {"servers": ["http://x:1"]}}}, "bad URL"),
        ({"clusters": {"C1": {"servers": ["nats://u:p@x:1"]}}}, "no user info"),
        ({"clusters": {"C1": {"servers": ["nats://x:1"], "weight": 0}}}, "C1.weight"),
        ({"clusters": {"C1": {"servers": ["nats://x:1"], "weight": True}}}, "C1.weight"),
        ({"clusters": {"C1": {"servers": ["nats://x:1"], "auth": {}}}}, "auth and tls stay"),
        ({"clusters": {"C1": {"servers": ["nats://x:1"]}, "C2": {"servers": ["nats://x:1"]}}}, "duplicate"),
        ({"clusters": {"bad name": {"servers": ["nats://x:1"]}}}, "bad cluster name"),
        ({"algorithm": "ring", "clusters": {"C1": {"servers": ["nats://x:1"]}}}, "algorithm"),
        (
            {"algorithm": "openfactory", "clusters": {"C1": {"servers": ["nats://x:1"], "weight": 2}}},
            "weights",
        ),
        ({"color": 1, "clusters": {"C1": {"servers": ["nats://x:1"]}}}, "unknown field"),
        ({"version": 0, "clusters": {"C1": {"servers": ["nats://x:1"]}}}, "version"),
    ],
)
def test_invalid_topologies_name_the_field(doc: dict[str, object], phrase: str) -> None:
    with pytest.raises(TopologyError, match=phrase):
        Topology.from_mapping(doc)


def test_secrets_never_enter_the_topology(tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text(
        "source: {servers: ['nats://s:4222']}\n"
        "clusters:\n"
        "  C1: {servers: ['nats://bob:hunter2@c1:4222'], auth: {token: sekret}}\n"
    )
    settings = load_config(cfg)
    t = Topology.from_settings(settings)
    assert t.clusters["C1"].servers == ("nats://c1:4222",)
    assert b"hunter2" not in t.to_json()
    assert b"sekret" not in t.to_json()
    # Connecting puts the local credentials back, on the same host:port.
    conn = cluster_settings("C1", t.clusters["C1"], settings).connection
    assert conn.servers == ("nats://bob:hunter2@c1:4222",)
    assert conn.auth is not None
    assert conn.auth.token is not None


def test_a_cluster_unknown_to_the_local_config_gets_default_options(tmp_path: Path) -> None:
    cfg = tmp_path / "f.yaml"
    cfg.write_text("source: {servers: ['nats://s:4222']}\nclusters:\n  C1: {servers: ['nats://c1:4222']}\n")
    spec = ClusterSpec(("nats://c9:4222",), 2.0, jetstream=True)
    settings = cluster_settings("C9", spec, load_config(cfg))
    assert settings.connection.servers == ("nats://c9:4222",)
    assert settings.connection.auth is None
    assert settings.weight == 2.0
    assert settings.jetstream is not None


def test_strip_userinfo() -> None:
    assert strip_userinfo("nats://u:p@h:1") == "nats://h:1"
    assert strip_userinfo("tls://h:1") == "tls://h:1"


def test_same_routing_ignores_only_the_version() -> None:
    assert topo(1, C1=1, C2=1).same_routing(topo(7, C1=1, C2=1))
    assert not topo(1, C1=1, C2=1).same_routing(topo(1, C1=1, C2=2))


def test_plan_figures_equal_a_direct_computation_with_the_rings() -> None:
    old, new = topo(1, C1=1, C2=1, C3=1), topo(2, C1=1, C2=1, C3=1, C4=1)
    p = plan(old, new, sample=20_000)
    direct: Counter[tuple[str, str]] = Counter()
    ids = sample_ids(20_000)
    for asset in ids:
        a, b = old.cluster_for(asset), new.cluster_for(asset)
        if a != b:
            direct[(a, b)] += 1
    assert p.moves == {pair: n / len(ids) for pair, n in direct.items()}
    assert all(b == "C4" for _, b in p.moves)  # rendezvous: every move goes to the new cluster
    assert p.moved == pytest.approx(0.25, abs=0.01)
    assert p.before == pytest.approx({"C1": 1 / 3, "C2": 1 / 3, "C3": 1 / 3})
    assert p.after == pytest.approx({"C1": 0.25, "C2": 0.25, "C3": 0.25, "C4": 0.25})


def test_plan_with_assets_lists_exactly_which_move() -> None:
    old, new = topo(1, C1=1, C2=1), topo(2, C1=1, C2=3)
    assets = [f"asset-{i}" for i in range(500)]
    p = plan(old, new, assets, sample=1000)
    assert p.asset_moves is not None
    expected = {
        a: (old.cluster_for(a), new.cluster_for(a))
        for a in assets
        if old.cluster_for(a) != new.cluster_for(a)
    }
    assert p.asset_moves == expected
    assert expected
    assert all(move == ("C1", "C2") for move in expected.values())


def test_removing_a_cluster_moves_only_its_assets() -> None:
    old, new = topo(1, C1=1, C2=1, C3=1), topo(2, C1=1, C2=1)
    p = plan(old, new, sample=10_000)
    assert all(a == "C3" for a, _ in p.moves)
    assert p.moved == pytest.approx(1 / 3, abs=0.02)
