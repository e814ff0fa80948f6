"""The asset client's pure parts: subjects, the grace-id set, the environment; and its import footprint."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import nats.errors
import pytest
from nats.aio.msg import Msg

from forwarder.cli import build_parser
from forwarder.client import (
    AssetClient,
    AssetClientError,
    GraceIds,
    _Events,
    derive_subject,
    env_connection,
    settings_from_env,
)
from forwarder.config import ConfigError, RoutingSettings, load_config_mapping


def routing(source: str = "assets.>", key: dict[str, Any] | None = None, template: str = "{subject}"):
    doc = {
        "source": {"servers": ["nats://127.0.0.1:4222"], "subject": source},
        "routing": {"key": key or {"subject_token": 1}, "subject": template},
        "clusters": {"C1": {"servers": ["nats://127.0.0.1:5222"]}},
    }
    settings = load_config_mapping(doc, "test", {})
    return settings.source.subject, settings.routing


def derive(asset: str, **kw: Any) -> tuple[str, Any]:
    source, rs = routing(**kw)
    return derive_subject(asset, source, rs)


def msg(data: bytes = b"", headers: dict[str, str] | None = None) -> Msg:
    return Msg(_client=None, subject="x", data=data, headers=headers)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, "assets.pump-7.>"),
        ({"source": "assets.*.*"}, "assets.pump-7.*"),
        ({"source": "assets.*"}, "assets.pump-7"),
        ({"source": "factory.*.*.>", "key": {"subject_token": 2}}, "factory.*.pump-7.>"),
        ({"source": "x.>", "key": {"subject_token": 3}}, "x.*.*.pump-7.>"),
        ({"template": "fwd.{subject}"}, "fwd.assets.pump-7.>"),
        ({"source": "assets.*.*", "template": "out.{asset}.{token[2]}"}, "out.pump-7.*"),
        ({"source": "assets.*.*", "template": "{token[0]}.{token[1]}"}, "assets.pump-7"),
        ({"key": {"header": "Asset-Id"}, "template": "data.{asset}"}, "data.pump-7"),
    ],
)
def test_the_derived_subject_is_the_source_pattern_with_the_asset_then_the_template(kw, expected):
    subject, keep = derive("pump-7", **kw)
    assert subject == expected
    assert keep is None  # exact: nothing to filter


def test_without_the_asset_in_the_subject_the_client_filters_by_header_or_json_field():
    subject, keep = derive("pump-7", key={"header": "Asset-Id"})
    assert subject == "assets.>"
    assert keep(msg(headers={"Asset-Id": " pump-7 "}))
    assert not keep(msg(headers={"Asset-Id": "pump-8"}))
    assert not keep(msg())
    subject, keep = derive("pump-7", key={"json_field": "asset_uuid"}, template="data.{token[1]}")
    assert subject == "data.*"
    assert keep(msg(json.dumps({"asset_uuid": "pump-7", "v": 1}).encode()))
    assert not keep(msg(json.dumps({"asset_uuid": "pump-8"}).encode()))
    assert not keep(msg(b"not json"))
    assert not keep(msg(b"[1, 2]"))


@pytest.mark.parametrize(
    ("asset", "kw", "error"),
    [
        ("pump.7", {}, "cannot be a subject token"),
        ("pump 7", {}, "cannot be a subject token"),
        ("pump>", {}, "cannot be a subject token"),
        ("", {}, "non-empty"),
        ("x" * 1025, {}, "longer than 1024"),
        ("pump-7", {"source": "assets.*.*", "template": "out.{token[2]}"}, "drops the asset id"),
        ("pump-7", {"template": "{subject}.tail"}, "'>' before the last token"),
        ("pump-7", {"source": "assets.*.*", "template": "x{token[2]}.{asset}"}, "wildcard inside a token"),
        ("a.b", {"key": {"header": "Asset-Id"}, "template": "data.{asset}"}, "cannot be a subject token"),
    ],
)
def test_a_subject_that_cannot_be_derived_is_one_clear_error(asset, kw, error):
    with pytest.raises(AssetClientError, match=error):
        derive(asset, **kw)


# --------------------------------------------------------------------------- grace ids


def test_grace_ids_report_a_duplicate_once_seen():
    ids = GraceIds(ttl=10, max_entries=100)
    assert ids.add("g1", now=0)
    assert not ids.add("g1", now=1)
    assert "g1" in ids
    assert "g2" not in ids


def test_grace_ids_are_bounded_by_count_oldest_first():
    ids = GraceIds(ttl=1000, max_entries=3)
    for i in range(10):
        assert ids.add(f"g{i}", now=i)
        assert len(ids) <= 3
    assert "g9" in ids
    assert "g6" not in ids


def test_grace_ids_expire_after_their_ttl():
    ids = GraceIds(ttl=5, max_entries=1000)
    ids.add("old", now=0)
    ids.add("young", now=4)
    ids.add("now", now=5.5)  # "old" expired at 5
    assert "old" not in ids
    assert "young" in ids
    assert ids.add("old", now=6)  # forgotten: would count as new


# --------------------------------------------------------------------------- the environment


def test_settings_from_env_takes_clusters_credentials_and_routing():
    env = {
        "NATS_CLUSTER_C1": "nats://10.0.0.1:4222, nats://10.0.0.2:4222",
        "NATS_CLUSTER_C2": "nats://10.0.1.1:4222",
        "FORWARDER_SOURCE": "nats://src:4222",
        "FORWARDER_SUBJECT": "factory.*.>",
        "FORWARDER_KEY_TOKEN": "2",
        "FORWARDER_KV_BUCKET": "topo",
        "FORWARDER_GRACE": "7.5",
        "NATS_USER": "reader",
        "NATS_PASSWORD": "pa$${x}word",  # taken literally, never expanded
        "NATS_CA": "/etc/ca.pem",
    }
    settings = settings_from_env(env)
    assert [c.name for c in settings.clusters] == ["C1", "C2"]
    c1 = settings.cluster("C1").connection
    assert c1.servers == ("nats://10.0.0.1:4222", "nats://10.0.0.2:4222")
    assert c1.auth is not None
    assert c1.auth.user == "reader"
    assert c1.auth.password is not None
    assert c1.auth.password.reveal() == "pa$${x}word"
    assert c1.tls is not None
    assert c1.tls.ca == "/etc/ca.pem"
    assert settings.source.connection.servers == ("nats://src:4222",)
    assert settings.source.subject == "factory.*.>"
    assert settings.routing.key.token == 2
    assert (settings.topology.kv_bucket, settings.topology.grace) == ("topo", 7.5)


def test_settings_from_env_errors_name_the_key():
    with pytest.raises(ConfigError, match="FORWARDER_CONFIG, FORWARDER_URL or NATS_CLUSTER_"):
        settings_from_env({})
    with pytest.raises(ConfigError, match=r"routing\.key\.subject_token: must be an integer"):
        settings_from_env({"NATS_CLUSTER_C1": "nats://a:4222", "FORWARDER_KEY_TOKEN": "one"})
    with pytest.raises(ConfigError, match=r"source\.auth\.token: choose one auth method"):
        settings_from_env(
            {"NATS_CLUSTER_C1": "nats://a:4222", "NATS_USER": "u", "NATS_PASSWORD": "p", "NATS_TOKEN": "t"}
        )
    with pytest.raises(ConfigError, match=r"source\.auth\.password: must not be empty"):
        settings_from_env({"NATS_CLUSTER_C1": "nats://a:4222", "NATS_USER": "u"})


def test_from_env_prefers_the_config_file_then_the_forwarder_url(tmp_path):
    config = tmp_path / "f.yaml"
    config.write_text(
        "source: {servers: ['nats://127.0.0.1:4222']}\nclusters: {A: {servers: ['nats://127.0.0.1:5222']}}\n"
    )
    both = {
        "FORWARDER_CONFIG": str(config),
        "FORWARDER_URL": "http://fwd:8080",
        "NATS_CLUSTER_B": "nats://b:1",
    }
    assert AssetClient.from_env(both).stats()["mode"] == "file"
    assert AssetClient.from_env(both).cluster_for("x") == "A"
    by_url = AssetClient.from_env({"FORWARDER_URL": "http://fwd:8080", "NATS_TOKEN": "tok"})
    assert by_url.stats()["mode"] == "http"
    assert AssetClient.from_env({"NATS_CLUSTER_B": "nats://b:1"}).cluster_for("x") == "B"
    source = env_connection({"NATS_URL": "nats://n1:4222,nats://n2:4222"}, name="s")
    assert source.servers == ("nats://n1:4222", "nats://n2:4222")


def test_the_client_routes_like_the_forwarder(tmp_path):
    from forwarder.hashring import build_ring

    config = tmp_path / "f.yaml"
    config.write_text(
        "source: {servers: ['nats://127.0.0.1:4222']}\n"
        "clusters:\n"
        "  C1: {servers: ['nats://127.0.0.1:5001'], weight: 2}\n"
        "  C2: {servers: ['nats://127.0.0.1:5002']}\n"
        "  C3: {servers: ['nats://127.0.0.1:5003']}\n"
    )
    client = AssetClient.from_config(config)
    ring = build_ring("rendezvous", {"C1": 2, "C2": 1, "C3": 1})
    assert all(client.cluster_for(f"a{i}") == ring.cluster_for(f"a{i}") for i in range(2000))


def test_a_client_needs_a_topology_or_a_forwarder_url():
    with pytest.raises(AssetClientError, match="needs a topology"):
        AssetClient()
    with pytest.raises(AssetClientError, match="http"):
        AssetClient.from_forwarder_url("fwd:8080")
    assert isinstance(RoutingSettings, type)


# --------------------------------------------------------------------------- footprint and CLI


def test_the_client_imports_with_nats_and_yaml_only():
    code = (
        "import sys\n"
        "for name in ('structlog', 'prometheus_client', 'uvloop'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "import forwarder.client, forwarder.client_sync\n"
        "from forwarder.client_sync import SyncAssetClient\n"
        "assert 'forwarder.logs' not in sys.modules and 'forwarder.metrics' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_forwarder_watch_is_a_cli_command():
    args = build_parser().parse_args(["watch", "-c", "f.yaml", "pump-7", "--subject", "assets.pump-7"])
    assert (args.config, args.asset, args.subject) == ("f.yaml", "pump-7", "assets.pump-7")
    assert build_parser().parse_args(["watch", "pump-7"]).subject is None


async def test_the_client_tells_a_refused_login_over_the_reset_that_follows_it() -> None:
    events = _Events("cluster C1")
    await events.error(nats.errors.AuthorizationError())
    await events.error(ConnectionResetError(104, "Connection reset by peer"))
    assert events.last_error is not None
    assert "authorization" in events.last_error
    events.now_connected()  # connected since: the next failure is news again
    await events.error(ConnectionResetError(104, "Connection reset by peer"))
    assert "reset" in events.last_error
