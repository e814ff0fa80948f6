"""The ``forwarder`` command line, run as a real process: version, check-config, route, run's config errors.

Nothing here connects to NATS: ``run`` is only driven into its config errors, which it must
report (one line, exit 2) before it tries any connection.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from forwarder import __version__
from forwarder.config import load_config
from forwarder.hashring import build_ring

CLUSTERS = {"C1": 1, "C2": 2, "C3": 1}


def forwarder(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """``python -m forwarder ARGS`` with a clean environment (no FORWARDER_CONFIG, no NATS_CLUSTER_*)."""
    base = {
        k: v for k, v in os.environ.items() if k != "FORWARDER_CONFIG" and not k.startswith("NATS_CLUSTER_")
    }
    return subprocess.run(
        [sys.executable, "-m", "forwarder", *args],
        input=stdin,
        capture_output=True,
        env={**base, **(env or {})},
        timeout=timeout,
        check=False,
    )


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def config_doc(**clusters_extra: Any) -> dict[str, Any]:
    return {
        "source": {"servers": ["nats://127.0.0.1:4222"], "subject": "assets.>"},
        "routing": {"key": {"subject_token": 1}},
        "clusters": {
            name: {
                "servers": [f"nats://127.0.0.1:{4300 + i}"],
                "weight": weight,
                **clusters_extra.get(name, {}),
            }
            for i, (name, weight) in enumerate(CLUSTERS.items())
        },
        "http": {"host": "127.0.0.1", "port": 0},
    }


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write(tmp_path / "forwarder.yaml", config_doc())


@pytest.fixture
def ring() -> Any:
    return build_ring("rendezvous", CLUSTERS)


def lines(data: bytes) -> list[str]:
    return data.decode().splitlines()


# --------------------------------------------------------------------------- version, usage


def test_version() -> None:
    result = forwarder("--version")
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"asset-forwarder {__version__}"


@pytest.mark.parametrize("command", ["run", "check-config", "route"])
def test_no_config_and_no_forwarder_config_is_a_usage_error(command: str) -> None:
    result = forwarder(command, "some-asset") if command == "route" else forwarder(command)
    assert result.returncode == 2
    assert lines(result.stderr) == ["forwarder: no config file: pass -c FILE or set FORWARDER_CONFIG"]
    assert result.stdout == b""


def test_an_unknown_option_is_one_line_and_exit_2() -> None:
    result = forwarder("check-config", "--no-such-option")
    assert result.returncode == 2
    assert len(lines(result.stderr)) == 1
    assert "--no-such-option" in result.stderr.decode()


# --------------------------------------------------------------------------- check-config


def test_check_config_ok(config: Path) -> None:
    result = forwarder("check-config", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [
        f"{config}: OK: source assets.> (core), 3 clusters (C1, C2, C3), algorithm rendezvous"
    ]
    assert result.stderr == b""


def test_check_config_notes_files_that_are_missing_here(tmp_path: Path) -> None:
    creds = tmp_path / "secrets" / "c2.creds"  # mounted only in the pod
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked here, only that it is readable")
    doc = config_doc(C2={"auth": {"credentials": str(creds)}, "tls": {"ca": str(ca)}})
    path = write(tmp_path / "forwarder.yaml", doc)
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    out = lines(result.stdout)
    assert out[0].startswith(f"{path}: OK: ")
    assert out[1:] == [
        f"note: clusters.C2.auth.credentials: {creds} is not readable here "
        "(it must exist where the forwarder runs)"
    ]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d["clusters"]["C1"].update(weight=0), "clusters.C1.weight"),
        (lambda d: d["routing"]["key"].update(subject_token="one"), "routing.key.subject_token"),
        (lambda d: d["source"].update(servers=["http://x:1"]), "source.servers"),
        (lambda d: d["clusters"]["C2"].update(bogus=1), "clusters.C2.bogus"),
        (lambda d: d["routing"].update(subject="{nope}"), "routing.subject"),
    ],
)
def test_an_invalid_config_is_one_line_naming_file_and_key(tmp_path: Path, edit: Any, key: str) -> None:
    doc = config_doc()
    edit(doc)
    path = write(tmp_path / "bad.yaml", doc)
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == b""
    (line,) = lines(result.stderr)
    assert line.startswith(f"forwarder: {path}: {key}")
    assert "Traceback" not in result.stderr.decode()


def test_a_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("source: {servers: [\n")
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 2
    (line,) = lines(result.stderr)
    assert line.startswith(f"forwarder: {path}: YAML syntax error")


def test_a_config_file_that_does_not_exist_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    result = forwarder("check-config", "-c", str(path))
    assert result.returncode == 2
    (line,) = lines(result.stderr)
    assert line.startswith(f"forwarder: {path}: cannot read the file")


# --------------------------------------------------------------------------- run's config errors


def test_run_stops_on_a_missing_credentials_file_naming_the_key(tmp_path: Path) -> None:
    creds = tmp_path / "c2.creds"
    path = write(tmp_path / "forwarder.yaml", config_doc(C2={"auth": {"credentials": str(creds)}}))
    result = forwarder("run", "-c", str(path), timeout=30)
    assert result.returncode == 2
    assert result.stdout == b""
    assert lines(result.stderr) == [
        f"forwarder: {path}: clusters.C2.auth.credentials: cannot read file {str(creds)!r}"
    ]


def test_forwarder_config_is_honoured(config: Path, tmp_path: Path) -> None:
    env = {"FORWARDER_CONFIG": str(config)}
    result = forwarder("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout)[0].startswith(f"{config}: OK: ")
    result = forwarder("route", "pump-7", env=env)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [f"pump-7\t{build_ring('rendezvous', CLUSTERS).cluster_for('pump-7')}"]
    # run reads it too: an invalid file named only by the variable is reported by its path.
    bad = write(tmp_path / "bad.yaml", {**config_doc(), "bogus_section": 1})
    result = forwarder("run", env={"FORWARDER_CONFIG": str(bad)}, timeout=30)
    assert result.returncode == 2
    (line,) = lines(result.stderr)
    assert line.startswith(f"forwarder: {bad}: bogus_section")


def test_c_wins_over_forwarder_config(config: Path, tmp_path: Path) -> None:
    result = forwarder("check-config", "-c", str(config), env={"FORWARDER_CONFIG": str(tmp_path / "nope")})
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- route


def test_route_prints_asset_tab_cluster(config: Path, ring: Any) -> None:
    assets = ["a", "b", "c", "pump-7", "Pumpe-ä"]
    result = forwarder("route", "-c", str(config), *assets)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [f"{a}\t{ring.cluster_for(a)}" for a in assets]
    assert result.stderr == b""


def test_route_without_assets_is_a_usage_error(config: Path) -> None:
    result = forwarder("route", "-c", str(config))
    assert result.returncode == 2
    assert len(lines(result.stderr)) == 1


def test_route_follows_the_configured_algorithm(tmp_path: Path) -> None:
    doc = config_doc()
    doc["routing"]["hashing"] = {"algorithm": "openfactory", "replicas": 64}
    for cluster in doc["clusters"].values():
        del cluster["weight"]
    path = write(tmp_path / "of.yaml", doc)
    ring = build_ring("openfactory", dict.fromkeys(CLUSTERS, 1.0), replicas=64)
    assets = [f"asset-{i}" for i in range(50)]
    result = forwarder("route", "-c", str(path), *assets)
    assert result.returncode == 0, result.stderr
    assert lines(result.stdout) == [f"{a}\t{ring.cluster_for(a)}" for a in assets]


def test_route_stdin_on_100k_ids_equals_the_ring(config: Path, ring: Any) -> None:
    rng = random.Random(42)
    ids = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(90_000)]
    ids += [f"asset-{i % 5000}" for i in range(10_000)]  # repeats, served from the cache
    result = forwarder("route", "-c", str(config), "--stdin", stdin="\n".join(ids).encode())
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    out = lines(result.stdout)
    assert len(out) == len(ids)
    expected = [f"{a}\t{ring.cluster_for(a)}" for a in ids]
    assert out == expected
    # The same answers as `route ASSET...` (a sample: one process per call is slow).
    sample = ids[:: len(ids) // 20]
    direct = forwarder("route", "-c", str(config), *sample)
    assert lines(direct.stdout) == [line for line in expected[:: len(ids) // 20]]


def test_route_stdin_handles_crlf_and_blank_lines(config: Path, ring: Any) -> None:
    data = b"a\r\nb\n\n\r\nc\r\n\r\n\nd"  # and no newline after the last id
    result = forwarder("route", "-c", str(config), "--stdin", stdin=data)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert lines(result.stdout) == [f"{a}\t{ring.cluster_for(a)}" for a in ["a", "b", "c", "d"]]
    assert b"\r" not in result.stdout


def test_route_stdin_skips_lines_that_are_not_utf8(config: Path, ring: Any) -> None:
    data = b"good-1\n\xff\xfebad\ngood-2\r\nbad-\xc3\x28\ngood-3\n"
    result = forwarder("route", "-c", str(config), "--stdin", stdin=data)
    assert result.returncode == 1
    assert lines(result.stdout) == [f"{a}\t{ring.cluster_for(a)}" for a in ["good-1", "good-2", "good-3"]]
    assert lines(result.stderr) == [
        "forwarder: line 2: asset id is not valid UTF-8, skipped",
        "forwarder: line 4: asset id is not valid UTF-8, skipped",
    ]


def test_route_stdin_agrees_with_the_service_routing(config: Path) -> None:
    # What `route` says is what the running service would do with the same config.
    from forwarder.router import Router

    settings = load_config(config, env={})
    router = Router(settings.routing, build_ring("rendezvous", CLUSTERS), {n: n for n in CLUSTERS})
    ids = [f"machine-{i}" for i in range(500)]
    result = forwarder("route", "-c", str(config), "--stdin", stdin="\n".join(ids).encode())
    got = dict(line.split("\t") for line in lines(result.stdout))
    for asset in ids:
        route = router.route(f"assets.{asset}.temp", None, b"")
        assert isinstance(route, tuple)
        assert got[asset] == route[0]


def test_route_an_asset_argument_that_is_not_utf8_is_skipped_and_reported(config: Path, ring: Any) -> None:
    cmd: list[str | bytes] = [
        sys.executable,
        "-m",
        "forwarder",
        "route",
        "-c",
        str(config),
        "a",
        b"p\xff",
        "b",
    ]
    result = subprocess.run(cmd, capture_output=True, timeout=60, check=False)
    assert result.returncode == 1
    assert lines(result.stdout) == [f"{a}\t{ring.cluster_for(a)}" for a in ["a", "b"]]
    assert lines(result.stderr) == ["forwarder: p\\xff: asset id is not valid UTF-8, skipped"]


def test_route_stdin_into_a_pipe_closed_early_stops_quietly(config: Path, tmp_path: Path) -> None:
    # `forwarder route --stdin < ids | head -1`: the reader goes away long before the end.
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"asset-{i}\n" for i in range(300_000)))  # far beyond a pipe's buffer
    with ids.open("rb") as stdin:
        proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "route", "-c", str(config), "--stdin"],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        assert proc.stdout.readline().startswith(b"asset-0\t")
        proc.stdout.close()
        stderr = proc.stderr.read()
        assert proc.wait(timeout=60) == 1
    assert b"Traceback" not in stderr
    assert stderr == b""
