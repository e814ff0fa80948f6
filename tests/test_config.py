"""Unit tests for forwarder.config: every default, every error, every secret kept secret.

Each error test checks the whole contract of a config error: a ``ConfigError`` whose
message is ONE line ``FILE: KEY: message`` naming the file and the dotted key. The
environment is always passed explicitly (``env={...}``), never read from the process.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    FileRef,
    JetStreamSourceSettings,
    JetStreamTargetSettings,
    Secret,
    Settings,
    iter_connections,
    load_config,
    redact_url,
)

REFERENCE = Path(__file__).resolve().parents[1] / "config" / "forwarder.yaml"
SOURCE_URL = "nats://127.0.0.1:4222"
C1_URL = "nats://127.0.0.1:4223"
DELETE = object()


def minimal() -> dict[str, Any]:
    """The smallest valid config: a source server and one cluster."""
    return {"source": {"servers": [SOURCE_URL]}, "clusters": {"C1": {"servers": [C1_URL]}}}


def edited(*edits: tuple[str, Any], base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``minimal()`` (or ``base``) with ``("a.b.c", value)`` edits; ``DELETE`` removes a key."""
    doc = copy.deepcopy(dict(base) if base is not None else minimal())
    for dotted, value in edits:
        *parents, last = dotted.split(".")
        node = doc
        for part in parents:
            node = node.setdefault(part, {})
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return doc


class Cfg:
    """Writes a config into a temporary directory and loads it with an explicit env."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "forwarder.yaml"

    def write(self, content: str | bytes | Mapping[str, Any]) -> Path:
        if isinstance(content, bytes):
            self.path.write_bytes(content)
        elif isinstance(content, str):
            self.path.write_text(content, encoding="utf-8")
        else:
            text = yaml.safe_dump(dict(content), sort_keys=False, allow_unicode=True)
            self.path.write_text(text, encoding="utf-8")
        return self.path

    def load(
        self, content: str | bytes | Mapping[str, Any], env: Mapping[str, str] | None = None, **kw: Any
    ) -> Settings:
        return load_config(self.write(content), env={} if env is None else env, **kw)

    def error(
        self, content: str | bytes | Mapping[str, Any], env: Mapping[str, str] | None = None, **kw: Any
    ) -> ConfigError:
        path = self.write(content)
        with pytest.raises(ConfigError) as info:
            load_config(path, env={} if env is None else env, **kw)
        return info.value

    def expect(
        self,
        content: str | bytes | Mapping[str, Any],
        key: str,
        *phrases: str,
        env: Mapping[str, str] | None = None,
        **kw: Any,
    ) -> ConfigError:
        """Loading fails with one line naming this file and ``key`` and saying ``phrases``."""
        err = self.error(content, env, **kw)
        assert_error(err, self.path, key, *phrases)
        return err


def assert_error(err: ConfigError, file: Path | str, key: str, *phrases: str) -> None:
    text = str(err)
    assert len(text.splitlines()) == 1, f"not one line: {text!r}"
    assert text.isprintable(), f"control characters in: {text!r}"
    prefix = f"{file}: {key}: " if key else f"{file}: "
    assert text.startswith(prefix), f"{text!r} does not start with {prefix!r}"
    assert err.key == key
    assert err.file == str(file)
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"


def assert_secret_not_in(err: ConfigError, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in str(err), f"secret {secret!r} shown in {str(err)!r}"
        assert secret not in err.message
        assert secret not in err.key


@pytest.fixture
def cfg(tmp_path: Path) -> Cfg:
    return Cfg(tmp_path)


# --------------------------------------------------------------------------- loads, defaults


def test_reference_config_loads() -> None:
    settings = load_config(REFERENCE, env={})
    assert settings.file == str(REFERENCE)
    assert settings.source.connection.servers == ("nats://127.0.0.1:4222",)
    assert [c.name for c in settings.clusters] == ["C1"]
    assert settings.clusters[0].connection.servers == ("nats://127.0.0.1:4223",)
    assert settings.routing.hashing.algorithm == "rendezvous"
    assert settings.file_refs == ()


def test_reference_config_shows_the_defaults(cfg: Cfg) -> None:
    """The reference says every key is shown "with its default": check that it is true."""
    reference = load_config(REFERENCE, env={})
    doc = edited(
        ("source.servers", list(reference.source.connection.servers)),
        ("clusters.C1.servers", list(reference.clusters[0].connection.servers)),
    )
    defaults = cfg.load(doc)
    assert reference.source == defaults.source
    assert reference.routing == defaults.routing
    assert reference.http == defaults.http
    assert reference.log == defaults.log
    assert reference.shutdown_timeout == defaults.shutdown_timeout
    assert reference.workers == defaults.workers
    assert reference.clusters[0].connection == defaults.clusters[0].connection
    assert reference.clusters[0].weight == defaults.clusters[0].weight
    assert reference.clusters[0].jetstream == defaults.clusters[0].jetstream


def _uncommented_block(first_line: str) -> list[str]:
    """The commented-out block of the reference starting at ``first_line``, uncommented."""
    lines = REFERENCE.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_line))
    indent = first_line[: len(first_line) - len(first_line.lstrip())]
    block = []
    for line in lines[start:]:
        if not line.startswith(indent + "#"):
            break
        block.append(indent + line[len(indent) + 2 :])
    return block


def test_reference_commented_jetstream_block_shows_its_defaults(cfg: Cfg) -> None:
    block = _uncommented_block("  # jetstream:")
    assert len(block) > 5
    text = "source:\n  servers: [nats://127.0.0.1:4222]\n" + "\n".join(block)
    text += "\nclusters:\n  C1: {servers: [nats://127.0.0.1:4223]}\n"
    settings = cfg.load(text)
    assert settings.source.jetstream == JetStreamSourceSettings(stream="ASSETS", durable="asset-forwarder")


def test_reference_commented_cluster_block_is_valid(cfg: Cfg) -> None:
    block = _uncommented_block("  # C2:")
    text = "source:\n  servers: [nats://127.0.0.1:4222]\nclusters:\n" + "\n".join(block) + "\n"
    settings = cfg.load(text, require_files=False)
    c2 = settings.cluster("C2")
    assert c2.weight == 2.0
    assert c2.jetstream == JetStreamTargetSettings()
    assert len(c2.connection.servers) == 3
    assert {ref.key for ref in settings.missing_files()} == {
        "clusters.C2.auth.credentials",
        "clusters.C2.tls.ca",
    }


def test_minimal_config_gets_every_documented_default(cfg: Cfg) -> None:
    s = cfg.load(minimal())
    src = s.source
    assert src.connection.servers == (SOURCE_URL,)
    assert src.connection.name == "asset-forwarder-source"
    assert src.connection.connect_timeout == 2.0
    assert src.connection.reconnect_time_wait == 2.0
    assert src.connection.max_reconnect_attempts == -1
    assert src.connection.ping_interval == 20.0
    assert src.connection.max_outstanding_pings == 3
    assert src.connection.pending_size == 8388608
    assert src.connection.auth is None
    assert src.connection.tls is None
    assert src.subject == "assets.>"
    assert src.queue_group == "asset-forwarder"
    assert src.pending_msgs_limit == 65536
    assert src.pending_bytes_limit == 67108864
    assert src.jetstream is None

    routing = s.routing
    assert routing.key.kind == "subject_token"
    assert routing.key.token == 1
    assert routing.subject_template == "{subject}"
    assert routing.hashing.algorithm == "rendezvous"
    assert routing.hashing.replicas == 128
    assert routing.dead_letter_subject == "forwarder.dead"
    assert routing.cache_size == 262144

    (c1,) = s.clusters
    assert c1.name == "C1"
    assert c1.connection.servers == (C1_URL,)
    assert c1.connection.name == "asset-forwarder-C1"
    assert dataclasses.replace(c1.connection, servers=src.connection.servers, name=src.connection.name) == (
        src.connection
    ), "a cluster's connection options default like the source's"
    assert c1.weight == 1.0
    assert c1.weight_set is False
    assert c1.jetstream is None

    assert s.http.host == "0.0.0.0"
    assert s.http.port == 8080
    assert s.log.level == "info"
    assert s.log.format == "json"
    assert s.shutdown_timeout == 15.0
    assert s.workers == 1
    assert s.file_refs == ()
    assert s.missing_files() == []
    assert s.cluster("C1") is c1
    with pytest.raises(KeyError):
        s.cluster("C9")


def test_durations_are_floats_and_fractions_are_allowed(cfg: Cfg) -> None:
    s = cfg.load(edited(("source.connect_timeout", 3), ("source.reconnect_time_wait", 0.25)))
    assert s.source.connection.connect_timeout == 3.0
    assert isinstance(s.source.connection.connect_timeout, float)
    assert s.source.connection.reconnect_time_wait == 0.25


def test_settings_are_frozen(cfg: Cfg) -> None:
    s = cfg.load(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.source.connection.servers = ()  # type: ignore[misc]


def test_iter_connections_yields_the_source_then_each_cluster(cfg: Cfg) -> None:
    s = cfg.load(edited(("clusters.C2", {"servers": ["nats://c2"]})))
    assert [(name, conn.servers) for name, conn in iter_connections(s)] == [
        ("source", (SOURCE_URL,)),
        ("C1", (C1_URL,)),
        ("C2", ("nats://c2",)),
    ]


def test_header_and_json_field_keys(cfg: Cfg) -> None:
    header = cfg.load(edited(("routing.key", {"header": "Asset-Id"})))
    assert (header.routing.key.kind, header.routing.key.header) == ("header", "Asset-Id")
    field = cfg.load(edited(("routing.key", {"json_field": "asset_uuid", "max_json_bytes": 1024})))
    assert (field.routing.key.kind, field.routing.key.field) == ("json_field", "asset_uuid")
    assert field.routing.key.max_json_bytes == 1024


# --------------------------------------------------------------------------- missing and unknown keys


def test_missing_source_section(cfg: Cfg) -> None:
    cfg.expect(edited(("source", DELETE)), "source", "is required")


def test_missing_source_servers(cfg: Cfg) -> None:
    cfg.expect(edited(("source.servers", DELETE)), "source.servers", "is required")


@pytest.mark.parametrize(
    ("dotted", "hint"),
    [
        ("worker", "workers"),  # top level
        ("loggin", "log"),
        ("source.subjet", "subject"),  # nested
        ("routing.hashing.algoritm", "algorithm"),
        ("http.prot", "port"),
        ("clusters.C1.wieght", "weight"),  # inside a cluster
        ("clusters.C1.conect_timeout", "connect_timeout"),
        ("clusters.C1.auth.passwrd", "password"),  # inside auth
        ("clusters.C1.tls.caa", "ca"),
        ("clusters.C1.jetstream.max_pendng", "max_pending"),
    ],
)
def test_unknown_key_with_a_did_you_mean_hint(cfg: Cfg, dotted: str, hint: str) -> None:
    doc = edited(
        ("clusters.C1.auth", {"user": "u", "password": "p"}),
        ("clusters.C1.tls", {"ca": "/ca.pem"}),
        ("clusters.C1.jetstream", {"max_pending": 10}),
        (dotted, 1),
    )
    cfg.expect(doc, dotted, "unknown key", f"(did you mean {hint!r}?)", require_files=False)


def test_unknown_key_without_a_close_match_has_no_hint(cfg: Cfg) -> None:
    err = cfg.expect(edited(("zzzzzz", 1)), "zzzzzz", "unknown key")
    assert "did you mean" not in str(err)


def test_unknown_key_inside_the_source_jetstream_block(cfg: Cfg) -> None:
    doc = edited(("source.jetstream", {"stream": "ASSETS", "ack_wiat": 3}))
    cfg.expect(doc, "source.jetstream.ack_wiat", "unknown key", "(did you mean 'ack_wait'?)")


def test_non_string_key(cfg: Cfg) -> None:
    cfg.expect(edited(("http", {"port": 8080, 7: "x"})), "http", "keys must be strings")


# --------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    ("dotted", "value", "phrase"),
    [
        # strings
        ("source.subject", ["assets.>"], "must be a string, got a list"),
        ("http.host", True, "must be a string, got a boolean"),
        ("source.name", {"a": 1}, "must be a string, got a mapping"),
        ("clusters.C1.name", ["x"], "must be a string, got a list"),
        # numbers
        ("source.connect_timeout", "fast", "must be a number, got a string"),
        ("shutdown_timeout", [1], "must be a number, got a list"),
        ("clusters.C1.ping_interval", True, "must be a number, got a boolean"),
        ("clusters.C1.weight", "2", "must be a number, got a string"),
        # integers
        ("workers", 1.5, "must be an integer, got 1.5"),
        ("source.pending_msgs_limit", "10", "must be an integer, got a string"),
        ("http.port", True, "must be an integer, got a boolean"),
        ("clusters.C1.max_reconnect_attempts", {"n": 1}, "must be an integer, got a mapping"),
        # booleans
        ("clusters.C1.jetstream", "yes", "must be true or false, got a string"),
        ("clusters.C1.jetstream", 1, "must be true or false, got an integer"),
        # lists
        ("clusters.C1.servers", {"a": 1}, "must be a list of strings, got a mapping"),
        ("source.servers", 5, "must be a list of strings, got an integer"),
        # mappings
        ("http", [1], "must be a mapping, got a list"),
        ("source", "nats://127.0.0.1:4222", "must be a mapping, got a string"),
        ("clusters.C1.auth", "secret", "must be a mapping, got a string"),
        ("clusters.C1.tls", ["ca"], "must be a mapping, got a list"),
        ("routing.key", 1, "must be a mapping, got an integer"),
        ("clusters", ["C1"], "must be a mapping, got a list"),
        ("clusters.C1", [C1_URL], "must be a mapping, got a list"),
        # choices
        ("log.level", "verbose", "must be one of debug, info, warning, error"),
        ("log.format", "xml", "must be one of json, console"),
        ("routing.hashing.algorithm", "maglev", "must be one of rendezvous, openfactory"),
    ],
)
def test_wrong_type(cfg: Cfg, dotted: str, value: Any, phrase: str) -> None:
    cfg.expect(edited((dotted, value)), dotted, phrase)


@pytest.mark.parametrize(
    ("dotted", "value", "phrase"),
    [
        ("source.connect_timeout", 0, "must be > 0"),
        ("source.reconnect_time_wait", -1, "must be >= 0"),
        ("source.max_reconnect_attempts", -2, "must be >= -1"),
        ("source.max_outstanding_pings", 0, "must be >= 1"),
        ("source.pending_size", -1, "must be >= 0"),
        ("source.pending_msgs_limit", 0, "must be >= 1"),
        ("source.pending_bytes_limit", 0, "must be >= 1"),
        ("shutdown_timeout", 0, "must be > 0"),
        ("shutdown_timeout", float("inf"), "must be a finite number"),
        ("shutdown_timeout", float("nan"), "must be a finite number"),
        ("workers", 0, "must be >= 1"),
        ("http.port", -1, "must be >= 0"),
        ("http.port", 65536, "must be <= 65535"),
        ("routing.cache_size", 0, "must be >= 1"),
        ("clusters.C1.name", "", "must not be empty"),
    ],
)
def test_out_of_range_values(cfg: Cfg, dotted: str, value: Any, phrase: str) -> None:
    cfg.expect(edited((dotted, value)), dotted, phrase)


# --------------------------------------------------------------------------- clusters and servers


@pytest.mark.parametrize(
    "doc",
    [
        edited(("clusters", DELETE)),
        edited(("clusters", {})),
        edited(("clusters", None)),
    ],
    ids=["absent", "empty-mapping", "null"],
)
def test_empty_cluster_set(cfg: Cfg, doc: dict[str, Any]) -> None:
    cfg.expect(doc, "clusters", "no target clusters", "NATS_CLUSTER_<NAME>")


def test_server_list_item_of_the_wrong_type(cfg: Cfg) -> None:
    doc = edited(("clusters.C1.servers", [C1_URL, 5]))
    cfg.expect(doc, "clusters.C1.servers[1]", "must be a non-empty string, got an integer")


def test_cluster_without_servers(cfg: Cfg) -> None:
    cfg.expect(edited(("clusters.C1.servers", [])), "clusters.C1.servers", "must name at least one server")


@pytest.mark.parametrize(
    "servers",
    [
        ["nats://a:4222", "nats://a:4222"],
        ["nats://HOST:4222", "nats://host"],  # case and the default port
        ["nats://host", "tls://host:4222"],  # the scheme does not make another server
        ["nats://a:4222", "nats://a:4222/"],
    ],
)
def test_duplicate_server_within_a_cluster(cfg: Cfg, servers: list[str]) -> None:
    cfg.expect(edited(("clusters.C1.servers", servers)), "clusters.C1.servers[1]", "duplicate server")


@pytest.mark.parametrize(
    ("first", "second"), [("nats://a:4222", "nats://a:4222"), ("nats://HOST:4222", "nats://host")]
)
def test_duplicate_server_across_clusters(cfg: Cfg, first: str, second: str) -> None:
    doc = edited(("clusters", {"C1": {"servers": [first]}, "C2": {"servers": ["nats://b", second]}}))
    cfg.expect(doc, "clusters.C2.servers[1]", "is also in cluster C1")


def test_same_host_on_other_ports_is_not_a_duplicate(cfg: Cfg) -> None:
    doc = edited(
        (
            "clusters",
            {"C1": {"servers": ["nats://h:4222", "nats://h:4223"]}, "C2": {"servers": ["nats://h:4224"]}},
        )
    )
    assert [c.name for c in cfg.load(doc).clusters] == ["C1", "C2"]


def test_valid_server_urls(cfg: Cfg) -> None:
    servers = [
        "nats://a:4222",
        "tls://b:4443",
        "nats://c",
        "NATS://d:1",
        "nats://[::1]:4222",
        "nats://e:4222/",
    ]
    assert cfg.load(edited(("clusters.C1.servers", servers))).clusters[0].connection.servers == tuple(servers)


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("127.0.0.1:4222", "expected nats://host:port or tls://host:port"),  # no scheme
        ("host", "expected nats://host:port"),
        ("http://host:4222", "scheme must be nats:// or tls://"),
        ("ws://host:4222", "scheme must be nats:// or tls://"),
        ("nats://", "no host"),
        ("nats://:4222", "no host"),
        ("nats:///x", "no host"),
        ("nats://host:abc", "Port could not be cast"),
        ("nats://host:65536", "Port out of range"),
        ("nats://host:0", "port 0"),
        ("nats://[::1", "Invalid IPv6 URL"),
        ("nats://host:4222/path", "unexpected path or query"),
        ("nats://host:4222?x=1", "unexpected path or query"),
        ("nats://host:4222#frag", "unexpected path or query"),
        ("nats://ho st:4222", "contains whitespace"),
        ("nats://a:4222, nats://b:4222", "contains whitespace"),  # a list in one string
        ("nats://ho\tst:4222", "contains whitespace"),  # urllib would drop the tab silently
        ("nats://host:42\n22", "contains whitespace"),
        ("nats://host\x00:4222", "control characters"),
    ],
)
@pytest.mark.parametrize("where", ["source", "clusters.C1"])
def test_bad_server_url(cfg: Cfg, url: str, phrase: str, where: str) -> None:
    cfg.expect(edited((f"{where}.servers", [url])), f"{where}.servers[0]", "bad server URL", phrase)


@pytest.mark.parametrize("weight", [0, -1, -0.5, True, False, float("nan"), float("inf")])
def test_bad_weight(cfg: Cfg, weight: Any) -> None:
    doc = edited(("clusters.C2", {"servers": ["nats://c2"], "weight": weight}))
    cfg.expect(doc, "clusters.C2.weight", "must be")


def test_weights(cfg: Cfg) -> None:
    doc = edited(("clusters.C2", {"servers": ["nats://c2"], "weight": 2.5}))
    c1, c2 = cfg.load(doc).clusters
    assert (c1.weight, c1.weight_set) == (1.0, False)
    assert (c2.weight, c2.weight_set) == (2.5, True)


@pytest.mark.parametrize("name", ["C 1", "c.1", "-c1", "_c1", "x" * 65, "é", "C1/", ""])
def test_invalid_cluster_name(cfg: Cfg, name: str) -> None:
    doc = edited(("clusters", {name: {"servers": ["nats://c"]}}))
    key = f"clusters.{name}" if name else "clusters"
    cfg.expect(doc, key, "cluster names are letters, digits, '_' and '-'")


def test_non_string_cluster_name(cfg: Cfg) -> None:
    cfg.expect(
        "source: {servers: [nats://s]}\nclusters:\n  12: {servers: [nats://c]}\n",
        "clusters.12",
        "cluster names",
    )


def test_valid_cluster_names(cfg: Cfg) -> None:
    names = ["c1_a-B", "9lives", "x" * 64, "C"]
    doc = edited(("clusters", {n: {"servers": [f"nats://h{i}"]} for i, n in enumerate(names)}))
    assert [c.name for c in cfg.load(doc).clusters] == names


def test_cluster_jetstream_true_gives_the_defaults(cfg: Cfg) -> None:
    c1 = cfg.load(edited(("clusters.C1.jetstream", True))).clusters[0]
    assert c1.jetstream == JetStreamTargetSettings(max_pending=4000, ack_timeout=5.0)


def test_cluster_jetstream_false_is_core(cfg: Cfg) -> None:
    assert cfg.load(edited(("clusters.C1.jetstream", False))).clusters[0].jetstream is None


def test_cluster_jetstream_mapping(cfg: Cfg) -> None:
    c1 = cfg.load(edited(("clusters.C1.jetstream", {"max_pending": 10}))).clusters[0]
    assert c1.jetstream == JetStreamTargetSettings(max_pending=10, ack_timeout=5.0)
    c1 = cfg.load(edited(("clusters.C1.jetstream", {"ack_timeout": 0.5}))).clusters[0]
    assert c1.jetstream == JetStreamTargetSettings(max_pending=4000, ack_timeout=0.5)


@pytest.mark.parametrize(
    ("block", "key", "phrase"),
    [
        ({"max_pending": 0}, "clusters.C1.jetstream.max_pending", "must be >= 1"),
        ({"max_pending": 1.5}, "clusters.C1.jetstream.max_pending", "must be an integer"),
        ({"ack_timeout": 0}, "clusters.C1.jetstream.ack_timeout", "must be > 0"),
    ],
)
def test_cluster_jetstream_mapping_errors(cfg: Cfg, block: dict[str, Any], key: str, phrase: str) -> None:
    cfg.expect(edited(("clusters.C1.jetstream", block)), key, phrase)


def test_openfactory_with_a_weight_names_the_weight(cfg: Cfg) -> None:
    doc = edited(
        ("routing.hashing", {"algorithm": "openfactory"}),
        ("clusters.C2", {"servers": ["nats://c2"], "weight": 1}),  # even the default value, when set
    )
    cfg.expect(doc, "clusters.C2.weight", "not supported", "openfactory")


def test_openfactory_without_weights_loads(cfg: Cfg) -> None:
    doc = edited(
        ("routing.hashing", {"algorithm": "openfactory", "replicas": 64}),
        ("clusters.C2", {"servers": ["nats://c2"]}),
    )
    hashing = cfg.load(doc).routing.hashing
    assert (hashing.algorithm, hashing.replicas) == ("openfactory", 64)


@pytest.mark.parametrize(
    ("replicas", "ok"), [(1, True), (100_000, True), (0, False), (-1, False), (100_001, False)]
)
def test_replicas_bounds(cfg: Cfg, replicas: int, ok: bool) -> None:
    doc = edited(("routing.hashing", {"algorithm": "openfactory", "replicas": replicas}))
    if ok:
        assert cfg.load(doc).routing.hashing.replicas == replicas
    else:
        cfg.expect(doc, "routing.hashing.replicas", "must be")


def test_replicas_must_be_an_integer(cfg: Cfg) -> None:
    cfg.expect(edited(("routing.hashing.replicas", 1.5)), "routing.hashing.replicas", "must be an integer")


# --------------------------------------------------------------------------- NATS_CLUSTER_* environment


def test_env_clusters_when_the_file_defines_none(cfg: Cfg) -> None:
    env = {
        "NATS_CLUSTER_B": "nats://b1:4222, nats://b2:4222",
        "NATS_CLUSTER_A": "nats://a1:4222",
        "NATS_CLUSTER_EMPTY": "  ",  # an empty variable defines nothing
        "OTHER": "nats://x",
    }
    settings = cfg.load(edited(("clusters", DELETE)), env=env)
    assert [c.name for c in settings.clusters] == ["A", "B"]
    assert settings.cluster("B").connection.servers == ("nats://b1:4222", "nats://b2:4222")
    assert settings.cluster("A").connection.servers == ("nats://a1:4222",)
    assert settings.cluster("A").connection.name == "asset-forwarder-A"
    assert settings.cluster("A").weight == 1.0


def test_env_clusters_with_an_empty_clusters_mapping(cfg: Cfg) -> None:
    settings = cfg.load(edited(("clusters", {})), env={"NATS_CLUSTER_X": "nats://x"})
    assert [c.name for c in settings.clusters] == ["X"]


def test_env_clusters_are_ignored_when_the_file_defines_clusters(cfg: Cfg) -> None:
    settings = cfg.load(minimal(), env={"NATS_CLUSTER_X": "nats://x", "NATS_CLUSTER_C1": "nats://y"})
    assert [c.name for c in settings.clusters] == ["C1"]
    assert settings.clusters[0].connection.servers == (C1_URL,)


def test_env_cluster_with_a_bad_url_names_the_variable(cfg: Cfg) -> None:
    err = cfg.error(edited(("clusters", DELETE)), env={"NATS_CLUSTER_X": "http://x"})
    assert_error(err, "environment NATS_CLUSTER_X", "X.servers[0]", "bad server URL", "scheme")


def test_env_clusters_sharing_a_server(cfg: Cfg) -> None:
    err = cfg.error(
        edited(("clusters", DELETE)), env={"NATS_CLUSTER_A": "nats://h", "NATS_CLUSTER_B": "nats://H:4222"}
    )
    assert_error(err, "environment NATS_CLUSTER_B", "B.servers[0]", "is also in cluster A")


def test_env_cluster_with_an_invalid_name(cfg: Cfg) -> None:
    err = cfg.error(edited(("clusters", DELETE)), env={"NATS_CLUSTER_A.B": "nats://h"})
    assert_error(err, "environment NATS_CLUSTER_A.B", "A.B", "cluster names")


# --------------------------------------------------------------------------- ${VAR} expansion


def test_env_var_is_expanded(cfg: Cfg) -> None:
    s = cfg.load(
        edited(("http.host", "${HOST}"), ("source.subject", "${PREFIX}.>")),
        env={"HOST": "10.0.0.1", "PREFIX": "plant"},
    )
    assert s.http.host == "10.0.0.1"
    assert s.source.subject == "plant.>"


def test_env_var_unset_without_default(cfg: Cfg) -> None:
    err = cfg.expect(
        edited(("http.host", "${NOT_SET}")), "http.host", "NOT_SET is not set and has no default"
    )
    assert "${NOT_SET:-default}" in str(err)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "fallback"),  # unset: the default
        ({"H": "given"}, "given"),  # set: the value
        ({"H": ""}, "fallback"),  # set but empty: the default, as in the shell's ${H:-x}
    ],
    ids=["unset", "set", "set-empty"],
)
def test_env_var_with_default(cfg: Cfg, env: dict[str, str], expected: str) -> None:
    assert cfg.load(edited(("http.host", "${H:-fallback}")), env=env).http.host == expected


def test_env_var_with_an_empty_default(cfg: Cfg) -> None:
    # An empty default is allowed; the key then decides whether empty is fine.
    assert cfg.load(edited(("source.queue_group", "${QG:-}"))).source.queue_group is None
    cfg.expect(edited(("http.host", "${H:-}")), "http.host", "must not be empty")


def test_env_var_set_but_empty_without_default(cfg: Cfg) -> None:
    """Current behaviour: an empty variable gives the empty string (the key may refuse it)."""
    assert cfg.load(edited(("source.queue_group", "${QG}")), env={"QG": ""}).source.queue_group is None
    cfg.expect(edited(("http.host", "${H}")), "http.host", "must not be empty", env={"H": ""})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a$$b", "a$b"),
        ("$$", "$"),
        ("$${H}", "${H}"),  # an escaped reference is not expanded
        ("$$$$", "$$"),
        ("$H", "$H"),  # only ${...} is a reference
        ("cost$", "cost$"),
        ("${H}$${H}", "x${H}"),
    ],
)
def test_dollar_escape(cfg: Cfg, value: str, expected: str) -> None:
    assert cfg.load(edited(("http.host", value)), env={"H": "x"}).http.host == expected


@pytest.mark.parametrize("value", ["${", "a${H", "${}", "${1X}", "${H-x}", "${H:x}", "${ H }"])
def test_malformed_env_reference(cfg: Cfg, value: str) -> None:
    cfg.expect(edited(("http.host", value)), "http.host", "malformed environment reference", env={"H": "x"})


def test_malformed_env_reference_says_where(cfg: Cfg) -> None:
    cfg.expect(edited(("http.host", "abc${")), "http.host", "malformed environment reference at character 4")


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("clusters.C1.auth", {"user": "u", "password": "S3cr${etPw"}), "clusters.C1.auth.password"),
        (("clusters.C1.auth", {"token": "${S3cretTok"}), "clusters.C1.auth.token"),
        (("clusters.C1.servers", ["nats://u:S3cr${etPw@host"]), "clusters.C1.servers[0]"),
    ],
    ids=["password", "token", "url"],
)
def test_malformed_env_reference_in_a_secret_is_not_shown(cfg: Cfg, edit: tuple[str, Any], key: str) -> None:
    err = cfg.expect(edited(edit), key, "malformed environment reference")
    assert_secret_not_in(err, "S3cr", "etPw", "S3cretTok")


def test_env_values_are_not_parsed_as_yaml(cfg: Cfg) -> None:
    s = cfg.load(edited(("http.host", "${H}")), env={"H": "[a, b]: {c}"})
    assert s.http.host == "[a, b]: {c}"


def test_number_from_env(cfg: Cfg) -> None:
    s = cfg.load(
        "source: {servers: [nats://s]}\nclusters: {C1: {servers: [nats://c]}}\nhttp:\n  port: ${PORT}\n",
        env={"PORT": "9090"},
    )
    assert s.http.port == 9090
    assert type(s.http.port) is int


def test_float_from_env(cfg: Cfg) -> None:
    s = cfg.load(
        edited(("source.connect_timeout", "${T:-0.25}"), ("clusters.C1.weight", "${W}")), env={"W": "2"}
    )
    assert s.source.connection.connect_timeout == 0.25
    assert s.clusters[0].weight == 2.0


@pytest.mark.parametrize("value", ["abc", "", "1.5", "0x10", "nan"])
def test_bad_integer_from_env(cfg: Cfg, value: str) -> None:
    cfg.expect(edited(("http.port", "${PORT}")), "http.port", "must be an integer", env={"PORT": value})


@pytest.mark.parametrize("value", ["abc", "", "nan", "inf"])
def test_bad_number_from_env(cfg: Cfg, value: str) -> None:
    cfg.expect(edited(("clusters.C1.weight", "${W}")), "clusters.C1.weight", "must be", env={"W": value})


def test_a_quoted_number_in_the_file_is_a_string(cfg: Cfg) -> None:
    """Only values from the environment are parsed as numbers; "8080" in YAML is a string."""
    cfg.expect(edited(("http.port", "8080")), "http.port", "must be an integer, got a string")


@pytest.mark.parametrize(
    ("value", "enabled"),
    [
        ("true", True),
        ("True", True),
        ("yes", True),
        ("1", True),
        ("false", False),
        ("no", False),
        ("0", False),
    ],
)
def test_boolean_from_env(cfg: Cfg, value: str, enabled: bool) -> None:
    c1 = cfg.load(edited(("clusters.C1.jetstream", "${JS}")), env={"JS": value}).clusters[0]
    assert (c1.jetstream is not None) is enabled


@pytest.mark.parametrize("value", ["maybe", "on", ""])
def test_bad_boolean_from_env(cfg: Cfg, value: str) -> None:
    cfg.expect(
        edited(("clusters.C1.jetstream", "${JS}")),
        "clusters.C1.jetstream",
        "must be true or false",
        env={"JS": value},
    )


def test_servers_from_one_env_var_with_a_comma_separated_list(cfg: Cfg) -> None:
    env = {"SERVERS": "nats://a:4222, nats://b:4222 ,nats://c:4222"}
    s = cfg.load(edited(("clusters.C1.servers", "${SERVERS}")), env=env)
    assert s.clusters[0].connection.servers == ("nats://a:4222", "nats://b:4222", "nats://c:4222")


@pytest.mark.parametrize(
    ("value", "servers"),
    [
        ("nats://u:pa$$w@h", ("nats://u:pa$$w@h",)),
        ("nats://u:pa${X}w@h,nats://b", ("nats://u:pa${X}w@h", "nats://b")),
        ("nats://u:pa${w@h", ("nats://u:pa${w@h",)),
    ],
)
def test_env_values_are_taken_literally(cfg: Cfg, value: str, servers: tuple[str, ...]) -> None:
    """A value from the environment is not expanded again (a password may hold '$')."""
    s = cfg.load(edited(("clusters.C1.servers", "${S}")), env={"S": value, "X": "expanded"})
    assert s.clusters[0].connection.servers == servers
    s = cfg.load(edited(("clusters.C1.servers", ["${S}"])), env={"S": value.split(",")[0], "X": "expanded"})
    assert s.clusters[0].connection.servers == servers[:1]


def test_escaped_reference_in_a_single_server_string(cfg: Cfg) -> None:
    s = cfg.load(edited(("clusters.C1.servers", "nats://u:p$${X}@h")), env={"X": "expanded"})
    assert s.clusters[0].connection.servers == ("nats://u:p${X}@h",)


def test_servers_list_items_from_env(cfg: Cfg) -> None:
    s = cfg.load(
        edited(("clusters.C1.servers", ["${A}", "nats://${B_HOST}:4222"])),
        env={"A": "nats://a", "B_HOST": "b"},
    )
    assert s.clusters[0].connection.servers == ("nats://a", "nats://b:4222")


def test_servers_list_item_with_an_unset_var(cfg: Cfg) -> None:
    cfg.expect(
        edited(("clusters.C1.servers", ["nats://a", "${B}"])), "clusters.C1.servers[1]", "B is not set"
    )


@pytest.mark.parametrize(("value", "index"), [("nats://a,,nats://b", 1), ("", 0), (",", 0)])
def test_servers_from_env_with_an_empty_entry(cfg: Cfg, value: str, index: int) -> None:
    cfg.expect(
        edited(("clusters.C1.servers", "${S}")),
        f"clusters.C1.servers[{index}]",
        "must be a non-empty string",
        env={"S": value},
    )


def test_a_plain_string_is_one_server(cfg: Cfg) -> None:
    """Current behaviour: a single string where a list is expected is a list of one."""
    assert cfg.load(edited(("clusters.C1.servers", "nats://a"))).clusters[0].connection.servers == (
        "nats://a",
    )


# --------------------------------------------------------------------------- subjects, tokens, templates


@pytest.mark.parametrize(
    ("subject", "token", "phrase"),
    [
        ("assets.*.*", 5, "token index 5 is out of range"),
        ("assets.*.*", 3, "token index 3 is out of range"),
        ("assets.*.*", 0, "is the literal 'assets'"),
        ("plant.*.data.*", 2, "is the literal 'data'"),
        ("assets.>", 0, "is the literal 'assets'"),
    ],
)
def test_bad_subject_token(cfg: Cfg, subject: str, token: int, phrase: str) -> None:
    doc = edited(("source.subject", subject), ("routing.key", {"subject_token": token}))
    cfg.expect(doc, "routing.key.subject_token", phrase)


@pytest.mark.parametrize(
    ("subject", "token"), [("assets.*.*", 1), ("assets.*.*", 2), ("assets.>", 1), ("assets.>", 7)]
)
def test_good_subject_token(cfg: Cfg, subject: str, token: int) -> None:
    doc = edited(("source.subject", subject), ("routing.key", {"subject_token": token}))
    assert cfg.load(doc).routing.key.token == token


@pytest.mark.parametrize(
    ("key", "dotted", "phrase"),
    [
        ({"subject_token": -1}, "routing.key.subject_token", "must be >= 0"),
        ({"subject_token": 1.5}, "routing.key.subject_token", "must be an integer"),
        ({"header": "Bad Header"}, "routing.key.header", "is not a valid header name"),
        ({"header": ""}, "routing.key.header", "must not be empty"),
        ({"json_field": ""}, "routing.key.json_field", "must not be empty"),
        ({"json_field": "a", "max_json_bytes": 0}, "routing.key.max_json_bytes", "must be >= 1"),
        ({}, "routing.key", "must set exactly one of subject_token, header, json_field"),
        ({"header": "A", "json_field": "b"}, "routing.key", "must set exactly one"),
        ({"subject_token": 1, "max_json_bytes": 10}, "routing.key.max_json_bytes", "unknown key"),
    ],
)
def test_bad_routing_key(cfg: Cfg, key: dict[str, Any], dotted: str, phrase: str) -> None:
    cfg.expect(edited(("routing.key", key)), dotted, phrase)


@pytest.mark.parametrize(
    ("template", "phrase"),
    [
        ("{foo}", "unknown field {foo}"),
        ("out.{}", "unknown field {}"),
        ("out.{token}", "unknown field {token}"),
        ("out.{token[5]}", "token index 5 is out of range"),
        ("x..{asset}", "has an empty token"),
        ("x.*.{asset}", "must not contain wildcards"),
        ("x.{asset}.>", "must not contain wildcards"),
        ("x y.{asset}", "contains whitespace"),
        ("x.{asset", "unbalanced braces"),
        ("x.asset}", "unbalanced braces"),
        (".{subject}", "has an empty token"),
    ],
)
def test_bad_subject_template(cfg: Cfg, template: str, phrase: str) -> None:
    doc = edited(("source.subject", "assets.*.*"), ("routing.subject", template))
    cfg.expect(doc, "routing.subject", phrase)


@pytest.mark.parametrize(
    ("source_subject", "template"),
    [
        ("assets.*.*", "out.{token[0]}.{token[2]}.{asset}"),
        ("assets.>", "out.{token[9]}"),  # an open-ended source: any index may exist
        ("assets.>", "mirror.{subject}"),
    ],
)
def test_good_subject_template(cfg: Cfg, source_subject: str, template: str) -> None:
    doc = edited(("source.subject", source_subject), ("routing.subject", template))
    assert cfg.load(doc).routing.subject_template == template


@pytest.mark.parametrize(
    ("subject", "phrase"),
    [
        ("assets..x", "has an empty token"),
        ("assets.>.x", "'>' must be the last token"),
        ("assets.a*", "wildcards must be whole tokens"),
        ("assets x", "contains whitespace"),
    ],
)
def test_bad_source_subject(cfg: Cfg, subject: str, phrase: str) -> None:
    cfg.expect(edited(("source.subject", subject)), "source.subject", phrase)


@pytest.mark.parametrize("subject", ["dead.*", "dead.>", "*", "dead..x", "dead x"])
def test_bad_dead_letter_subject(cfg: Cfg, subject: str) -> None:
    cfg.expect(edited(("routing.dead_letter_subject", subject)), "routing.dead_letter_subject", "subject")


def test_queue_group(cfg: Cfg) -> None:
    assert cfg.load(edited(("source.queue_group", ""))).source.queue_group is None
    assert cfg.load(edited(("source.queue_group", "fwd-1"))).source.queue_group == "fwd-1"
    cfg.expect(edited(("source.queue_group", "a b")), "source.queue_group", "is not a valid queue group name")


# --------------------------------------------------------------------------- the file itself


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert_error(info.value, path, "", "cannot read the file", "No such file")


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, env={})
    assert_error(info.value, tmp_path, "", "cannot read the file")


def test_unreadable_file_even_as_root(cfg: Cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    path = cfg.write(minimal())

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert_error(info.value, path, "", "cannot read the file (Permission denied)")


def test_unreadable_file(cfg: Cfg) -> None:
    """A file the process may not read: for real, also when the tests run as root.

    Root reads any file through CAP_DAC_OVERRIDE; ``setpriv`` runs the CLI as root
    without that capability (and without CAP_DAC_READ_SEARCH), so the mode-0 file is
    refused by the kernel exactly as it would be for an ordinary user.
    """
    path = cfg.write(minimal())
    path.chmod(0)
    try:
        if os.geteuid() != 0:
            with pytest.raises(ConfigError) as info:
                load_config(path, env={})
            assert_error(info.value, path, "", "cannot read the file", "Permission denied")
            return
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.fail("running as root needs util-linux's setpriv to drop CAP_DAC_OVERRIDE")
        dropped = "-dac_override,-dac_read_search"
        result = subprocess.run(
            [
                setpriv,
                f"--inh-caps={dropped}",
                f"--bounding-set={dropped}",
                sys.executable,
                "-m",
                "forwarder",
                "check-config",
                "-c",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr == f"forwarder: {path}: cannot read the file (Permission denied)\n"
    finally:
        path.chmod(0o600)


def test_yaml_syntax_error_shows_line_and_column(cfg: Cfg) -> None:
    text = "source:\n  servers: [nats://a]\n  subject: x: y\nclusters: {}\n"
    cfg.expect(text, "", "YAML syntax error at line 3, column 13", "mapping values are not allowed here")


def test_yaml_tab_indentation(cfg: Cfg) -> None:
    cfg.expect("source:\n\tservers: [nats://a]\n", "", "YAML syntax error at line 2")


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("- source\n- clusters\n", "a list"),
        ("just a string\n", "a string"),
        ("42\n", "an integer"),
        ("", "nothing"),
        ("# only a comment\n", "nothing"),
        ("---\n...\n", "nothing"),
    ],
    ids=["list", "string", "integer", "empty", "comment", "empty-document"],
)
def test_document_that_is_not_a_mapping(cfg: Cfg, text: str, kind: str) -> None:
    cfg.expect(text, "", f"the document must be a mapping of sections, got {kind}")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (
            "source: {servers: [nats://a]}\nsource: {servers: [nats://b]}\n",
            "line 2, column 1: duplicate key 'source'",
        ),
        (
            "source: {servers: [nats://a]}\nclusters:\n  C1: {servers: [nats://b]}\n  C1: {servers: [nats://c]}\n",
            "line 4, column 3: duplicate key 'C1'",
        ),
        ("source: {servers: [nats://a], servers: [nats://b]}\n", "duplicate key 'servers'"),
    ],
    ids=["top", "cluster", "flow"],
)
def test_yaml_duplicate_key(cfg: Cfg, text: str, phrase: str) -> None:
    cfg.expect(text, "", phrase)


@pytest.mark.parametrize(
    "text",
    [
        "? [a, b]\n: c\nsource: {servers: [nats://a]}\n",
        "{a: 1}: c\nsource: {servers: [nats://a]}\n",
        "source:\n  ? [x]\n  : 1\n",
    ],
    ids=["list-key", "mapping-key", "nested"],
)
def test_yaml_unhashable_key(cfg: Cfg, text: str) -> None:
    cfg.expect(text, "", "YAML syntax error", "unhashable key")


@pytest.mark.parametrize(
    "text", ["[" * 5_000, "{a: " * 5_000, "- " * 5_000 + "x"], ids=["list", "map", "block"]
)
def test_yaml_nested_too_deeply(cfg: Cfg, text: str) -> None:
    cfg.expect(text, "", "YAML error: nested too deeply")


def test_yaml_alias_bomb_is_rejected_quickly(cfg: Cfg) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        prev, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    bomb = "\n".join(lines) + "\nsource: {servers: [nats://a]}\nclusters: {C1: {servers: [nats://b]}}\n"
    started = time.perf_counter()
    cfg.expect(bomb, "", "more than 64 YAML aliases")
    assert time.perf_counter() - started < 1.0


def test_a_few_yaml_aliases_are_fine(cfg: Cfg) -> None:
    text = (
        "source: {servers: [nats://a], connect_timeout: &t 5}\n"
        "clusters:\n"
        "  C1: {servers: [nats://b], connect_timeout: *t, auth: &auth {token: tok}}\n"
        "  C2: {servers: [nats://c], connect_timeout: *t, auth: *auth}\n"
    )
    s = cfg.load(text)
    assert [c.connection.connect_timeout for c in s.clusters] == [5.0, 5.0]
    assert s.clusters[1].connection.auth == s.clusters[0].connection.auth


def test_yaml_merge_keys_share_cluster_defaults(cfg: Cfg) -> None:
    text = (
        "source: {servers: [nats://a]}\n"
        "clusters:\n"
        "  C1: &defaults {servers: [nats://b], connect_timeout: 5, ping_interval: 7}\n"
        "  C2:\n"
        "    <<: *defaults\n"
        "    servers: [nats://c]\n"
        "    ping_interval: 9\n"
    )
    c1, c2 = cfg.load(text).clusters
    assert c2.connection.servers == ("nats://c",)
    assert c2.connection.connect_timeout == 5.0
    assert (c1.connection.ping_interval, c2.connection.ping_interval) == (7.0, 9.0)


def test_yaml_merge_keeps_the_duplicate_key_check(cfg: Cfg) -> None:
    text = (
        "source: {servers: [nats://a]}\n"
        "clusters:\n"
        "  C1: &d {servers: [nats://b]}\n"
        "  C2: {<<: *d, servers: [nats://c], servers: [nats://e]}\n"
    )
    cfg.expect(text, "", "duplicate key 'servers'")


def test_file_larger_than_1_mib_is_rejected(cfg: Cfg) -> None:
    body = yaml.safe_dump(minimal()).encode()
    padding = b"#" * (MAX_CONFIG_BYTES + 1 - len(body) - 1) + b"\n"
    assert len(body + padding) == MAX_CONFIG_BYTES + 1
    cfg.expect(body + padding, "", f"file is larger than {MAX_CONFIG_BYTES} bytes")


def test_file_of_exactly_1_mib_is_read(cfg: Cfg) -> None:
    body = yaml.safe_dump(minimal()).encode()
    padding = b"#" * (MAX_CONFIG_BYTES - len(body) - 1) + b"\n"
    assert len(body + padding) == MAX_CONFIG_BYTES == 1024 * 1024
    assert cfg.load(body + padding).clusters[0].name == "C1"


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00s\x00o\x00u\x00r\x00c\x00e",  # UTF-16
        "source: {servers: [nats://a], name: caf\u00e9}\n".encode("latin-1"),
        b"source: {servers: [nats://a]}\n\x80\n",
    ],
    ids=["utf16", "latin1", "stray-byte"],
)
def test_non_utf8_file(cfg: Cfg, content: bytes) -> None:
    cfg.expect(content, "", "file is not valid UTF-8")


def test_utf8_with_a_byte_order_mark_and_unicode_values(cfg: Cfg) -> None:
    text = "\ufeffsource: {servers: [nats://a], name: 'Größe-測定'}\nclusters: {C1: {servers: [nats://b]}}\n"
    assert cfg.load(text.encode("utf-8")).source.connection.name == "Größe-測定"


# --------------------------------------------------------------------------- auth and tls

PASSWORD = "pw-Sup3r-S3cret"
TOKEN = "tok-Sup3r-S3cret"


@pytest.mark.parametrize(
    ("auth", "key", "phrase"),
    [
        ({"password": PASSWORD}, "user", "is required with a password"),
        ({"password_file": "/run/pw"}, "user", "is required with a password"),
        ({"user": "u"}, "password", "is required with user"),
        ({"user": "u", "password": PASSWORD, "password_file": "/run/pw"}, "password_file", "not both"),
        ({"token": TOKEN, "token_file": "/run/tok"}, "token_file", "not both"),
        ({"user": "u", "password": PASSWORD, "token": TOKEN}, "token", "choose one auth method"),
        ({"token": TOKEN, "credentials": "/run/c.creds"}, "credentials", "choose one auth method"),
        ({"nkeys_seed": "/run/s.nk", "credentials": "/run/c.creds"}, "credentials", "choose one auth method"),
        ({"user": "u", "password": ""}, "password", "must not be empty"),
        ({"token": ""}, "token", "must not be empty"),
        ({"user": "u", "password": [PASSWORD]}, "password", "must be a string, got a list"),
        ({"token": {"t": TOKEN}}, "token", "must be a string, got a mapping"),
    ],
)
@pytest.mark.parametrize("where", ["source", "clusters.C1"])
def test_bad_auth(cfg: Cfg, where: str, auth: dict[str, Any], key: str, phrase: str) -> None:
    err = cfg.expect(edited((f"{where}.auth", auth)), f"{where}.auth.{key}", phrase, require_files=False)
    assert_secret_not_in(err, PASSWORD, TOKEN)


def test_empty_auth_block(cfg: Cfg) -> None:
    cfg.expect(edited(("clusters.C1.auth", {})), "clusters.C1.auth", "names no auth method")


def test_null_auth_block_means_no_auth(cfg: Cfg) -> None:
    """Current behaviour: ``auth:`` with nothing after it is no auth, unlike ``auth: {}``."""
    assert cfg.load(edited(("clusters.C1.auth", None))).clusters[0].connection.auth is None


@pytest.mark.parametrize(
    "auth",
    [
        {"user": "u", "password": PASSWORD},
        {"user": "u", "password_file": "/run/pw"},
        {"token": TOKEN},
        {"token_file": "/run/tok"},
        {"nkeys_seed": "/run/s.nk"},
        {"credentials": "/run/c.creds"},
    ],
)
def test_good_auth(cfg: Cfg, auth: dict[str, str]) -> None:
    got = cfg.load(edited(("clusters.C1.auth", auth)), require_files=False).clusters[0].connection.auth
    assert got is not None
    for name, value in auth.items():
        field = getattr(got, name)
        assert (field.reveal() if isinstance(field, Secret) else field) == value


def test_secrets_are_secret_objects(cfg: Cfg) -> None:
    s = cfg.load(
        edited(("source.auth", {"user": "u", "password": PASSWORD}), ("clusters.C1.auth", {"token": TOKEN}))
    )
    assert s.source.connection.auth is not None
    assert isinstance(s.source.connection.auth.password, Secret)
    assert s.source.connection.auth.password.reveal() == PASSWORD
    assert s.clusters[0].connection.auth is not None
    assert isinstance(s.clusters[0].connection.auth.token, Secret)
    assert s.clusters[0].connection.auth.token.reveal() == TOKEN


def test_secret_from_env(cfg: Cfg) -> None:
    s = cfg.load(edited(("clusters.C1.auth", {"token": "${TOKEN}"})), env={"TOKEN": TOKEN})
    assert s.clusters[0].connection.auth is not None
    assert s.clusters[0].connection.auth.token == Secret(TOKEN)


@pytest.mark.parametrize(
    ("tls", "key"),
    [
        ({"cert": "/run/c.pem"}, "key"),
        ({"key": "/run/k.pem"}, "cert"),
        ({"ca": "/run/ca.pem", "cert": "/run/c.pem"}, "key"),
    ],
)
def test_tls_cert_and_key_go_together(cfg: Cfg, tls: dict[str, str], key: str) -> None:
    cfg.expect(
        edited(("clusters.C1.tls", tls)),
        f"clusters.C1.tls.{key}",
        "cert and key go together",
        require_files=False,
    )


def test_tls_settings(cfg: Cfg) -> None:
    tls = {"ca": "/run/ca.pem", "cert": "/run/c.pem", "key": "/run/k.pem"}
    got = cfg.load(edited(("source.tls", tls)), require_files=False).source.connection.tls
    assert got is not None
    assert (got.ca, got.cert, got.key) == ("/run/ca.pem", "/run/c.pem", "/run/k.pem")


# --------------------------------------------------------------------------- referenced files

FILE_KEYS = [
    ("auth", {"user": "u", "password_file": "{f}"}, "password_file"),
    ("auth", {"token_file": "{f}"}, "token_file"),
    ("auth", {"nkeys_seed": "{f}"}, "nkeys_seed"),
    ("auth", {"credentials": "{f}"}, "credentials"),
    ("tls", {"ca": "{f}"}, "ca"),
    ("tls", {"cert": "{f}", "key": "{f}.key"}, "cert"),
]


def _with_file(block: dict[str, str], path: Path) -> dict[str, str]:
    return {k: v.replace("{f}", str(path)) for k, v in block.items()}


@pytest.mark.parametrize(("section", "block", "name"), FILE_KEYS)
def test_missing_file_is_an_error_by_default(
    cfg: Cfg, tmp_path: Path, section: str, block: dict[str, str], name: str
) -> None:
    missing = tmp_path / "secrets" / "missing"
    doc = edited((f"clusters.C1.{section}", _with_file(block, missing)))
    cfg.expect(doc, f"clusters.C1.{section}.{name}", "cannot read file", str(missing))


@pytest.mark.parametrize(("section", "block", "name"), FILE_KEYS)
def test_missing_file_is_listed_without_require_files(
    cfg: Cfg, tmp_path: Path, section: str, block: dict[str, str], name: str
) -> None:
    missing = tmp_path / "secrets" / "missing"
    s = cfg.load(edited((f"clusters.C1.{section}", _with_file(block, missing))), require_files=False)
    assert FileRef(f"clusters.C1.{section}.{name}", str(missing)) in s.missing_files()


def test_present_files_are_not_missing(cfg: Cfg, tmp_path: Path) -> None:
    creds = tmp_path / "c2.creds"
    creds.write_text("creds")
    ca = tmp_path / "ca.pem"
    ca.write_text("ca")
    doc = edited(
        ("clusters.C1.auth", {"credentials": str(creds)}),
        ("clusters.C1.tls", {"ca": str(ca)}),
        ("source.tls", {"ca": str(tmp_path / "absent-ca.pem")}),
    )
    s = cfg.load(doc, require_files=False)
    assert [ref.key for ref in s.file_refs] == [
        "source.tls.ca",
        "clusters.C1.auth.credentials",
        "clusters.C1.tls.ca",
    ]
    assert s.missing_files() == [FileRef("source.tls.ca", str(tmp_path / "absent-ca.pem"))]
    cfg.expect(doc, "source.tls.ca", "cannot read file")
    doc = edited(("source.tls", DELETE), base=doc)
    assert cfg.load(doc).missing_files() == []


# --------------------------------------------------------------------------- source jetstream


def test_source_jetstream_defaults(cfg: Cfg) -> None:
    js = cfg.load(edited(("source.jetstream", {"stream": "ASSETS"}))).source.jetstream
    assert js == JetStreamSourceSettings(
        stream="ASSETS",
        durable="asset-forwarder",
        ack_wait=30.0,
        max_ack_pending=20000,
        max_deliver=-1,
        backoff=(1.0, 2.0, 5.0, 10.0, 30.0),
        deliver_policy="all",
        idle_heartbeat=5.0,
        park_stream="FORWARDER_PARKED",
        park_prefix="forwarder.parked",
    )


def test_source_jetstream_settings(cfg: Cfg) -> None:
    block = {
        "stream": "S",
        "durable": "d",
        "ack_wait": 0.5,
        "max_ack_pending": 10,
        "max_deliver": 3,
        "backoff": [0.5, 2],
        "deliver_policy": "new",
        "idle_heartbeat": 1,
        "park_stream": "",
        "park_prefix": "fwd.park",
    }
    js = cfg.load(edited(("source.jetstream", block))).source.jetstream
    assert js == JetStreamSourceSettings(
        stream="S",
        durable="d",
        ack_wait=0.5,
        max_ack_pending=10,
        max_deliver=3,
        backoff=(0.5, 2.0),
        deliver_policy="new",
        idle_heartbeat=1.0,
        park_stream=None,
        park_prefix="fwd.park",
    )


@pytest.mark.parametrize(
    ("backoff", "index", "phrase"),
    [
        ([1, 0], 1, "must be > 0"),
        ([-2], 0, "must be > 0"),
        ([1, 2, "x"], 2, "must be a number, got a string"),
        ([1, True], 1, "must be a number, got a boolean"),
        ([[1]], 0, "must be a number, got a list"),
        ([1, None], 1, "is required"),
        ([float("inf")], 0, "must be a finite number"),
    ],
)
def test_bad_source_jetstream_backoff_item(cfg: Cfg, backoff: list[Any], index: int, phrase: str) -> None:
    doc = edited(("source.jetstream", {"stream": "S", "backoff": backoff}))
    cfg.expect(doc, f"source.jetstream.backoff[{index}]", phrase)


def test_source_jetstream_backoff_from_env(cfg: Cfg) -> None:
    doc = edited(("source.jetstream", {"stream": "S", "backoff": ["${FIRST}", 4]}))
    assert cfg.load(doc, env={"FIRST": "0.5"}).source.jetstream == JetStreamSourceSettings(
        stream="S", durable="asset-forwarder", backoff=(0.5, 4.0)
    )


@pytest.mark.parametrize(
    ("block", "key", "phrase"),
    [
        ({}, "source.jetstream.stream", "is required"),
        ({"stream": "a.b"}, "source.jetstream.stream", "is not a valid JetStream name"),
        ({"stream": "S", "durable": "a b"}, "source.jetstream.durable", "is not a valid JetStream name"),
        ({"stream": "S", "max_deliver": 0}, "source.jetstream.max_deliver", "must be -1 (forever) or >= 1"),
        ({"stream": "S", "max_deliver": -2}, "source.jetstream.max_deliver", "must be >= -1"),
        ({"stream": "S", "ack_wait": 0}, "source.jetstream.ack_wait", "must be > 0"),
        ({"stream": "S", "max_ack_pending": 0}, "source.jetstream.max_ack_pending", "must be >= 1"),
        ({"stream": "S", "deliver_policy": "first"}, "source.jetstream.deliver_policy", "must be one of"),
        ({"stream": "S", "backoff": []}, "source.jetstream.backoff", "must be a non-empty list of seconds"),
        ({"stream": "S", "backoff": 5}, "source.jetstream.backoff", "must be a non-empty list of seconds"),
        (
            {"stream": "S", "backoff": "1,2"},
            "source.jetstream.backoff",
            "must be a non-empty list of seconds",
        ),
    ],
)
def test_bad_source_jetstream(cfg: Cfg, block: dict[str, Any], key: str, phrase: str) -> None:
    cfg.expect(edited(("source.jetstream", block)), key, phrase)


# --------------------------------------------------------------------------- secrets and redaction


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://user:pass@host:4222", "nats://***:***@host:4222"),
        ("tls://user:pass@host", "tls://***:***@host"),
        ("nats://user@host:4222", "nats://***@host:4222"),
        ("nats://tok3n@host", "nats://***@host"),
        ("nats://user:p@ss@host:4222", "nats://***:***@host:4222"),  # an unencoded '@' in the password
        ("nats://host:4222", "nats://host:4222"),
        ("nats://host", "nats://host"),
        ("tls://[::1]:4222", "tls://[::1]:4222"),
        ("host:4222", "host:4222"),
        ("", ""),
        # A password with an unencoded '/', '?' or '#' is still userinfo, not a path.
        ("nats://user:pa/ss@host:4222", "nats://***:***@host:4222"),
        ("nats://user:pa?ss@host", "nats://***:***@host"),
        ("nats://user:pa#ss@host", "nats://***:***@host"),
        # Without a scheme (a typo in the config), userinfo is redacted too.
        ("user:pass@host:4222", "***:***@host:4222"),
        ("user@host", "***@host"),
        ("u:a://b@host", "***:***@host"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_secret_never_shows_its_value() -> None:
    secret = Secret(PASSWORD)
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret!s}",
        "%s" % secret,  # noqa: UP031
        format(secret),
    ]
    for text in shown:
        assert PASSWORD not in text
        assert "***" in text
    assert PASSWORD not in repr([secret, {"k": secret}])
    assert secret.reveal() == PASSWORD
    assert secret == Secret(PASSWORD)


def test_settings_repr_shows_no_auth_secret(cfg: Cfg) -> None:
    doc = edited(
        ("source.auth", {"user": "u", "password": PASSWORD}),
        ("clusters.C1.auth", {"token": TOKEN}),
        ("clusters.C2", {"servers": ["nats://c2"], "auth": {"user": "u", "password": "${PW}"}}),
    )
    s = cfg.load(doc, env={"PW": "env-" + PASSWORD})
    for text in (repr(s), str(s), f"{s}"):
        assert PASSWORD not in text
        assert TOKEN not in text


def test_settings_repr_shows_no_password_from_a_server_url(cfg: Cfg) -> None:
    doc = edited(
        ("source.servers", [f"nats://user:{URL_PASSWORD}@src:4222"]),
        ("clusters.C1.servers", [f"tls://{TOKEN}@c1:4222", "nats://c1-b:4222"]),
        ("clusters.C2", {"servers": ["${C2_URL}"]}),
    )
    s = cfg.load(doc, env={"C2_URL": "nats://u:env-" + PASSWORD + "@c2"})
    assert s.source.connection.servers == (f"nats://user:{URL_PASSWORD}@src:4222",), (
        "connect with the real URL"
    )
    for text in (repr(s), str(s), repr(s.clusters), repr(s.source.connection)):
        assert URL_PASSWORD not in text
        assert TOKEN not in text
        assert PASSWORD not in text
    assert "nats://***:***@src:4222" in repr(s)
    assert "tls://***@c1:4222" in repr(s)
    assert "nats://c1-b:4222" in repr(s)


def test_connection_repr_still_shows_every_field(cfg: Cfg) -> None:
    connection = cfg.load(edited(("source.connect_timeout", 7))).source.connection
    text = repr(connection)
    assert text.startswith(
        "ConnectionSettings(servers=('nats://127.0.0.1:4222',), name='asset-forwarder-source'"
    )
    for f in dataclasses.fields(connection):
        assert f"{f.name}=" in text
    assert "connect_timeout=7.0" in text


URL_PASSWORD = "Hunt3r-Pw"


@pytest.mark.parametrize(
    "url",
    [
        f"user:{URL_PASSWORD}@host:4222",  # no scheme
        f"http://user:{URL_PASSWORD}@host:4222",
        f"nats://user:{URL_PASSWORD}@host:abc",
        f"nats://user:{URL_PASSWORD}@host:65536",
        f"nats://user:{URL_PASSWORD}@host:0",
        f"nats://user:{URL_PASSWORD}@",
        f"nats://user:{URL_PASSWORD}@host/path",
        f"nats://user:{URL_PASSWORD}@[::1",
        f"nats://{URL_PASSWORD}@host:abc",  # a token
        # unencoded '/', '?', '#' in the password: urllib splits the URL inside it
        f"nats://user:{URL_PASSWORD}/x@host:4222",
        f"nats://user:x/{URL_PASSWORD}@host:4222",
        f"nats://user:{URL_PASSWORD}?x@host:4222",
        f"nats://user:{URL_PASSWORD}#x@host:4222",
    ],
)
@pytest.mark.parametrize("where", ["source", "clusters.C1"])
def test_bad_server_url_never_shows_the_password(cfg: Cfg, url: str, where: str) -> None:
    err = cfg.expect(edited((f"{where}.servers", [url])), f"{where}.servers[0]", "bad server URL")
    assert_secret_not_in(err, URL_PASSWORD)


def test_duplicate_server_never_shows_the_password(cfg: Cfg) -> None:
    url = f"nats://user:{URL_PASSWORD}@host:4222"
    err = cfg.expect(
        edited(("clusters.C1.servers", [url, url])), "clusters.C1.servers[1]", "duplicate server"
    )
    assert_secret_not_in(err, URL_PASSWORD)
    doc = edited(("clusters.C2", {"servers": [url]}), ("clusters.C1.servers", [url.replace("host", "HOST")]))
    err = cfg.expect(doc, "clusters.C2.servers[0]", "is also in cluster C1")
    assert_secret_not_in(err, URL_PASSWORD)


def test_env_cluster_error_never_shows_the_password(cfg: Cfg) -> None:
    err = cfg.error(edited(("clusters", DELETE)), env={"NATS_CLUSTER_X": f"http://u:{URL_PASSWORD}@x"})
    assert_error(err, "environment NATS_CLUSTER_X", "X.servers[0]", "bad server URL")
    assert_secret_not_in(err, URL_PASSWORD)


@pytest.mark.parametrize(
    ("edit", "shown"),
    [
        (("clusters", {"a\nb": {"servers": ["nats://c"]}}), "clusters.a\\nb: cluster names"),
        (("clusters.C1.x\ny", 1), "clusters.C1.x\\ny: unknown key"),
        (("clusters.C1.x\u2028y", 1), "clusters.C1.x\\u2028y: unknown key"),
        (
            ("clusters.C1.servers", ["nats://a\r\nb"]),
            "clusters.C1.servers[0]: bad server URL nats://a\\r\\nb",
        ),
        (("log.level", "info\n"), "log.level: must be one of"),
    ],
    ids=["cluster-name", "unknown-key", "line-separator", "url", "choice"],
)
def test_control_characters_never_break_the_one_line(cfg: Cfg, edit: tuple[str, Any], shown: str) -> None:
    err = cfg.error(edited(edit))
    text = str(err)
    assert len(text.splitlines()) == 1, repr(text)
    assert text.isprintable(), repr(text)
    assert text.startswith(f"{cfg.path}: ")
    assert shown in text
