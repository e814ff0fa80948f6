"""Wire source, router, pipeline and clusters together and run them.

Shaped like uvicorn's server: ``Server.serve()`` runs startup, the main loop and
shutdown; signal handlers only set flags (the first SIGTERM/SIGINT asks for a
graceful exit, a second one forces it).

The routing state (the topology, its clusters and the router) can change while the
service runs (``live.py``): new clusters are connected first, then the pipeline is
handed the new router in one assignment, and clusters that left are drain-closed
after the grace window, once what was in flight to them is confirmed.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Iterable, Mapping
from typing import Any

from . import __version__
from .acking import AckingPipeline, DeadLetterLane, ParkLane
from .cluster import NatsCluster
from .config import Settings, redact_url
from .http import HttpServer, HttpThread
from .live import ApplyError, Finish, TopologyManager
from .logs import flush_rate_limited, get_logger
from .metrics import Metrics
from .pipeline import CorePipeline, DeadLetters
from .router import Router
from .source import CoreSource, JetStreamSource, UnstampedSourceClient
from .stats import ForwardingStats, NullLatencyHistogram, accounting_enabled
from .topology import Topology, cluster_settings

HOUSEKEEPING_INTERVAL = 1.0
HEARTBEAT_INTERVAL = 1.0
# /healthz answers 503 when the event loop has not turned for this long: the HTTP
# server runs on a thread of its own, so answering no longer proves that the
# forwarding works.
LOOP_STALL_SECONDS = 10.0
STARTUP_CLUSTER_WAIT = 10.0  # how long the source waits for clusters before consuming anyway


async def _nothing_to_finish(grace: float) -> None:
    """A version that changed nothing but its number has no grace window."""


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
        self.pipeline: CorePipeline | AckingPipeline
        if settings.source.jetstream is None:
            self._source = CoreSource(settings.source)
            dead_letters = DeadLetters(settings.routing.dead_letter_subject, self._source, self.stats)
            self.pipeline = CorePipeline(dead_letters, self.stats)
        else:
            source = JetStreamSource(settings.source)
            self._source = source
            dead_letters = DeadLetters(settings.routing.dead_letter_subject, source, self.stats)
            timeout = source.js.confirm_timeout
            dead = DeadLetterLane(dead_letters, source, self.stats, timeout=timeout)
            park = ParkLane(source, self.stats, timeout=timeout) if source.parking else None
            self.pipeline = AckingPipeline(dead, self.stats, park)
        if not self.accounting:
            self._source.client_class = UnstampedSourceClient
        self._dead_letters = dead_letters
        self.topology = Topology.from_settings(settings)
        self._clusters: dict[str, NatsCluster] = {}
        self._lanes: dict[str, Any] = {}  # JetStream source: the lane of each cluster
        self._leaving: dict[str, NatsCluster] = {}  # left the topology; closed when the grace ends
        self.router: Router[Any]
        self._install(self.topology, self._new_clusters(self.topology, self.topology.clusters))
        self.live = TopologyManager(settings.topology, self) if settings.topology.kv_bucket else None
        self._metrics = Metrics(self)
        self.http = HttpThread(
            HttpServer(settings.http.host, settings.http.port, self, unix_path=http_socket)
        )
        self._exit_event: asyncio.Event | None = None
        self._freeze_heap = False  # serve(freeze_heap=...)
        self._tasks: list[asyncio.Task[Any]] = []
        self._switching = asyncio.Lock()
        self.loop_heartbeat = time.monotonic()  # the event loop's last turn, for /healthz

    # ---- what metrics and HTTP read (from the HTTP thread: plain reads only)

    @property
    def source(self) -> CoreSource:
        return self._source

    @property
    def clusters(self) -> Iterable[NatsCluster]:
        """Every cluster with a connection: the topology's, and those leaving it."""
        return [
            *self._clusters.values(),
            *(c for c in self._leaving.values() if c.name not in self._clusters),
        ]

    @property
    def algorithm(self) -> str:
        return self.topology.algorithm

    def ring_shares(self) -> Mapping[str, float]:
        return self.router.ring.shares()

    def topology_counts(self) -> tuple[int, int, int]:
        live = self.live
        return self.topology.version, live.changes if live else 0, live.apply_errors if live else 0

    def metrics(self) -> bytes:
        return self._metrics.render()

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        silent = time.monotonic() - self.loop_heartbeat
        if silent > LOOP_STALL_SECONDS:
            return False, {"status": "stalled", "event_loop_silent_seconds": round(silent, 1)}
        return True, {"status": "ok"}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        problems: dict[str, str] = {}
        if not self._source.subscribed:
            problems["source"] = self._why_down("not subscribed", self._source.stats.last_error)
        for cluster in self._clusters.values():
            if not cluster.connected:
                problems[cluster.name] = self._why_down("not connected", cluster.stats.last_error)
        if self.live is not None and self.live.problem:
            problems["topology"] = self.live.problem
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
        # One snapshot of the topology (the HTTP thread may run during a switch), and its
        # ring itself (pure, immutable), not the router's cache that the hot path fills.
        topology = self.topology
        name = topology.ring.cluster_for(asset)
        return {
            "asset": asset,
            "cluster": name,
            "servers": [redact_url(u) for u in topology.clusters[name].servers],
            "topology_version": topology.version,
        }

    def clusters_state(self) -> dict[str, Any]:
        return {
            "clusters": {c.name: c.snapshot() for c in self._clusters.values()},
            "leaving": sorted(self._leaving),
            "topology_version": self.topology.version,
            "source": self._source.describe(),
        }

    # ---- the routing state

    def _new_clusters(self, topology: Topology, names: Iterable[str]) -> dict[str, NatsCluster]:
        return {n: NatsCluster(cluster_settings(n, topology.clusters[n], self.settings)) for n in names}

    def _install(
        self,
        topology: Topology,
        clusters: dict[str, NatsCluster],
        previous: Topology | None = None,
        leaving: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """Route by ``topology`` from the next message on: one assignment in the pipeline.

        With ``previous``, an asset that it placed on another cluster gets a grace route;
        ``leaving`` holds the targets of clusters that are no longer in the topology, kept
        for those routes. Returns the lanes that no route leads to any more.
        """
        targets: dict[str, Any]
        displaced: list[Any] = []
        if isinstance(self.pipeline, AckingPipeline):
            lanes = {
                name: lane if (lane := self._lanes.get(name)) is not None and lane.cluster is c
                else self.pipeline.new_lane(c)
                for name, c in clusters.items()
            }  # fmt: skip
            displaced = [lane for name, lane in self._lanes.items() if lanes.get(name) is not lane]
            displaced = [lane for lane in displaced if lane not in (leaving or {}).values()]
            self._lanes = lanes
            targets = {**(leaving or {}), **lanes}
        else:
            targets = {**(leaving or {}), **clusters}
        self.router = Router(
            self.settings.routing, topology.ring, targets, previous=previous.ring if previous else None
        )
        self._dead_letters.asset_of = self.router.asset_of
        self.pipeline.use(self.router.route, self.router.route_subject)
        self.topology = topology
        self._clusters = clusters
        return displaced

    async def switch_topology(self, new: Topology, timeout: float) -> Finish:
        """Connect what is new and switch routing; the returned step ends the grace window.

        Raises ``ApplyError`` when a new cluster stays unreachable: then nothing changed
        and the connections opened for the new version are closed again.
        """
        async with self._switching:
            old = self.topology
            if new.same_routing(old):
                self.topology = new
                return _nothing_to_finish
            changed = [n for n, spec in new.clusters.items() if old.clusters.get(n) != spec]
            fresh = self._new_clusters(new, changed)
            try:
                await asyncio.wait_for(asyncio.gather(*(c.connect() for c in fresh.values())), timeout)
            except Exception as exc:  # a timeout, or a cluster refused: the old routing stays
                down = sorted(n for n, c in fresh.items() if not c.connected) or sorted(fresh)
                await asyncio.gather(*(c.close() for c in fresh.values()), return_exceptions=True)
                raise ApplyError(new.version, down, exc) from None
            clusters = {n: fresh.get(n) or self._clusters[n] for n in new.clusters}
            leaving_clusters = [c for n, c in self._clusters.items() if clusters.get(n) is not c]
            removed = set(old.clusters) - set(new.clusters)
            current = self._lanes if isinstance(self.pipeline, AckingPipeline) else self._clusters
            leaving = {n: current[n] for n in removed}
            self._leaving = {c.name: c for c in leaving_clusters}
            displaced = self._install(new, clusters, previous=old, leaving=leaving)
            self.log.info(
                "topology_switched", version=new.version, previous=old.version,
                added=sorted(set(new.clusters) - set(old.clusters)), removed=sorted(removed),
            )  # fmt: skip
            await self._consume_parked(list(fresh))

        async def finish(grace: float) -> None:
            """After ``grace``: plain routes, then let go of what left."""
            if grace > 0:
                await self._until_exit(asyncio.sleep(grace))
            async with self._switching:
                retired = displaced + self._install(new, clusters)
                if isinstance(self.pipeline, AckingPipeline):
                    await self.pipeline.retire(retired)
                for cluster in leaving_clusters:
                    await cluster.close()
                    self.log.info("cluster_retired", cluster=cluster.name)
                self._leaving = {}
                self.log.info("grace_ended", version=new.version)

        return finish

    # ---- lifecycle

    def cluster(self, name: str) -> NatsCluster:
        return self._clusters[name]

    def run(self) -> int:
        """Run until a signal; the process exit code."""
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
            return asyncio.run(self.serve(freeze_heap=True))
        return uvloop.run(self.serve(freeze_heap=True))

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

    async def serve(self, *, install_signals: bool = True, freeze_heap: bool = False) -> int:
        """``freeze_heap``: once started, move every object so far out of the garbage
        collector's sight (the process's own run; an embedding process keeps its heap)."""
        self._exit_event = asyncio.Event()
        self._freeze_heap = freeze_heap
        if self.should_exit:
            self._exit_event.set()
        if install_signals:
            self.install_signal_handlers()
        self._tasks.append(asyncio.get_running_loop().create_task(self._heartbeat(), name="heartbeat"))
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
        if self.live is not None:
            # The bucket's topology wins over the file's (which only fills an empty bucket).
            await self._until_exit(self._source.connect())
            if self.should_exit:
                return
            stored = await self.live.bootstrap(self._source.client, self.topology)
            if not stored.same_routing(self.topology):
                unused = self._install(stored, self._new_clusters(stored, stored.clusters))
                if isinstance(self.pipeline, AckingPipeline):
                    await self.pipeline.retire(unused)
            self.topology = stored
        connects = [loop.create_task(c.connect()) for c in self.clusters]
        self._tasks += connects
        # Consume only once every cluster can take messages, or after a bounded wait:
        # one cluster that is down must not stop the others for ever.
        await self._until_exit(asyncio.wait(connects, timeout=STARTUP_CLUSTER_WAIT))
        if self.should_exit:
            return
        self.pipeline.start()
        pipeline = self.pipeline
        await self._until_exit(
            self._source.start(pipeline.handle, pipeline.handle_nowait, pipeline.batch_done)
        )
        await self._consume_parked(list(self._clusters))
        if self.live is not None and not self.should_exit:
            self._tasks.append(loop.create_task(self.live.run(), name="topology"))
        if not self.should_exit:
            if self._freeze_heap:
                # What startup built (config, clients, metrics, imported modules: some 40,000
                # objects) lives as long as the process; a full collection that walks it all
                # stops forwarding for 10-15 ms, the latency tail's largest pause of our own.
                # Frozen, full collections only see what came later: under a millisecond.
                gc.freeze()
            self.started.set()
            self.log.info(
                "forwarder_started", http_port=self.http.port, topology_version=self.topology.version
            )

    async def _consume_parked(self, names: list[str]) -> None:
        """Replay parked messages of these clusters (JetStream source with parking)."""
        if isinstance(self._source, JetStreamSource) and self._source.parking:
            assert isinstance(self.pipeline, AckingPipeline)
            for name in names:
                await self._until_exit(self._source.consume_parked(name, self.pipeline.replayer(name)))

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

    async def _heartbeat(self) -> None:
        while True:
            self.loop_heartbeat = time.monotonic()
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def main_loop(self) -> None:
        assert self._exit_event is not None
        while not self.should_exit:
            try:
                await asyncio.wait_for(self._exit_event.wait(), HOUSEKEEPING_INTERVAL)
            except TimeoutError:
                await self.housekeeping()

    async def housekeeping(self) -> None:
        """Once a second: notice a dead source read loop; report suppressed log lines;
        sample the process metrics."""
        await self._source.check()
        flush_rate_limited()
        self._metrics.process.refresh()

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
        flush_rate_limited(force=True)  # what a flood suppressed in its last seconds
        self.log.info(
            "forwarder_stopped",
            received=self.stats.received,
            forwarded={c.name: c.forwarded for c in self.clusters},
            dead_lettered=sum(self.stats.dead_lettered.values()),
        )
