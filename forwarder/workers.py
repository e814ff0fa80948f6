"""``workers: N`` (or ``forwarder run --workers N``): N forwarder processes on one host.

One Python process forwards on one core; this is how a host uses the others. The
supervisor (this module) starts N workers, each an ordinary ``forwarder run`` with the
same config, so they share the source's queue group (core) or durable consumer and its
deliver group (JetStream) exactly as replicas on different hosts do: NATS spreads the
messages over them.

What an operator sees:

- **One HTTP port**, served by the supervisor. Each worker serves HTTP on a private
  unix socket in a directory only the supervisor's user can read, and the supervisor
  asks the workers at request time:
  - ``/metrics``: every worker's metrics, each sample labelled ``worker="1"`` ..
    ``worker="N"`` (not summed: a restarted worker's counters start again at zero,
    and Prometheus handles that per series; a sum would look like a counter going
    backwards). ``sum by (...)`` in the rules and dashboards adds the workers up.
    The supervisor adds ``forwarder_workers``, ``forwarder_worker_up{worker}`` and
    ``forwarder_worker_restarts_total{worker}``, and its own ``process_*`` metrics
    under ``worker="supervisor"``.
  - ``/readyz``: 200 only when every worker answers ready; otherwise 503 naming each
    worker that is not (not running, restarting, or its own reasons).
  - ``/healthz``: 200 while the supervisor runs, unless a running worker reports its
    event loop stalled (or does not answer in time): 503, so the service is restarted
    as a single forwarder would be. ``/route/{asset}``: a running worker's answer (the
    routes of its live topology; the config's ring while none runs). ``/clusters``:
    ``{"workers": {"1": <that worker's /clusters>, ...}}``.
- **A crashed worker is restarted** with an exponential back-off (0.5 s doubling to
  30 s, back to 0.5 s once a worker stayed up for 30 s); each exit and restart is logged.
- **SIGTERM (or SIGINT) reaches all workers**: the supervisor forwards it, every worker
  finishes its in-flight messages and drains, and the supervisor exits 0 when every
  worker exited 0 (1 otherwise; workers still running after the shutdown timeout plus
  a margin are killed). A second signal is forwarded too (the workers' forced exit).
  Workers run in their own process group, so a terminal's Ctrl-C reaches them only
  through the supervisor, once; if the supervisor is killed outright, the kernel sends
  each worker SIGTERM (Linux parent-death signal).
- Log lines of a worker carry ``worker=<i>``; its NATS connection names end in ``-w<i>``.

A worker re-reads the config file when it is (re)started: change the file, restart
the whole service.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from .childproc import die_with_parent
from .config import ConnectionSettings, Settings, redact_url
from .hashring import CachedRing, build_ring
from .http import HttpServer, Response, _json
from .logs import get_logger
from .metrics import CONTENT_TYPE

WORKER_ENV = "FORWARDER_WORKER"  # the worker's index, 1..N
WORKER_HTTP_ENV = "FORWARDER_WORKER_HTTP"  # the unix socket the worker serves HTTP on
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a worker up this long resets its back-off
POLL_INTERVAL = 0.1
WORKER_HTTP_TIMEOUT = 2.0
STOP_MARGIN = 5.0  # beyond the shutdown timeout, before workers are killed


# --------------------------------------------------------------------------- the worker side


@dataclass(frozen=True)
class WorkerIdentity:
    index: int
    http_socket: str

    def apply(self, settings: Settings) -> Settings:
        """The worker's settings: connection names tagged ``-w<index>`` (visible in the servers' connz)."""

        def tag(conn: ConnectionSettings) -> ConnectionSettings:
            return dataclasses.replace(conn, name=f"{conn.name}-w{self.index}")

        source = dataclasses.replace(settings.source, connection=tag(settings.source.connection))
        clusters = tuple(dataclasses.replace(c, connection=tag(c.connection)) for c in settings.clusters)
        return dataclasses.replace(settings, source=source, clusters=clusters)


def worker_identity(env: Mapping[str, str] = os.environ) -> WorkerIdentity | None:
    """Set when this process was started by the supervisor."""
    index, path = env.get(WORKER_ENV), env.get(WORKER_HTTP_ENV)
    if not index or not path:
        return None
    return WorkerIdentity(int(index), path)


# --------------------------------------------------------------------------- process set-up


# --------------------------------------------------------------------------- talking to a worker


async def worker_get(path: str, socket_path: str, timeout: float = WORKER_HTTP_TIMEOUT) -> tuple[int, bytes]:
    """GET ``path`` from a worker's HTTP unix socket: (status, body)."""

    async def get() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise ConnectionError("not an HTTP answer")
        return int(parts[1]), body

    return await asyncio.wait_for(get(), timeout)


def merge_metrics(bodies: Mapping[str, str]) -> list[Metric]:
    """Every worker's metric families, one family each, with a ``worker`` label on every sample."""
    families: dict[str, Metric] = {}
    for worker, text in bodies.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for s in family.samples:
                merged.add_sample(s.name, {"worker": worker, **s.labels}, s.value, s.timestamp, s.exemplar)
    return list(families.values())


class _Families:
    """A collector that yields what ``collect`` returns at the time of the scrape."""

    def __init__(self, collect: Callable[[], list[Metric]]) -> None:
        self.collect = collect

    def describe(self) -> list[Metric]:
        return []


# --------------------------------------------------------------------------- the supervisor


@dataclass
class Worker:
    index: int
    socket: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None  # when a crashed worker is due to start again
    last_exit: int | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def label(self) -> str:
        return str(self.index)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class Supervisor:
    """Runs ``count`` workers of ``config`` and serves the shared HTTP port."""

    def __init__(self, settings: Settings, config: str, count: int) -> None:
        self.settings = settings
        self.config = os.path.abspath(config)
        self.log = get_logger(component="supervisor")
        self.should_exit = False
        self._signals = 0
        self._runtime = tempfile.mkdtemp(prefix="forwarder-workers-")  # mode 0700
        self.workers = [
            Worker(i, os.path.join(self._runtime, f"worker-{i}.sock")) for i in range(1, count + 1)
        ]
        ring = build_ring(
            settings.routing.hashing.algorithm,
            {c.name: c.weight for c in settings.clusters},
            replicas=settings.routing.hashing.replicas,
        )
        self._ring = CachedRing(ring, 4096)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Families(self._own_metrics))
        self._process = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self._process)
        self.http = SupervisorHttp(settings.http.host, settings.http.port, self)
        self._wakeup: asyncio.Event | None = None

    # ---- lifecycle

    def run(self) -> int:
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            return asyncio.run(self.serve())
        return uvloop.run(self.serve())

    async def serve(self) -> int:
        self._wakeup = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)
        try:
            try:
                await self.http.start()
            except OSError as exc:
                self.log.error("startup_failed", error=str(exc))
                return 1
            self.log.info("supervisor_started", workers=len(self.workers), http_port=self.http.port)
            for worker in self.workers:
                self._spawn(worker)
            while not self.should_exit:
                self._reap_and_restart()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), POLL_INTERVAL)
            return await self._stop_all()
        finally:
            for worker in self.workers:  # whatever happened above: no worker outlives us
                if worker.running:
                    assert worker.proc is not None
                    worker.proc.kill()
                    worker.proc.wait()
            await self.http.close()
            shutil.rmtree(self._runtime, ignore_errors=True)

    def handle_exit(self, sig: int) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            self.log.info("shutdown_requested", signal=name, workers=len(self.workers))
        else:  # a second signal: the workers' forced exit
            self.log.warning("forced_exit", signal=name)
            self._signal_workers(signal.SIGTERM)
        self.should_exit = True
        if self._wakeup is not None:
            self._wakeup.set()

    def _spawn(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.socket)  # a crashed worker's socket file
        env = {**os.environ, WORKER_ENV: worker.label, WORKER_HTTP_ENV: worker.socket}
        worker.proc = subprocess.Popen(
            [sys.executable, "-m", "forwarder", "run", "-c", self.config],
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches it through us only
            preexec_fn=die_with_parent(signal.SIGTERM),  # a graceful drain
        )
        worker.started_at = time.monotonic()
        worker.restart_at = None
        self.log.info("worker_started", worker=worker.index, pid=worker.proc.pid)

    def _reap_and_restart(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.poll() is not None:
                code = proc.returncode
                uptime = now - worker.started_at
                worker.proc, worker.last_exit = None, code
                if uptime >= STABLE_AFTER:
                    worker.backoff = BACKOFF_FIRST
                worker.restart_at = now + worker.backoff
                self.log.error(
                    "worker_exited",
                    worker=worker.index,
                    pid=proc.pid,
                    how=describe_exit(code),
                    uptime=round(uptime, 1),
                    restart_in=worker.backoff,
                )
                worker.backoff = min(worker.backoff * 2, BACKOFF_MAX)
            elif worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                worker.restarts += 1
                self._spawn(worker)
                self.log.warning("worker_restarted", worker=worker.index, restarts=worker.restarts)

    def _signal_workers(self, sig: int) -> None:
        for worker in self.workers:
            if worker.running:
                assert worker.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(sig)

    async def _stop_all(self) -> int:
        """SIGTERM to every worker, wait for all (bounded); 0 when every one exited 0."""
        self._signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_timeout + STOP_MARGIN
        codes: dict[int, int | None] = {w.index: None for w in self.workers if w.proc is not None}
        while time.monotonic() < deadline:
            for worker in self.workers:
                if worker.proc is not None and worker.proc.poll() is not None:
                    codes[worker.index] = worker.proc.returncode
            if all(code is not None for code in codes.values()):
                break
            await asyncio.sleep(POLL_INTERVAL)
        for worker in self.workers:
            if worker.running:
                assert worker.proc is not None
                self.log.error(
                    "worker_killed", worker=worker.index, pid=worker.proc.pid, reason="shutdown timeout"
                )
                worker.proc.kill()
                worker.proc.wait()
                codes[worker.index] = worker.proc.returncode
        failed = {i: describe_exit(c) for i, c in codes.items() if c != 0 and c is not None}
        self.log.info("supervisor_stopped", workers=len(self.workers), failed=failed or None)
        return 1 if failed else 0

    # ---- what HTTP shows

    def route(self, asset: str) -> dict[str, Any]:
        name = self._ring.cluster_for(asset)
        servers = self.settings.cluster(name).connection.servers
        return {"asset": asset, "cluster": name, "servers": [redact_url(u) for u in servers]}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Without asking the workers: which are not even running."""
        problems = {f"worker-{w.index}": self._why_not_running(w) for w in self.workers if not w.running}
        if self.should_exit:
            problems["service"] = "shutting down"
        return not problems, {"ready": not problems, **({"not_ready": problems} if problems else {})}

    def _why_not_running(self, worker: Worker) -> str:
        if worker.restart_at is not None:
            last = describe_exit(worker.last_exit) if worker.last_exit is not None else "exited"
            return (
                f"not running ({last}); restarting in {max(0.0, worker.restart_at - time.monotonic()):.1f}s"
            )
        return "not running"

    async def readiness_async(self) -> tuple[bool, dict[str, Any]]:
        _, body = self.readiness()
        problems: dict[str, Any] = dict(body.get("not_ready", {}))

        async def ask(worker: Worker) -> None:
            try:
                status, raw = await worker_get("/readyz", worker.socket)
            except (OSError, TimeoutError, ValueError) as exc:
                problems[f"worker-{worker.index}"] = f"not answering: {type(exc).__name__}"
                return
            if status != 200:
                try:
                    problems[f"worker-{worker.index}"] = json.loads(raw).get("not_ready", "not ready")
                except ValueError:
                    problems[f"worker-{worker.index}"] = "not ready"

        await asyncio.gather(*(ask(w) for w in self.workers if w.running))
        out: dict[str, Any] = {"ready": not problems, "workers": len(self.workers)}
        if problems:
            out["not_ready"] = problems
        return not problems, out

    async def liveness_async(self) -> tuple[bool, dict[str, Any]]:
        """Alive unless a running worker says its event loop stalled (503) or hangs (no answer in
        time): then the whole service is restarted, as a single forwarder would be. A worker
        that is starting or restarting is not a liveness problem: the supervisor handles it."""
        stalled: dict[str, str] = {}

        async def ask(worker: Worker) -> None:
            try:
                status, _ = await worker_get("/healthz", worker.socket)
            except TimeoutError:
                stalled[f"worker-{worker.index}"] = "no answer"
                return
            except (OSError, ValueError):
                return  # not listening yet
            if status != 200:
                stalled[f"worker-{worker.index}"] = f"healthz answered {status}"

        await asyncio.gather(*(ask(w) for w in self.workers if w.running))
        if stalled:
            return False, {"status": "stalled", "workers": stalled}
        return True, {"status": "ok", "workers": len(self.workers)}

    async def ask_any(self, target: str) -> tuple[int, bytes] | None:
        """``target`` answered by the first running worker (the routes of its live topology)."""
        for worker in self.workers:
            if worker.running:
                try:
                    return await worker_get(target, worker.socket)
                except (OSError, TimeoutError, ValueError):
                    continue
        return None

    def clusters_state(self) -> dict[str, Any]:
        return {"workers": {w.label: {"running": w.running} for w in self.workers}}

    async def clusters_async(self) -> dict[str, Any]:
        async def ask(worker: Worker) -> tuple[str, Any]:
            if not worker.running:
                return worker.label, {"error": self._why_not_running(worker)}
            try:
                _, raw = await worker_get("/clusters", worker.socket)
                return worker.label, json.loads(raw)
            except (OSError, TimeoutError, ValueError) as exc:
                return worker.label, {"error": f"not answering: {type(exc).__name__}"}

        return {"workers": dict(await asyncio.gather(*(ask(w) for w in self.workers)))}

    def metrics(self) -> bytes:
        """The supervisor's own metrics (``metrics_async`` adds the workers')."""
        return generate_latest(self._registry)

    async def metrics_async(self) -> bytes:
        async def ask(worker: Worker) -> tuple[str, str] | None:
            if not worker.running:
                return None
            try:
                status, raw = await worker_get("/metrics", worker.socket)
            except (OSError, TimeoutError):
                return None
            return (worker.label, raw.decode("utf-8", "replace")) if status == 200 else None

        answers = [a for a in await asyncio.gather(*(ask(w) for w in self.workers)) if a is not None]
        process = generate_latest(self._process).decode()
        families = merge_metrics({"supervisor": process, **dict(answers)})
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(lambda: [*families, *self._own_metrics()]))
        return generate_latest(registry)

    def _own_metrics(self) -> list[Metric]:
        count = GaugeMetricFamily("forwarder_workers", "Worker processes configured.")
        count.add_metric([], len(self.workers))
        up = GaugeMetricFamily("forwarder_worker_up", "1 while the worker process runs.", labels=["worker"])
        restarts = CounterMetricFamily(
            "forwarder_worker_restarts", "Worker processes restarted after they exited.", labels=["worker"]
        )
        for w in self.workers:
            up.add_metric([w.label], int(w.running))
            restarts.add_metric([w.label], w.restarts)
        return [count, up, restarts]


class SupervisorHttp(HttpServer):
    """The shared port: ``/metrics``, ``/readyz`` and ``/clusters`` ask the workers."""

    def __init__(self, host: str, port: int, supervisor: Supervisor) -> None:
        super().__init__(host, port, supervisor)
        self.supervisor = supervisor

    async def respond_async(self, method: str, target: str) -> Response:
        if method in ("GET", "HEAD"):
            path = target.split("?", 1)[0]
            if path == "/metrics":
                return 200, CONTENT_TYPE, await self.supervisor.metrics_async()
            if path == "/readyz":
                ready, body = await self.supervisor.readiness_async()
                return _json(200 if ready else 503, body)
            if path == "/clusters":
                return _json(200, await self.supervisor.clusters_async())
            if path == "/healthz":
                alive, body = await self.supervisor.liveness_async()
                return _json(200 if alive else 503, body)
            if path.startswith("/route/"):
                answer = await self.supervisor.ask_any(target)
                if answer is not None:
                    return answer[0], "application/json", answer[1]
        return self.respond(method, target)
