"""Wire source, router, pipeline and clusters together and run them.

Shaped like uvicorn's server: ``Server.serve()`` runs startup, the main loop and
shutdown; signal handlers only set flags (the first SIGTERM/SIGINT asks for a
graceful exit, a second one forces it).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import __version__
from .acking import AckingPipeline, DeadLetterLane, ParkLane, UnaccountedAckingPipeline
from .cluster import NatsCluster
from .config import Settings, redact_url
from .hashring import build_ring
from .http import HttpServer
from .logs import flush_rate_limited, get_logger
from .metrics import Metrics
from .pipeline import CorePipeline, DeadLetters, UnaccountedCorePipeline
from .router import Router
from .source import CoreSource, JetStreamSource, UnstampedSourceClient
from .stats import ForwardingStats, NullLatencyHistogram, accounting_enabled

HOUSEKEEPING_INTERVAL = 1.0
STARTUP_CLUSTER_WAIT = 10.0  # how long the source waits for clusters before consuming anyway


class Server:
    def __init__(self, settings: Settings, *, http_socket: str | None = None) -> None:
        """``http_socket``: serve HTTP on this unix socket instead of the configured port (a worker
        under the supervisor of ``workers: N``, which serves the port; see workers.py)."""
        self.settings = settings
        self.log = get_logger()
        self.should_exit = False
        self.force_exit = False
        self.started = asyncio.Event()  # set once consuming; Events bind to a loop only when awaited
        self.stats = ForwardingStats()
        self.accounting = accounting_enabled()  # off only for the benchmark (stats.ACCOUNTING_ENV)
        if not self.accounting:
            self.stats.latency = NullLatencyHistogram()
        self.algorithm: str = settings.routing.hashing.algorithm
        self._clusters = {c.name: NatsCluster(c) for c in settings.clusters}
        ring = build_ring(
            self.algorithm,
            {c.name: c.weight for c in settings.clusters},
            replicas=settings.routing.hashing.replicas,
        )
        self.router: Router[Any]
        self.pipeline: CorePipeline | AckingPipeline
        if settings.source.jetstream is None:
            self._source = CoreSource(settings.source)
            dead_letters = DeadLetters(settings.routing.dead_letter_subject, self._source, self.stats)
            self.router = Router(settings.routing, ring, self._clusters)
            core = CorePipeline if self.accounting else UnaccountedCorePipeline
            self.pipeline = core(self.router.route, dead_letters, self.stats)
        else:
            source = JetStreamSource(settings.source)
            self._source = source
            dead_letters = DeadLetters(settings.routing.dead_letter_subject, source, self.stats)
            dead = DeadLetterLane(dead_letters, source, self.stats, timeout=5.0)
            lanes = AckingPipeline.lanes_for(list(self._clusters.values()), source, self.stats, dead)
            park = ParkLane(source, self.stats, timeout=5.0) if source.parking else None
            self.router = Router(settings.routing, ring, lanes)
            acking = AckingPipeline if self.accounting else UnaccountedAckingPipeline
            self.pipeline = acking(self.router.route, dead, lanes, self.stats, park)
        if not self.accounting:
            self._source.client_class = UnstampedSourceClient
        self._metrics = Metrics(self)
        self.http = HttpServer(settings.http.host, settings.http.port, self, unix_path=http_socket)
        self._exit_event: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    # ---- what metrics and HTTP read

    @property
    def source(self) -> CoreSource:
        return self._source

    @property
    def clusters(self) -> Iterable[NatsCluster]:
        return self._clusters.values()

    def ring_shares(self) -> Mapping[str, float]:
        return self.router.ring.shares()

    def metrics(self) -> bytes:
        return self._metrics.render()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        problems: dict[str, str] = {}
        if not self._source.subscribed:
            problems["source"] = self._why_down("not subscribed", self._source.stats.last_error)
        for cluster in self.clusters:
            if not cluster.connected:
                problems[cluster.name] = self._why_down("not connected", cluster.stats.last_error)
        if self.should_exit:
            problems["service"] = "shutting down"
        body: dict[str, Any] = {"ready": not problems}
        if problems:
            body["not_ready"] = problems
        return not problems, body

    @staticmethod
    def _why_down(state: str, last_error: str | None) -> str:
        return f"{state}: {last_error}" if last_error else state

    def route(self, asset: str) -> dict[str, Any]:
        name = self.router.cluster_for(asset)
        servers = self.settings.cluster(name).connection.servers
        return {"asset": asset, "cluster": name, "servers": [redact_url(u) for u in servers]}

    def clusters_state(self) -> dict[str, Any]:
        return {"clusters": {c.name: c.snapshot() for c in self.clusters}, "source": self._source.describe()}

    # ---- lifecycle

    def cluster(self, name: str) -> NatsCluster:
        return self._clusters[name]

    def run(self) -> int:
        """Run until a signal; the process exit code."""
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
            return asyncio.run(self.serve())
        return uvloop.run(self.serve())

    def handle_exit(self, sig: int = signal.SIGTERM) -> None:
        if self.should_exit:
            self.force_exit = True
            self.log.warning("forced_exit", signal=signal.Signals(sig).name)
        else:
            self.log.info("shutdown_requested", signal=signal.Signals(sig).name)
        self.should_exit = True
        if self._exit_event is not None:
            self._exit_event.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig)

    async def serve(self, *, install_signals: bool = True) -> int:
        self._exit_event = asyncio.Event()
        if self.should_exit:
            self._exit_event.set()
        if install_signals:
            self.install_signal_handlers()
        try:
            await self.startup()
            await self.main_loop()
        except OSError as exc:  # e.g. the HTTP port is taken: one clear line, not a traceback
            self.log.error("startup_failed", error=str(exc))
            return 1
        finally:
            await self.shutdown()
        return 0

    async def startup(self) -> None:
        s = self.settings
        self.log.info(
            "forwarder_starting",
            version=__version__,
            algorithm=self.algorithm,
            clusters=sorted(self._clusters),
            source_subject=s.source.subject,
            mode="jetstream" if s.source.jetstream else "core",
        )
        if not self.accounting:
            self.log.warning("accounting_disabled", reason="FORWARDER_ACCOUNTING=off: metrics stay at zero")
        await self.http.start()
        loop = asyncio.get_running_loop()
        connects = [loop.create_task(c.connect()) for c in self.clusters]
        self._tasks += connects
        # Consume only once every cluster can take messages, or after a bounded wait:
        # one cluster that is down must not stop the others for ever.
        await self._until_exit(asyncio.wait(connects, timeout=STARTUP_CLUSTER_WAIT))
        if self.should_exit:
            return
        self.pipeline.start()
        await self._until_exit(self._source.start(self.pipeline.handle))
        if isinstance(self._source, JetStreamSource) and self._source.parking:
            assert isinstance(self.pipeline, AckingPipeline)
            for name in self._clusters:
                await self._until_exit(self._source.consume_parked(name, self.pipeline.replayer(name)))
        if not self.should_exit:
            self.started.set()
            self.log.info("forwarder_started", http_port=self.http.port)

    async def _until_exit(self, aw: Any) -> None:
        """Await ``aw`` unless an exit is requested first (then it is cancelled)."""
        assert self._exit_event is not None
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._exit_event.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif task.exception() is not None:
            raise task.exception()

    async def main_loop(self) -> None:
        assert self._exit_event is not None
        while not self.should_exit:
            try:
                await asyncio.wait_for(self._exit_event.wait(), HOUSEKEEPING_INTERVAL)
            except TimeoutError:
                await self.housekeeping()

    async def housekeeping(self) -> None:
        """Once a second: notice a dead source read loop; report suppressed log lines."""
        await self._source.check()
        flush_rate_limited()

    async def shutdown(self) -> None:
        """Stop consuming, finish in-flight messages, flush, drain-close everything."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        self.log.info("forwarder_stopping", timeout=self.settings.shutdown_timeout)

        async def bounded(aw: Any, what: str) -> None:
            remaining = 0.0 if self.force_exit else max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(aw, remaining)
            except TimeoutError:
                self.log.warning("shutdown_step_timed_out", step=what)

        await bounded(self._source.stop(), "stop_consuming")
        await bounded(self.pipeline.stop(), "confirm_in_flight")
        await bounded(self._source.flush(5.0), "flush_acks")
        await bounded(
            asyncio.gather(*(c.close() for c in self.clusters), return_exceptions=True), "close_clusters"
        )
        await bounded(self._source.close(), "close_source")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.http.close()
        self.log.info(
            "forwarder_stopped",
            received=self.stats.received,
            forwarded={c.name: c.forwarded for c in self.clusters},
            dead_lettered=sum(self.stats.dead_lettered.values()),
        )
