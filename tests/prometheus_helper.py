"""A real Prometheus server for tests, and queries through its HTTP API.

The binaries come from ``.tools/prometheus/`` (``scripts/install-prometheus.sh`` puts
them there from the Debian package ``prometheus``; :func:`prometheus_binaries` runs it
when they are missing). Typical use, in a test that scrapes a live forwarder::

    from tests.prometheus_helper import prometheus_factory, wait_for_value  # noqa: F401

    def test_forwarded_count(prometheus_factory, forwarder):
        prom = prometheus_factory([f"127.0.0.1:{forwarder.http_port}"])
        wait_for_value(prom.api_url, "sum(forwarder_messages_forwarded_total)", lambda v: v == 1000)

or, without the fixture, ``with running_prometheus([...], tmp_path) as prom: ...``.

Each server listens on a free loopback port, scrapes its targets every second (job
``asset-forwarder`` unless told otherwise), keeps its storage in the given directory and
is stopped by its process id. Where the binaries cannot be installed (no apt, no
network), the fixture skips with the install script's reason, unless
``REQUIRE_PROMETHEUS=1`` is set (CI), where it fails instead.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS_DIR = REPO_ROOT / ".tools" / "prometheus"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-prometheus.sh"
DEFAULT_JOB = "asset-forwarder"


class PrometheusUnavailable(RuntimeError):
    """promtool/prometheus are missing and the install script could not provide them."""


class QueryError(RuntimeError):
    """The HTTP API refused the query or answered something unusable."""


class NoData(QueryError):
    """The query returned an empty vector (e.g. the series has not been scraped yet)."""


def prometheus_binaries(install: bool = True) -> tuple[Path, Path]:
    """Paths of ``promtool`` and ``prometheus``; runs the install script if one is missing."""
    promtool, prometheus = TOOLS_DIR / "promtool", TOOLS_DIR / "prometheus"
    if install and not (os.access(promtool, os.X_OK) and os.access(prometheus, os.X_OK)):
        proc = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
        )
        if proc.returncode != 0:
            raise PrometheusUnavailable(
                f"{INSTALL_SCRIPT.relative_to(REPO_ROOT)} failed (exit {proc.returncode}): "
                + " | ".join(line for line in proc.stderr.splitlines() if line.strip())
            )
    for binary in (promtool, prometheus):
        if not os.access(binary, os.X_OK):
            raise PrometheusUnavailable(f"{binary} is missing; run scripts/install-prometheus.sh")
    return promtool, prometheus


def require_prometheus_binaries() -> tuple[Path, Path]:
    """:func:`prometheus_binaries`, skipping the test where they cannot be installed."""
    try:
        return prometheus_binaries()
    except PrometheusUnavailable as exc:
        if os.environ.get("REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"REQUIRE_PROMETHEUS=1 but Prometheus is unavailable: {exc}")
        pytest.skip(f"Prometheus cannot be installed here: {exc}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(
    path: Path,
    targets: Sequence[str],
    *,
    job: str = DEFAULT_JOB,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
) -> Path:
    """A prometheus.yml scraping ``targets`` (``host:port``) every ``scrape_interval``."""
    doc = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_timeout": scrape_interval,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class PrometheusServer:
    """A running ``prometheus`` process; :meth:`stop` ends it by pid."""

    api_url: str
    port: int
    pid: int
    workdir: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid, SIGKILL after ``timeout``; reaps the process."""
        if self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout)


def _http_get(url: str, timeout: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def start_prometheus(
    targets: Sequence[str],
    workdir: Path,
    *,
    job: str = DEFAULT_JOB,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    port: int | None = None,
    startup_timeout: float = 30.0,
) -> PrometheusServer:
    """Start Prometheus on 127.0.0.1 (``port`` or a free one) and wait until it is ready.

    Storage, config and log live in ``workdir``. Raises :class:`RuntimeError` with the
    log's tail if it exits or is not ready within ``startup_timeout`` seconds; with an
    automatic port, a port taken in the meantime is retried with another one.
    """
    _, prometheus = prometheus_binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir / "prometheus.yml", targets, job=job, scrape_interval=scrape_interval, rule_files=rule_files
    )
    attempts = 1 if port is not None else 3
    error = ""
    for _ in range(attempts):
        listen = port if port is not None else free_port()
        with (workdir / "prometheus.log").open("ab") as log:
            process = subprocess.Popen(
                [
                    str(prometheus),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{listen}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=info",
                ],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server = PrometheusServer(
            api_url=f"http://127.0.0.1:{listen}",
            port=listen,
            pid=process.pid,
            workdir=workdir,
            process=process,
        )
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline and server.running():
            try:
                status, _ = _http_get(f"{server.api_url}/-/ready", timeout=1.0)
                if status == 200:
                    return server
            except OSError:
                pass
            time.sleep(0.05)
        server.stop()
        error = f"prometheus on port {listen} did not become ready:\n{server.log_tail()}"
        if "address already in use" not in error:
            break
    raise RuntimeError(error)


@contextmanager
def running_prometheus(
    targets: Sequence[str],
    workdir: Path,
    *,
    job: str = DEFAULT_JOB,
    scrape_interval: str = "1s",
    rule_files: Sequence[Path] = (),
    port: int | None = None,
) -> Iterator[PrometheusServer]:
    """:func:`start_prometheus` as a context manager that stops the server on exit."""
    server = start_prometheus(
        targets, workdir, job=job, scrape_interval=scrape_interval, rule_files=rule_files, port=port
    )
    try:
        yield server
    finally:
        server.stop()


def query(api_url: str, promql: str, timeout: float = 5.0) -> float:
    """The single value of an instant query through ``/api/v1/query``.

    Raises :class:`NoData` for an empty result, :class:`QueryError` for an error answer
    or a result with more than one series (aggregate it, e.g. ``sum(...)``).
    """
    url = f"{api_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    status, body = _http_get(url, timeout)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise QueryError(f"{promql!r}: HTTP {status}, not JSON: {body[:200]!r}") from exc
    if doc.get("status") != "success":
        raise QueryError(f"{promql!r}: HTTP {status}, {doc.get('errorType')}: {doc.get('error')}")
    data = doc["data"]
    if data["resultType"] == "scalar":
        return float(data["result"][1])
    if data["resultType"] != "vector":
        raise QueryError(f"{promql!r}: a {data['resultType']} result, expected an instant vector or scalar")
    result = data["result"]
    if not result:
        raise NoData(f"{promql!r}: empty result")
    if len(result) > 1:
        raise QueryError(f"{promql!r}: {len(result)} series, expected one: {[r['metric'] for r in result]}")
    return float(result[0]["value"][1])


def wait_for_value(
    api_url: str,
    promql: str,
    predicate: Callable[[float], bool] = lambda v: not math.isnan(v),
    timeout: float = 30.0,
    interval: float = 0.2,
) -> float:
    """Poll :func:`query` until ``predicate(value)`` holds; return that value.

    Empty results count as "not yet". Raises :class:`TimeoutError` naming the last value
    or error after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            value = query(api_url, promql)
            if predicate(value):
                return value
            last = f"last value {value}"
        except NoData as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{promql!r} did not reach the expected value within {timeout}s ({last})")
        time.sleep(interval)


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    """Start Prometheus servers scraping given ``host:port`` targets; stopped at teardown.

    ``prometheus_factory(targets, job=..., scrape_interval=..., rule_files=..., port=...)``
    returns a :class:`PrometheusServer` (see :func:`start_prometheus`). Skips where
    Prometheus cannot be installed (fails instead with ``REQUIRE_PROMETHEUS=1``).
    """
    require_prometheus_binaries()
    servers: list[PrometheusServer] = []

    def factory(
        targets: Sequence[str],
        *,
        job: str = DEFAULT_JOB,
        scrape_interval: str = "1s",
        rule_files: Sequence[Path] = (),
        port: int | None = None,
    ) -> PrometheusServer:
        server = start_prometheus(
            targets,
            tmp_path / f"prometheus-{len(servers)}",
            job=job,
            scrape_interval=scrape_interval,
            rule_files=rule_files,
            port=port,
        )
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()
