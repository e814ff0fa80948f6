"""``make bench``: the forwarder against a bare nats-py relay, in one run, on embedded servers.

One source server (JetStream enabled; its stream exists only during a run with a
JetStream source, so that in a core run it stores nothing) and three target servers
(single nodes: the bench measures the relay, not NATS clustering) on loopback. Every
scenario runs its relay in its own process; scenarios are interleaved (A B C ... A B C ...)
so that the noise of a shared 2-core machine hits all of them alike. For each scenario
and repetition:

1. throughput: core source: a raw-socket producer keeps a bounded window of messages
   ahead of the relay (so nothing is dropped as a slow consumer and the relay always
   has work); JetStream source: the backlog is stored first, then the relay starts.
   Arrivals are counted on the targets' ``/varz`` ``in_msgs``; messages/s and the
   relay's CPU per message come from the steady part of the run (10%..90% arrived);
   for a JetStream source that is its drain rate, so a live run follows (the producer
   writes the stream, the same window ahead, while the relay forwards);
2. latency at half the live rate: paced, time-stamped messages; a probe subscribed to a
   sample of the assets on every target takes the kernel's receive time of each minus
   its stamp (p50/p99), and the same on the source: the latency before any relay;
3. peak RSS (VmHWM) of the relay's processes.

It prints a table, the ratios issue 7 asks for, and writes a JSON file into
``bench/results/``. It asserts nothing: speed goals live here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import nats
import yaml
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from bench import procstat
from bench.load import RawPublisher, Sample, Traffic, VarzCounter, cycle, steady_slice
from forwarder import embedded
from forwarder.childproc import die_with_parent

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SOURCE_STREAM = "ASSETS"
TARGET_STREAM = "ASSETS_OUT"
CLUSTERS = ("C1", "C2", "C3")
ACCOUNTING_ENV = "FORWARDER_ACCOUNTING"


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    relay: str  # "bare", "bare-pull", "raw" or "forwarder"
    source: str  # "core" or "jetstream"
    js_targets: bool = False
    workers: int = 1
    accounting: bool = True


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("raw-ceiling", "ceiling: raw-socket re-framer, no routing", "raw", "core"),
        Scenario("bare-core", "bare nats-py relay, core -> core", "bare", "core"),
        Scenario("fwd-core", "forwarder, core -> core", "forwarder", "core"),
        Scenario("fwd-js-core", "forwarder, JetStream -> core", "forwarder", "jetstream"),
        Scenario("fwd-js-js", "forwarder, JetStream -> JetStream", "forwarder", "jetstream", js_targets=True),
        Scenario("bare-js", "bare nats-py JetStream relay -> core", "bare", "jetstream"),
        Scenario("fwd-core-w2", "forwarder workers: 2, core -> core", "forwarder", "core", workers=2),
        Scenario("bare-js-pull", "bare nats-py JetStream pull fetch() -> core", "bare-pull", "jetstream"),
        Scenario(
            "fwd-js-core-w2", "forwarder workers: 2, JetStream -> core", "forwarder", "jetstream", workers=2
        ),
        Scenario(
            "fwd-core-noacct",
            "forwarder, core -> core, accounting off",
            "forwarder",
            "core",
            accounting=False,
        ),
        Scenario(
            "fwd-js-core-noacct",
            "forwarder, JetStream -> core, accounting off",
            "forwarder",
            "jetstream",
            accounting=False,
        ),
    )
}
DEFAULT_SCENARIOS = (
    "raw-ceiling",
    "bare-core",
    "fwd-core",
    "fwd-js-core",
    "fwd-js-js",
    "bare-js",
    "fwd-core-w2",
    "fwd-core-noacct",
)


@dataclass
class RunResult:
    scenario: str
    repetition: int
    msgs_per_s: float = 0.0
    cpu_us_per_msg: float = 0.0
    cpu_share: float = 0.0  # relay CPU seconds per wall second during the steady slice
    machine_busy: float = 0.0  # cores busy (all processes) during the steady slice, of nproc
    sent: int = 0
    arrived: int = 0
    lost: int = 0
    # The rate the relay keeps up with while the producer publishes (a JetStream source's
    # msgs_per_s is how fast it drains a stored backlog, with the source server storing
    # nothing meanwhile; live, that server also takes in and stores every message).
    live_msgs_per_s: float = 0.0
    latency_rate: float = 0.0
    latency: dict[str, Any] = field(default_factory=dict)
    peak_rss_mb: float = 0.0
    processes: int = 1
    exit_code: int | None = None
    error: str | None = None


# --------------------------------------------------------------------------- processes


def _preexec() -> Callable[[], None] | None:
    # As for the embedded servers: the kernel SIGKILLs the child if the bench dies outright.
    return die_with_parent(signal.SIGKILL)


def spawn(
    args: list[str], *, log: Path, env: dict[str, str] | None = None, pipes: bool = False
) -> subprocess.Popen[bytes]:
    """A child in its own session (a terminal's Ctrl-C reaches only the bench, which stops it by pid)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipes else out,
            stderr=out,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=_preexec(),
        )


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path) -> str:
    """One line of a child's stdout, with a deadline."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"{what}: no answer in {timeout:g}s{tail(log)}")
        ready, _, _ = select.select([proc.stdout], [], [], min(remaining, 0.5))
        if ready:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{what} exited with {proc.wait(5)}{tail(log)}")
            return line.decode().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{tail(log)}")


def tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return ("\n  " + "\n  ".join(text)) if text else ""


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> int | None:
    """SIGTERM, wait, SIGKILL: always reaped."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    return proc.returncode


def http_status(port: int, path: str) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


# --------------------------------------------------------------------------- the rig


class Rig:
    """The servers, the traffic and the scenario runs."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.servers: list[embedded.LocalServer] = []
        self.traffic = Traffic(args.assets, args.payload_size)
        self.batches = self.traffic.batches()
        self.procs: list[subprocess.Popen[bytes]] = []

    # ---- servers

    def start(self) -> None:
        w = self.workdir
        self.source = embedded.start_server(w, name="source", jetstream=True)
        self.servers.append(self.source)
        self.targets = []
        for name in CLUSTERS:
            target = embedded.start_server(w, name=name.lower(), jetstream=True)
            self.servers.append(target)
            self.targets.append(target)
        self.arrivals = VarzCounter([t.http_port for t in self.targets])
        self.max_msgs = max(1_000_000, int(self.args.messages * 1.5))

    def close(self) -> None:
        try:
            for proc in self.procs:
                stop(proc, timeout=5)
            if hasattr(self, "arrivals"):
                self.arrivals.close()
        finally:
            embedded.stop_all(self.servers)

    async def _add_stream(self, url: str, name: str, storage: StorageType) -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(
                StreamConfig(
                    name=name,
                    subjects=["assets.>"],
                    storage=storage,
                    max_msgs=self.max_msgs,
                    discard=DiscardPolicy.OLD,
                )
            )
        finally:
            await nc.close()

    def _storage(self) -> StorageType:
        return StorageType.MEMORY if self.args.storage == "memory" else StorageType.FILE

    async def _source_stream(self, present: bool) -> None:
        """Create the source stream for a JetStream-source run, delete it after: each run starts
        from nothing, and a core-source run's source server stores nothing (a stream capturing
        ``assets.>`` there would cost it a file write per message and put its pauses into the
        core relays' latency)."""
        nc = await nats.connect(self.source.url)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(SOURCE_STREAM)
        finally:
            await nc.close()
        if present:
            await self._add_stream(self.source.url, SOURCE_STREAM, self._storage())

    async def _target_streams(self, create: bool) -> None:
        for target in self.targets:
            if create:
                await self._add_stream(target.url, TARGET_STREAM, self._storage())
            else:
                nc = await nats.connect(target.url)
                try:
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await nc.jetstream().delete_stream(TARGET_STREAM)
                finally:
                    await nc.close()

    def stream_messages(self) -> int:
        jsz = self.source.monitor("/jsz?streams=true")
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == SOURCE_STREAM:
                    return int(stream["state"]["messages"])
        return 0

    # ---- relays

    def relay_command(self, sc: Scenario, rep: int) -> tuple[list[str], dict[str, str], int | None]:
        """The relay's argv, extra environment, and HTTP port (forwarder) or None (bare: prints ready)."""
        if sc.relay == "raw":
            argv = [sys.executable, "-m", "bench.rawrelay", "--source", self.source.url]
            return [*argv, "--target", self.targets[0].url], {}, None
        if sc.relay in ("bare", "bare-pull"):
            mode = "core" if sc.source == "core" else "jetstream" if sc.relay == "bare" else "jetstream-pull"
            argv = [sys.executable, "-m", "bench.relay", mode]
            argv += ["--source", self.source.url, "--assets", str(self.args.assets)]
            argv += ["--stream", SOURCE_STREAM, "--durable", "bench-relay"]
            argv += ["--max-ack-pending", str(self.args.max_ack_pending)]
            for name, target in zip(CLUSTERS, self.targets, strict=True):
                argv += ["--target", f"{name}={target.url}"]
            return argv, {}, None
        port = embedded.free_port()
        source: dict[str, Any] = {"servers": [self.source.url], "subject": "assets.>"}
        if sc.source == "jetstream":
            source["jetstream"] = {
                "stream": SOURCE_STREAM,
                "durable": "bench-forwarder",
                "max_ack_pending": self.args.max_ack_pending,
            }
        clusters = {
            name: {"servers": [t.url], **({"jetstream": True} if sc.js_targets else {})}
            for name, t in zip(CLUSTERS, self.targets, strict=True)
        }
        doc = {
            "source": source,
            "routing": {"key": {"subject_token": 1}},
            "clusters": clusters,
            "http": {"host": "127.0.0.1", "port": port},
            "log": {"level": "warning", "format": "json"},
            "shutdown_timeout": 15,
            "workers": sc.workers,
        }
        config = self.workdir / f"{sc.key}-{rep}.yaml"
        config.write_text(yaml.safe_dump(doc, sort_keys=False))
        argv = [sys.executable, "-m", "forwarder", "run", "-c", str(config)]
        env = {} if sc.accounting else {ACCOUNTING_ENV: "off"}
        return argv, env, port

    def start_relay(self, sc: Scenario, rep: int, log: Path) -> subprocess.Popen[bytes]:
        argv, env, port = self.relay_command(sc, rep)
        if self.args.profile == "pyinstrument" and sc.relay == "forwarder":
            out = RESULTS / f"pyinstrument-{sc.key}.txt"
            profiler = [sys.executable, "-m", "pyinstrument", "--show-all", "-r", "text", "-o", str(out)]
            argv = [*profiler, *argv[1:]]
        proc = spawn(argv, log=log, env=env, pipes=port is None)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        if port is None:
            line = read_line(proc, 30, sc.title, log)
            if line != "ready":
                raise RuntimeError(f"{sc.title}: unexpected {line!r}")
        else:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{sc.title} exited with {proc.returncode}{tail(log)}")
                with contextlib.suppress(OSError):
                    if http_status(port, "/readyz") == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{sc.title} not ready in 30s{tail(log)}")
                time.sleep(0.05)
        return proc

    # ---- phases

    def preload(self, count: int, chunk: int = 25_000) -> int:
        """Store ``count`` messages in the source stream before the relay starts; the backlog stored.

        Core publishes into a stream are not acknowledged, and a server whose store falls
        behind drops some: send a chunk, wait until the stream holds it, top up what is missing.
        """
        pub = RawPublisher(self.source.url)
        batches = cycle(self.batches)
        stored = self.stream_messages()
        try:
            deadline = time.monotonic() + 120
            while stored < count:
                want = min(chunk, count - stored)
                sent = 0
                while sent < want:
                    batch, size = next(batches)
                    pub.send(batch)
                    sent += size
                pub.flush()
                pub.service()
                target, last, still = stored + sent, stored, time.monotonic()
                while (stored := self.stream_messages()) < target:
                    if stored != last:
                        last, still = stored, time.monotonic()
                    elif time.monotonic() - still > 1.0:
                        break  # some were dropped: top up in the next round
                    time.sleep(0.02)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"source stream holds {stored} of {count} messages after 120s")
        finally:
            pub.close()
        return stored

    def throughput(self, sc: Scenario, pids: list[int], res: RunResult, base: int, first: Sample) -> None:
        """``base``: the targets' in_msgs before the relay started (a JetStream relay starts on its
        backlog at once); ``first``: a sample taken then (a tiny run may be over before the next)."""
        n = res.sent or self.args.messages  # a JetStream backlog: what the stream holds
        samples, sent, arrived = self.move(pids, n, base, first, publish=sc.source == "core")
        res.sent, res.arrived, res.lost = sent, arrived, max(0, sent - arrived)
        a, b = steady_slice(samples, n)
        moved = b.arrived - a.arrived
        if moved <= 0:
            raise RuntimeError(f"{sc.title}: nothing arrived ({arrived} of {sent})")
        res.msgs_per_s = moved / (b.t - a.t)
        res.cpu_us_per_msg = (b.cpu - a.cpu) * 1e6 / moved
        res.cpu_share = (b.cpu - a.cpu) / (b.t - a.t)
        res.machine_busy = (b.busy - a.busy) / (b.t - a.t)
        res.live_msgs_per_s = res.msgs_per_s

    def live_throughput(self, sc: Scenario, pids: list[int], res: RunResult) -> None:
        """A JetStream source's live maximum: the producer publishes into the stream, at most
        ``--window`` messages ahead of the targets, while the relay forwards."""
        if sc.source == "core":
            return  # its throughput run is live already
        n = self.args.messages
        base, first = self.before_start()
        samples, _sent, arrived = self.move(pids, n, base, first, publish=True)
        a, b = steady_slice(samples, n)
        if b.arrived <= a.arrived:
            raise RuntimeError(f"{sc.title}: nothing arrived live ({arrived} of {n})")
        res.live_msgs_per_s = (b.arrived - a.arrived) / (b.t - a.t)

    def move(
        self, pids: list[int], n: int, base: int, first: Sample, publish: bool
    ) -> tuple[list[Sample], int, int]:
        """Sample until ``n`` messages arrived (or nothing moves any more), publishing them at most
        ``--window`` ahead of the targets if ``publish``: the samples, messages sent, arrived."""
        window = self.args.window
        samples: list[Sample] = [first]
        pub = RawPublisher(self.source.url) if publish else None
        batches = cycle(self.batches)
        sent = n if pub is None else 0
        last_progress, last_arrived = time.monotonic(), -1
        try:
            while True:
                arrived = self.arrivals.in_msgs() - base
                now = time.monotonic()
                busy = procstat.system_busy_seconds()[0]
                samples.append(Sample(now, arrived, procstat.tree_cpu_seconds(pids), busy))
                if arrived >= n:
                    break
                if arrived != last_arrived:
                    last_progress, last_arrived = now, arrived
                elif now - last_progress > (3.0 if pub is not None else 10.0) and sent >= n:
                    break  # nothing moves any more: the rest was lost (core: slow consumer)
                if pub is not None:
                    pub.service()
                    while sent < n and sent - arrived < window:
                        batch, size = next(batches)
                        pub.send(batch)
                        sent += size
                time.sleep(0.02)
        finally:
            if pub is not None:
                pub.close()
        return samples, sent, arrived

    def latency(
        self,
        sc: Scenario,
        res: RunResult,
        log: Path,
        rate: float,
        seconds: float,
        on_tick: Callable[[float], None] | None = None,
    ) -> None:
        """Paced, stamped messages at ``rate``; the probe's percentiles."""
        probe_argv = [sys.executable, "-m", "bench.latency"]
        for t in self.targets:
            probe_argv += ["--target", t.url]
        probe_argv += ["--source", self.source.url]
        for asset in self.traffic.probe_assets(self.args.probe_every):
            probe_argv += ["--asset", asset]
        probe = spawn(probe_argv, log=log, pipes=True)
        self.procs.append(probe)
        try:
            if read_line(probe, 20, "latency probe", log) != "ready":
                raise RuntimeError("latency probe: unexpected output")
            base = self.arrivals.in_msgs()
            source_pids = list(self.source.pids)
            t0, busy0 = time.monotonic(), procstat.system_busy_seconds()[0]
            source0 = procstat.tree_cpu_seconds(source_pids)
            sent = self.pace(rate, seconds, on_tick)
            # not yet at the targets when the producer stops: a relay that keeps up has a
            # millisecond's worth or so; more says the rate was past what the machine carries
            behind = max(0, sent - (self.arrivals.in_msgs() - base))
            elapsed = time.monotonic() - t0
            busy = (procstat.system_busy_seconds()[0] - busy0) / elapsed
            source_cores = (procstat.tree_cpu_seconds(source_pids) - source0) / elapsed
            deadline = time.monotonic() + 10
            while self.arrivals.in_msgs() - base < sent and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)  # the probe's last messages
            assert probe.stdin is not None
            probe.stdin.close()
            res.latency = json.loads(read_line(probe, 20, "latency probe", log))
            # what the machine and the source server did meanwhile: the tail's context
            res.latency.update(
                machine_busy=busy, source_server_cores=source_cores, behind_at_end=behind / max(sent, 1)
            )
            res.latency_rate = rate
        finally:
            stop(probe, timeout=5)
            self.procs.remove(probe)

    def pace(self, rate: float, seconds: float, on_tick: Callable[[float], None] | None = None) -> int:
        """Publish at ``rate`` for ``seconds``: every millisecond what is due, stamped now."""
        pub = RawPublisher(self.source.url, name="bench-paced")
        sent = 0
        pos = 0
        cycle_len = len(self.traffic.order)
        try:
            start = time.monotonic()
            end = start + seconds
            next_service = start + 1.0
            while (now := time.monotonic()) < end:
                due = int((now - start) * rate) - sent
                if due > 0:
                    pub.send(self.traffic.stamped(pos, due, time.monotonic_ns()))
                    sent += due
                    pos = (pos + due) % cycle_len
                if now >= next_service:
                    pub.service()
                    if on_tick is not None:
                        on_tick(now)
                    next_service = now + 1.0
                time.sleep(0.001)
            pub.flush()
        finally:
            pub.close()
        return sent

    # ---- one scenario, one repetition

    def run(self, sc: Scenario, rep: int) -> RunResult:
        res = RunResult(sc.key, rep, processes=sc.workers + (1 if sc.workers > 1 else 0))
        log = self.workdir / f"{sc.key}-{rep}.log"
        proc = None
        try:
            if sc.source == "jetstream":
                asyncio.run(self._source_stream(present=True))
                if sc.js_targets:
                    asyncio.run(self._target_streams(create=True))
                res.sent = self.preload(self.args.messages)
            base, first = self.before_start()
            proc = self.start_relay(sc, rep, log)
            pids = procstat.tree(proc.pid)
            spy = self.start_py_spy(sc, proc.pid, log)
            try:
                self.throughput(sc, pids, res, base, first)
            finally:
                if spy is not None:
                    stop_py_spy(spy)
            if self.args.latency_seconds > 0:
                # at a share of what the relay keeps up with live: half of a JetStream source's
                # drain rate is more than the machine carries while the stream is also written
                self.live_throughput(sc, pids, res)
                rate = res.live_msgs_per_s * self.args.latency_fraction
                self.latency(sc, res, log, rate, self.args.latency_seconds)
            res.processes = len(pids)
            res.peak_rss_mb = procstat.tree_peak_rss_bytes(pids) / 2**20
        except Exception as exc:  # one failed run must not lose the others' figures
            res.error = f"{type(exc).__name__}: {exc}"
        finally:
            res.exit_code = stop(proc)
            if proc is not None:
                self.procs.remove(proc)
            if sc.source == "jetstream":
                with contextlib.suppress(Exception):
                    asyncio.run(self._source_stream(present=False))
                if sc.js_targets:
                    with contextlib.suppress(Exception):
                        asyncio.run(self._target_streams(create=False))
        if res.exit_code not in (0, None) and res.error is None:
            res.error = f"relay exited with {res.exit_code}{tail(log)}"
        return res

    def before_start(self) -> tuple[int, Sample]:
        return self.arrivals.in_msgs(), Sample(time.monotonic(), 0, 0.0, procstat.system_busy_seconds()[0])

    def start_py_spy(self, sc: Scenario, pid: int, log: Path) -> subprocess.Popen[bytes] | None:
        if self.args.profile != "py-spy" or sc.relay != "forwarder":
            return None
        RESULTS.mkdir(parents=True, exist_ok=True)
        spy = Path(sys.executable).parent / "py-spy"
        outs = []
        # raw: collapsed stacks, for ``python -m bench.stacks`` (or any flamegraph tool); one
        # sampler only, in non-blocking mode: two, or pausing the process, would slow it down.
        for fmt, ext in (("raw", "txt"),):
            out = RESULTS / f"py-spy-{sc.key}.{ext}"
            argv = [str(spy), "record", "--nonblocking", "--idle", "--pid", str(pid), "--rate", "250"]
            argv += ["--format", fmt, "-o", str(out)]
            outs.append(spawn(argv, log=log))
            self.procs.append(outs[-1])
        time.sleep(1.0)  # attached
        return outs  # type: ignore[return-value]


def stop_py_spy(spies: Any) -> None:
    for spy in spies:
        with contextlib.suppress(ProcessLookupError):
            spy.send_signal(signal.SIGINT)
    for spy in spies:
        try:
            spy.wait(30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(5)


# --------------------------------------------------------------------------- reporting


def machine() -> dict[str, Any]:
    model = "unknown"
    load: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        nats_py = package_version("nats-py")
    except PackageNotFoundError:
        nats_py = "?"
    try:
        version = subprocess.run(
            [embedded.nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError, embedded.EmbeddedError):
        version = "unknown"
    with contextlib.suppress(OSError):
        load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_at_start": load,
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_py": nats_py,
        "nats_server": version,
    }


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarise(results: list[RunResult], order: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in order:
        runs = [r for r in results if r.scenario == key and r.error is None]
        if not runs:
            out[key] = {"title": SCENARIOS[key].title, "runs": 0}
            continue
        rates = [r.msgs_per_s for r in runs]
        out[key] = {
            "title": SCENARIOS[key].title,
            "runs": len(runs),
            "msgs_per_s": median(rates),
            "msgs_per_s_min": min(rates),
            "msgs_per_s_max": max(rates),
            "live_msgs_per_s": median([r.live_msgs_per_s for r in runs if r.live_msgs_per_s]),
            "cpu_us_per_msg": median([r.cpu_us_per_msg for r in runs]),
            "cpu_share": median([r.cpu_share for r in runs]),
            "machine_busy": median([r.machine_busy for r in runs]),
            "latency_p50_ms": median([r.latency.get("p50_ms", float("nan")) for r in runs]),
            "latency_p99_ms": median([r.latency.get("p99_ms", float("nan")) for r in runs]),
            "latency_source_p99_ms": median([r.latency.get("source_p99_ms", float("nan")) for r in runs]),
            "latency_relay_hop_p99_ms": median(
                [r.latency.get("relay_hop_p99_ms", float("nan")) for r in runs]
            ),
            "latency_machine_busy": median([r.latency.get("machine_busy", float("nan")) for r in runs]),
            "latency_source_cores": median(
                [r.latency.get("source_server_cores", float("nan")) for r in runs]
            ),
            "latency_behind_at_end": median([r.latency.get("behind_at_end", float("nan")) for r in runs]),
            "latency_samples": sum(int(r.latency.get("count", 0)) for r in runs),
            "latency_rate": median([r.latency_rate for r in runs if r.latency]),
            "peak_rss_mb": max(r.peak_rss_mb for r in runs),
            "processes": max(r.processes for r in runs),
            "lost": sum(r.lost for r in runs),
        }
    return out


def paired(
    results: list[RunResult], a: str, b: str, metric: Callable[[RunResult, RunResult], float]
) -> list[float]:
    """``metric(run of a, run of b)`` for every repetition where both ran."""
    by = {(r.scenario, r.repetition): r for r in results if r.error is None}
    reps = sorted({r.repetition for r in results})
    return [metric(by[(a, i)], by[(b, i)]) for i in reps if (a, i) in by and (b, i) in by]


def ratios(results: list[RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def ratio(name: str, num: str, den: str, goal: float) -> None:
        values = paired(results, num, den, lambda x, y: x.msgs_per_s / y.msgs_per_s)
        # Each relay is one Python thread: on a machine with a core to spare for it, its
        # msg/s is 1 / (CPU per message). The CPU ratio is what the msg/s ratio becomes
        # there, and it is far less sensitive to a shared machine's noise.
        cpu = paired(results, num, den, lambda x, y: y.cpu_us_per_msg / x.cpu_us_per_msg)
        if values:
            out[name] = {"ratio": median(values), "per_repetition": values, "goal": goal,
                         "met": median(values) >= goal, "cpu_ratio": median(cpu),
                         "cpu_per_repetition": cpu}  # fmt: skip

    ratio("core_vs_bare", "fwd-core", "bare-core", 0.9)
    ratio("js_core_vs_bare_js", "fwd-js-core", "bare-js", 0.85)
    ratio("js_js_vs_js_core", "fwd-js-js", "fwd-js-core", 0.0)
    ratio("workers2_vs_1", "fwd-core-w2", "fwd-core", 0.0)
    for on, off, name in (
        ("fwd-core", "fwd-core-noacct", "accounting_cost_core"),
        ("fwd-js-core", "fwd-js-core-noacct", "accounting_cost_js_core"),
    ):
        cpu = paired(results, on, off, lambda x, y: (x.cpu_us_per_msg - y.cpu_us_per_msg) / x.cpu_us_per_msg)
        thr = paired(results, on, off, lambda x, y: 1 - x.msgs_per_s / y.msgs_per_s)
        if cpu:
            out[name] = {"cpu_share": median(cpu), "throughput_loss": median(thr), "per_repetition_cpu": cpu,
                         "per_repetition_throughput": thr}  # fmt: skip
    return out


LATENCY_GOAL_MS = 5.0
LATENCY_JUDGED = {"fwd-core": "core", "fwd-js-core": "JS->core", "fwd-js-js": "JS->JS"}
LATENCY_YARDSTICKS = {
    "bare-core": "bare relay",
    "bare-js": "bare JS relay",
    "raw-ceiling": "raw-socket ceiling",
}


def latency_verdict(summary: dict[str, dict[str, Any]], fraction: float) -> dict[str, Any] | None:
    """The p99 goal for each forwarder mode that ran, with the same run's yardsticks beside it:
    on a machine that runs the servers too, they show how much of the figure is the machine's."""

    def figures(keys: dict[str, str], figure: str = "latency_p99_ms") -> dict[str, float]:
        found = {k: summary.get(k, {}).get(figure, float("nan")) for k in keys}
        return {k: v for k, v in found.items() if v == v}  # NaN: no latency run

    judged = figures(LATENCY_JUDGED)
    if not judged:
        return None
    yardsticks = figures(LATENCY_YARDSTICKS)
    return {
        "fraction": fraction,
        "goal_ms": LATENCY_GOAL_MS,
        "forwarder_p99_ms": judged,
        "yardsticks_p99_ms": yardsticks,
        # the same runs' messages as a subscriber on the source saw them: before any relay
        "before_relay_p99_ms": figures(LATENCY_JUDGED, "latency_source_p99_ms"),
        # each message's arrival on its target minus its arrival on the source: the relay hop
        "relay_hop_p99_ms": figures(LATENCY_JUDGED, "latency_relay_hop_p99_ms"),
        # cores the machine and the source server used during those runs (of os.cpu_count())
        "machine_busy": figures(LATENCY_JUDGED, "latency_machine_busy"),
        "source_server_cores": figures(LATENCY_JUDGED, "latency_source_cores"),
        # the share of the run's messages not yet forwarded when the producer stopped
        "behind_at_end": figures(LATENCY_JUDGED, "latency_behind_at_end"),
        # each relay's own half: a faster relay is judged at a higher rate
        "rates": {k: summary[k].get("latency_rate", float("nan")) for k in [*judged, *yardsticks]},
        "met": max(judged.values()) < LATENCY_GOAL_MS,
    }


def latency_line(verdict: dict[str, Any]) -> str:
    rates = verdict.get("rates", {})

    def shown(names: dict[str, str], p99s: dict[str, float]) -> str:
        def at(key: str) -> str:
            rate = rates.get(key, float("nan"))
            return f" at {rate / 1000:.0f}k/s" if rate == rate else ""

        return ", ".join(f"{names[k]} {v:.1f} ms{at(k)}" for k, v in p99s.items())

    name = f"latency p99 at {verdict['fraction']:.2f}x live max rate"
    outcome = "met" if verdict["met"] else "MISSED"
    judged = shown(LATENCY_JUDGED, verdict["forwarder_p99_ms"])
    lines = [f"{name:<40}{judged}  (goal < {verdict['goal_ms']:g} ms: {outcome})"]
    if verdict["yardsticks_p99_ms"]:
        yardsticks = shown(LATENCY_YARDSTICKS, verdict["yardsticks_p99_ms"])
        lines.append(f"{'  the yardsticks in the same run':<40}{yardsticks}")
    if verdict.get("before_relay_p99_ms"):
        before = ", ".join(
            f"{LATENCY_JUDGED[k]} {v:.1f} ms" for k, v in verdict["before_relay_p99_ms"].items()
        )
        lines.append(f"{'  before the relay (source subscriber)':<40}{before}")
    if verdict.get("relay_hop_p99_ms"):
        hop = ", ".join(f"{LATENCY_JUDGED[k]} {v:.1f} ms" for k, v in verdict["relay_hop_p99_ms"].items())
        lines.append(f"{'  the relay hop alone (target - source)':<40}{hop}")
    busy, source = verdict.get("machine_busy", {}), verdict.get("source_server_cores", {})
    if busy:
        meanwhile = ", ".join(
            f"{LATENCY_JUDGED[k]} {v:.2f}" + (f" ({source[k]:.2f} source server)" if k in source else "")
            for k, v in busy.items()
        )
        lines.append(f"{f'  cores busy meanwhile, of {os.cpu_count()}':<40}{meanwhile}")
    if verdict.get("behind_at_end"):
        behind = ", ".join(f"{LATENCY_JUDGED[k]} {v:.1%}" for k, v in verdict["behind_at_end"].items())
        lines.append(f"{'  behind as the producer stops':<40}{behind}")
    return "\n".join(lines)


def accounting_microbench(per_read: int = 100) -> dict[str, float]:
    """The per-message accounting statements alone, timed with the forwarder's own objects.

    As the hot path does them: one receipt stamp per socket read (``per_read`` messages,
    about what a 32 KiB read of 256-byte messages holds), then per message the counters
    and keeping the stamp; per batch (one read) one ``observe_batch``. Core: ``received``
    and ``forwarded`` and the stamp appended (``CorePipeline.handle_nowait``/``batch_done``);
    JetStream: ``received``, then the lane's stamp list and ``observe_batch`` per batch.
    """
    import timeit

    from forwarder.stats import ForwardingStats

    stats = ForwardingStats()

    class Counted:  # a cluster's counter and a message's stamp, as attributes like the real ones
        forwarded = 0
        received_at = 0.0

    cluster, msgs = Counted(), [Counted() for _ in range(per_read)]

    def core_batch() -> None:
        t = time.perf_counter()
        stamps: list[float] = []
        for _ in range(per_read):
            stats.received += 1
            cluster.forwarded += 1
            stamps.append(t)
        stats.latency.observe_batch(time.perf_counter(), stamps)

    def acking_batch() -> None:
        t = time.perf_counter()
        for m in msgs:
            stats.received += 1
            m.received_at = t
        cluster.forwarded += per_read
        stats.latency.observe_batch(time.perf_counter(), [m.received_at for m in msgs])

    rounds = 2000
    core = timeit.timeit(core_batch, number=rounds) / (rounds * per_read)
    acking = timeit.timeit(acking_batch, number=rounds) / (rounds * per_read)
    return {"core_us": core * 1e6, "acking_us": acking * 1e6}


def fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def table(summary: dict[str, dict[str, Any]], extra: dict[str, Any]) -> str:
    head = (
        f"{'':2}{'scenario':<44}{'msg/s':>10}{'(min..max)':>19}{'CPU us/msg':>12}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'RSS MB':>9}{'cores':>7}{'busy':>6}"
    )
    lines = [head, "-" * len(head)]
    for i, s in enumerate(summary.values()):
        label = chr(ord("A") + i)
        if not s.get("runs"):
            lines.append(f"{label:<2}{s['title']:<44}{'failed':>10}")
            continue
        rng = f"({s['msgs_per_s_min'] / 1000:.0f}k..{s['msgs_per_s_max'] / 1000:.0f}k)"
        cpu, p50, p99 = (fmt(s[k], ".2f") for k in ("cpu_us_per_msg", "latency_p50_ms", "latency_p99_ms"))
        lines.append(
            f"{label:<2}{s['title']:<44}{s['msgs_per_s']:>10,.0f}{rng:>19}{cpu:>12}"
            f"{p50:>9}{p99:>9}{s['peak_rss_mb']:>9.1f}{s['cpu_share']:>7.2f}{s['machine_busy']:>6.2f}"
        )
    lines.append(
        "(medians over the repetitions; cores: the relay's CPU seconds per second; busy: cores the whole"
        " machine used meanwhile)"
    )
    lines.append("")
    names = {
        "core_vs_bare": "forwarder core->core / bare relay",
        "js_core_vs_bare_js": "forwarder JS->core / bare JS relay",
        "js_js_vs_js_core": "forwarder JS->JS / JS->core",
        "workers2_vs_1": "forwarder workers:2 / workers:1",
    }
    for key, name in names.items():
        if key in extra:
            r = extra[key]
            goal = f"  (goal >= {r['goal']:.2f}: {'met' if r['met'] else 'MISSED'})" if r["goal"] else ""
            lines.append(f"{name:<40}{r['ratio']:>6.2f}x msg/s, {r['cpu_ratio']:.2f}x by CPU/msg{goal}")
    if "accounting_microbench" in extra:
        m = extra["accounting_microbench"]
        lines.append(
            f"{'accounting statements alone (timeit)':<40}{m['core_us']:>6.2f} us/msg core, "
            f"{m['acking_us']:.2f} us/msg JetStream"
        )
    for scenario, name in (("fwd-core", "core"), ("fwd-js-core", "JS->core")):
        share = extra.get(f"accounting_share_{scenario}")
        if share:
            verdict = "met" if share["met"] else "MISSED"
            lines.append(
                f"{'metrics+logging cost, ' + name:<40}{share['share'] * 100:>6.1f}% of its CPU/msg "
                f"(statements timed alone; goal < 5%: {verdict})"
            )
    if extra.get("latency_goal"):
        lines.append(latency_line(extra["latency_goal"]))
    for key, name in (("accounting_cost_core", "core"), ("accounting_cost_js_core", "JS->core")):
        if key in extra:
            r = extra[key]
            lines.append(
                f"{'  A/B accounting off, ' + name:<40}{r['cpu_share'] * 100:>6.1f}% CPU/msg, "
                f"{r['throughput_loss'] * 100:.1f}% msg/s  (noisy on a shared machine)"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- soak


def soak(rig: Rig, sc: Scenario, seconds: float, every: float, out: IO[str]) -> dict[str, Any]:
    """Max rate once, then ``seconds`` at half of it, sampling the relay's RSS every ``every`` s."""
    res = RunResult(sc.key, 1)
    log = rig.workdir / f"soak-{sc.key}.log"
    if sc.source == "jetstream":
        asyncio.run(rig._source_stream(present=True))
        res.sent = rig.preload(rig.args.messages)
    base, first = rig.before_start()
    proc = rig.start_relay(sc, 1, log)
    try:
        pids = procstat.tree(proc.pid)
        rig.throughput(sc, pids, res, base, first)
        rig.live_throughput(sc, pids, res)
        rate = res.live_msgs_per_s / 2
        print(
            f"soak: {sc.title}: max {res.msgs_per_s:,.0f} msg/s (live {res.live_msgs_per_s:,.0f}); "
            f"{seconds:g}s at {rate:,.0f} msg/s",
            file=out,
        )
        # (seconds, RSS bytes, messages arrived, relay CPU s, machine busy s, iowait s, steal s)
        samples: list[tuple[float, int, int, float, float, float, float]] = []
        start = time.monotonic()
        arrived_base = rig.arrivals.in_msgs()

        def sample(now: float) -> None:
            if not samples or now - start - samples[-1][0] >= every:
                rss = procstat.tree_rss_bytes(pids)
                arrived = rig.arrivals.in_msgs() - arrived_base
                cpu = procstat.tree_cpu_seconds(pids)
                busy, _ = procstat.system_busy_seconds()
                samples.append((now - start, rss, arrived, cpu, busy, *procstat.system_stall_seconds()))
                if len(samples) % 12 == 1:
                    behind = int((now - start) * rate) - arrived
                    print(
                        f"soak: t={now - start:5.0f}s RSS {rss / 2**20:.1f} MB, "
                        f"{arrived} arrived ({behind} behind the producer)",
                        file=out,
                        flush=True,
                    )

        latency = RunResult(sc.key, 1)  # the probe runs for the whole soak
        rig.latency(sc, latency, rig.workdir / "soak-probe.log", rate, seconds, on_tick=sample)
        warm = min(60.0, seconds / 10)
        after = [s[1] for s in samples if s[0] >= warm] or [s[1] for s in samples]
        base = after[0]
        peak = max(after)
        result = {
            "scenario": sc.key,
            "title": sc.title,
            "seconds": seconds,
            "rate": rate,
            "max_rate": res.msgs_per_s,
            "rss_mb_at_warmup": base / 2**20,
            "rss_mb_peak_after_warmup": peak / 2**20,
            "rss_mb_last": after[-1] / 2**20,
            "growth": peak / base - 1,
            "flat_within_10pct": peak <= base * 1.10,
            "latency": latency.latency,
            "slow_intervals": slow_intervals(samples, rate),
            "samples": [(round(s[0], 1), *s[1:]) for s in samples],
        }
        return result
    finally:
        stop(proc)
        rig.procs.remove(proc)


def slow_intervals(
    samples: list[tuple[float, int, int, float, float, float, float]], rate: float
) -> dict[str, Any]:
    """Where the time went while the relay fell behind: the sample intervals whose arrivals
    ran below 90% of the producer's rate, against all the others (cores are per second)."""
    slow: list[tuple[float, ...]] = []
    steady: list[tuple[float, ...]] = []
    for a, b in itertools.pairwise(samples):
        span = b[0] - a[0]
        if span <= 0:
            continue
        row = (
            (b[2] - a[2]) / span,
            (b[3] - a[3]) / span,
            (b[4] - a[4]) / span,
            (b[5] - a[5]) / span,
            (b[6] - a[6]) / span,
        )
        (slow if row[0] < 0.9 * rate else steady).append(row)

    def mean(rows: list[tuple[float, ...]]) -> dict[str, float]:
        if not rows:
            return {}
        keys = ("msgs_per_s", "relay_cores", "machine_busy_cores", "iowait_cores", "steal_cores")
        return {k: round(sum(r[i] for r in rows) / len(rows), 3) for i, k in enumerate(keys)}

    return {"count": len(slow), "of": len(slow) + len(steady), "slow": mean(slow), "steady": mean(steady)}


def soak_line(s: dict[str, Any]) -> str:
    verdict = "flat (within 10%)" if s["flat_within_10pct"] else "GREW"
    lat = s["latency"]
    return (
        f"soak: RSS {s['rss_mb_at_warmup']:.1f} MB after warm-up, "
        f"peak {s['rss_mb_peak_after_warmup']:.1f} MB, last {s['rss_mb_last']:.1f} MB: {verdict}; "
        f"latency p50 {lat.get('p50_ms', float('nan')):.2f} ms, p99 {lat.get('p99_ms', float('nan')):.2f} ms"
    ) + _slow_line(s.get("slow_intervals"))


def _slow_line(slow: dict[str, Any] | None) -> str:
    if not slow or not slow["count"]:
        return ""
    parts = []
    for label in ("slow", "steady"):
        m = slow[label]
        if m:
            parts.append(
                f"{label}: {m['msgs_per_s']:,.0f} msg/s, relay {m['relay_cores']:.2f} cores, "
                f"machine {m['machine_busy_cores']:.2f} busy, iowait {m['iowait_cores']:.2f}, "
                f"steal {m['steal_cores']:.2f}"
            )
    return f"\nsoak: {slow['count']} of {slow['of']} intervals below 90% of the rate; " + "; ".join(parts)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument(
        "--messages", type=int, default=200_000, help="messages per throughput run (default 200000)"
    )
    p.add_argument("--payload-size", type=int, default=256, help="payload bytes (default 256)")
    p.add_argument("--repeat", type=int, default=2, help="interleaved repetitions (default 2)")
    p.add_argument("--assets", type=int, default=2000, help="distinct assets (5 subjects each; default 2000)")
    p.add_argument("--latency-seconds", type=float, default=2.0, help="latency run length (0: skip)")
    p.add_argument("--latency-fraction", type=float, default=0.5,
                   help="latency run rate as a fraction of the run's live maximum (default 0.5)")  # fmt: skip
    p.add_argument("--probe-every", type=int, default=50, help="the latency probe listens to every Nth asset")
    p.add_argument("--window", type=int, default=40_000, help="core runs: messages ahead of the relay")
    p.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                   help=f"comma-separated, in run order, or all; known: {', '.join(SCENARIOS)}")  # fmt: skip
    p.add_argument("--max-ack-pending", type=int, default=20000,
                   help="JetStream consumers' max_ack_pending (default: the forwarder's 20000)")  # fmt: skip
    p.add_argument("--storage", choices=("file", "memory"), default="file", help="JetStream storage")
    p.add_argument(
        "--json", type=Path, default=None, help="result file (default bench/results/bench-<time>.json)"
    )
    p.add_argument("--profile", choices=("py-spy", "pyinstrument"), default=None,
                   help="profile the forwarder's throughput runs into bench/results/")  # fmt: skip
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS", help="soak instead of the bench")
    p.add_argument("--soak-scenario", default="fwd-js-core", choices=list(SCENARIOS))
    p.add_argument("--soak-every", type=float, default=5.0, help="RSS sample interval in seconds")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    args = p.parse_args(argv)
    if args.scenarios == "all":
        args.scenarios = ",".join(SCENARIOS)
    unknown = [s for s in args.scenarios.split(",") if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s): {', '.join(unknown)}")
    if args.messages < 1000:
        p.error("--messages must be at least 1000")
    if not 0 < args.latency_fraction <= 1:
        p.error("--latency-fraction must be in (0, 1]")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, kill) stops the bench as Ctrl-C does: through every finally.
    signal.signal(signal.SIGTERM, _interrupt)
    order = args.scenarios.split(",")
    started = time.monotonic()
    info = machine()
    print(
        f"bench: {info['cpu_model']}, {info['nproc']} cores, Python {info['python']}, {info['nats_server']}"
    )
    print(f"bench: {args.messages} messages of {args.payload_size} bytes, {args.assets} assets, "
          f"{args.repeat} repetition(s); targets are single-node servers")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="forwarder-bench-"))
    rig = Rig(args, workdir)
    results: list[RunResult] = []
    doc: dict[str, Any] = {"machine": info, "parameters": {k: str(v) if isinstance(v, Path) else v
                                                            for k, v in vars(args).items()}}  # fmt: skip
    try:
        rig.start()
        if args.soak:
            doc["soak"] = soak(rig, SCENARIOS[args.soak_scenario], args.soak, args.soak_every, sys.stdout)
            print(soak_line(doc["soak"]))
        else:
            for rep in range(1, args.repeat + 1):
                for key in order:
                    sc = SCENARIOS[key]
                    res = rig.run(sc, rep)
                    results.append(res)
                    if res.error:
                        print(f"  [{rep}] {sc.title}: FAILED: {res.error}", flush=True)
                    else:
                        lat = res.latency
                        print(
                            f"  [{rep}] {sc.title:<44} {res.msgs_per_s:>9,.0f} msg/s "
                            f"{res.cpu_us_per_msg:6.2f} us/msg  p50 {lat.get('p50_ms', float('nan')):.2f} "
                            f"p99 {lat.get('p99_ms', float('nan')):.2f} ms  RSS {res.peak_rss_mb:.0f} MB  "
                            f"cores {res.cpu_share:.2f}/{res.machine_busy:.2f}"
                            + (f"  live {res.live_msgs_per_s:,.0f} msg/s" if sc.source != "core" else ""),
                            flush=True,
                        )
            summary = summarise(results, order)
            extra = ratios(results)
            extra["accounting_microbench"] = micro = accounting_microbench()
            # The verdict on the accounting's cost: its statements' own time against the
            # forwarder's CPU per message. The on/off A/B is printed beside it, but on a
            # shared machine its noise (tens of percent) is larger than what it measures.
            for scenario, key in (("fwd-core", "core_us"), ("fwd-js-core", "acking_us")):
                per_msg = summary.get(scenario, {}).get("cpu_us_per_msg")
                if per_msg:
                    share = micro[key] / per_msg
                    extra[f"accounting_share_{scenario}"] = {
                        "share": share,
                        "goal": 0.05,
                        "met": share < 0.05,
                    }
            extra["latency_goal"] = latency_verdict(summary, args.latency_fraction)
            doc |= {"summary": summary, "ratios": extra, "runs": [asdict(r) for r in results]}
            print()
            print(table(summary, extra))
    except KeyboardInterrupt:
        print("\nbench: interrupted", file=sys.stderr)
        return 130
    finally:
        # Cleaning up now: a further Ctrl-C or SIGTERM must not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        rig.close()
        with contextlib.suppress(OSError):
            doc["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        path = (
            args.json or RESULTS / f"{'soak' if args.soak else 'bench'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\nbench: results in {path} ({doc['elapsed_s']:.0f}s)")
        if args.keep:
            print(f"bench: work dir kept: {workdir}")
        else:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
