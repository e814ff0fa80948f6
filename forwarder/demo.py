"""``forwarder demo`` and ``forwarder produce``.

The demo is the main job on a laptop with nothing but Python: it starts real
nats-server processes (a source and three target clusters, one of them a 3-node
cluster) on free loopback ports, runs the forwarder on them with
``forwarder/demo.yaml``, publishes synthetic asset messages, prints a live line a
second and at the end checks what each target cluster received against what the
ring says it should have received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from .config import ConfigError, Settings, load_config
from .hashring import Ring, build_ring

ITEMS = ("temperature", "pressure", "speed", "state", "energy")
DEFAULT_DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # package data: works from any directory


class AssetTraffic:
    """Synthetic asset messages: ``PREFIX.<asset uuid>.<item>`` with a JSON payload."""

    def __init__(self, assets: int, payload_size: int, prefix: str = "assets", seed: int = 7) -> None:
        rnd = random.Random(seed)
        self.assets = [str(uuid.UUID(int=rnd.getrandbits(128), version=4)) for _ in range(max(1, assets))]
        self.subjects = [f"{prefix}.{a}.{item}" for a in self.assets for item in ITEMS]
        self._payload_size = max(16, payload_size)
        self._rnd = rnd

    def asset_of(self, index: int) -> str:
        return self.assets[index // len(ITEMS)]

    def messages(self) -> Iterator[tuple[int, str, bytes]]:
        """Endless (index, subject, payload); assets interleaved, each item in turn."""
        n = 0
        count = len(self.subjects)
        while True:
            index = (n * 7919) % count  # a stride coprime with nearly any count: spreads assets
            body = b'{"seq":%d,"value":%.3f,"pad":"' % (n, self._rnd.random() * 100)
            pad = max(0, self._payload_size - len(body) - 2)
            yield index, self.subjects[index], body + b"x" * pad + b'"}'
            n += 1


async def pace(
    messages: Iterator[tuple[int, str, bytes]],
    nc: Client,
    *,
    rate: float,
    limit: int | None,
    stop: asyncio.Event,
    on_sent: Any = None,
) -> int:
    """Publish at ``rate`` a second (0: as fast as possible) until ``limit`` or ``stop``."""
    sent = 0
    started = time.monotonic()
    batch = 100 if rate <= 0 else max(1, int(rate / 100))
    while not stop.is_set() and (limit is None or sent < limit):
        for _ in range(batch if limit is None else min(batch, limit - sent)):
            index, subject, payload = next(messages)
            await nc.publish(subject, payload)
            if on_sent is not None:
                on_sent(index)
            sent += 1
        if rate > 0:
            ahead = sent / rate - (time.monotonic() - started)
            if ahead > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ahead)
        else:
            await asyncio.sleep(0)
    await nc.flush()
    return sent


# --------------------------------------------------------------------------- demo


@dataclass
class Landing:
    """What one target cluster received, checked against the ring."""

    cluster: str
    received: int = 0
    misrouted: int = 0
    assets: set[str] = field(default_factory=set)


async def _watch_cluster(url_list: str, name: str, ring: Ring, landing: Landing) -> Client:
    async def on_msg(msg: Msg) -> None:
        landing.received += 1
        asset = msg.subject.split(".")[1]
        landing.assets.add(asset)
        if ring.cluster_for(asset) != name:
            landing.misrouted += 1

    nc = await nats.connect(url_list.split(","), name=f"demo-watch-{name}")
    await nc.subscribe("assets.>", cb=on_msg, pending_msgs_limit=1_000_000)
    await nc.flush()
    return nc


def run_demo(args: argparse.Namespace) -> int:
    from . import embedded, logs

    config_path = Path(args.config) if args.config else DEFAULT_DEMO_CONFIG
    if not config_path.is_file():
        print(
            f"forwarder: demo config {config_path} not found",
            file=sys.stderr,
        )
        return 2
    try:
        binary = embedded.nats_server_binary()
    except embedded.EmbeddedError as exc:
        print(f"forwarder: {exc}", file=sys.stderr)
        return 2
    print(f"demo: starting embedded NATS servers ({binary})", flush=True)
    with tempfile.TemporaryDirectory(prefix="forwarder-demo-") as tmp:
        servers: list[Any] = []
        try:
            work = Path(tmp)
            source = embedded.start_server(work, name="source", jetstream=True)
            servers.append(source)
            c1 = embedded.start_server(work, name="c1")
            servers.append(c1)
            c2 = embedded.start_cluster(work, name="c2", size=3)
            servers.append(c2)
            c3 = embedded.start_server(work, name="c3")
            servers.append(c3)
            env = {
                **os.environ,
                "DEMO_SOURCE_URL": source.url,
                "DEMO_C1_SERVERS": c1.url,
                "DEMO_C2_SERVERS": c2.url_list,
                "DEMO_C3_SERVERS": c3.url,
            }
            try:
                settings = load_config(config_path, env=env)
            except ConfigError as exc:
                print(f"forwarder: {exc}", file=sys.stderr)
                return 2
            logs.configure(settings.log.level, settings.log.format, secrets=settings.secrets())
            for name, where in (("source", source.url), ("C1", c1.url), ("C2", c2.url_list), ("C3", c3.url)):
                print(f"demo: {name:<6} {where}", flush=True)
            return _run_loop(_Demo(settings, args).run())
        finally:
            for server in reversed(servers):
                server.stop()


def _run_loop(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


DUPLICATE_SIGNAL_WINDOW = 0.5  # seconds: a second signal sooner than this is the same request


class _Demo:
    def __init__(self, settings: Settings, args: argparse.Namespace) -> None:
        self.settings = settings
        self.args = args
        self.traffic = AssetTraffic(args.assets, args.payload_size)
        self.ring = build_ring(
            settings.routing.hashing.algorithm,
            {c.name: c.weight for c in settings.clusters},
            replicas=settings.routing.hashing.replicas,
        )
        owner = {a: self.ring.cluster_for(a) for a in self.traffic.assets}
        self.owner_by_index = [owner[self.traffic.asset_of(i)] for i in range(len(self.traffic.subjects))]
        self.expected: Counter[str] = Counter()
        self.stop = asyncio.Event()
        self.interrupts = 0
        self.first_interrupt = 0.0

    def _interrupt(self) -> None:
        now = time.monotonic()
        if self.interrupts and now - self.first_interrupt < DUPLICATE_SIGNAL_WINDOW:
            # One request delivered twice: `timeout make demo` signals the process group,
            # and make passes the signal on to its child as well. Not a second Ctrl-C.
            return
        self.interrupts += 1
        self.stop.set()
        if self.interrupts == 1:
            self.first_interrupt = now
            print("\ndemo: stopping (Ctrl-C again to force)", flush=True)

    async def run(self) -> int:
        from .service import Server

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._interrupt)
        server = Server(self.settings)
        serving = loop.create_task(server.serve(install_signals=False))
        landings = {c.name: Landing(c.name) for c in self.settings.clusters}
        watchers = [
            await _watch_cluster(",".join(c.connection.servers), c.name, self.ring, landings[c.name])
            for c in self.settings.clusters
        ]
        producer = await nats.connect(self.settings.source.connection.servers[0], name="demo-producer")
        try:
            started = loop.create_task(server.started.wait())
            await asyncio.wait({started, serving}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if serving.done():
                return int(serving.result())
            print(f"demo: forwarder ready, http://127.0.0.1:{server.http.port}/metrics", flush=True)
            ticker = loop.create_task(self._live(server))

            def count(index: int) -> None:
                self.expected[self.owner_by_index[index]] += 1

            limit = self.args.messages
            if self.args.duration is not None:
                loop.call_later(self.args.duration, self.stop.set)
            sent = await pace(
                self.traffic.messages(),
                producer,
                rate=self.args.rate,
                limit=limit,
                stop=self.stop,
                on_sent=count,
            )
            await self._settle(server, landings, sent)
            ticker.cancel()
            return self._summary(server, landings, sent)
        finally:
            server.handle_exit()
            if self.interrupts > 1:
                server.handle_exit()
            await serving
            for nc in (*watchers, producer):
                await nc.close()

    async def _live(self, server: Any) -> None:
        last, last_t = 0, time.monotonic()
        names = [c.name for c in self.settings.clusters]
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            received = server.stats.received
            per = " ".join(f"{n}={server.cluster(n).forwarded}" for n in names)
            dead = sum(server.stats.dead_lettered.values())
            rate = (received - last) / (now - last_t)
            print(f"in={received} {per} dead={dead} rate={rate:,.0f}/s", flush=True)
            last, last_t = received, now

    async def _settle(self, server: Any, landings: dict[str, Landing], sent: int) -> None:
        """Wait (bounded) until everything sent was received and everything forwarded landed."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.interrupts < 2:
            landed = sum(landing.received for landing in landings.values())
            dead = sum(server.stats.dead_lettered.values())
            if server.stats.received >= sent and landed + dead >= sent:
                return
            await asyncio.sleep(0.05)

    def _summary(self, server: Any, landings: dict[str, Landing], sent: int) -> int:
        dead = sum(server.stats.dead_lettered.values())
        print(f"\nsummary: sent={sent} received={server.stats.received} dead-lettered={dead}")
        ok = server.stats.received == sent
        for name, landing in landings.items():
            forwarded = server.cluster(name).forwarded
            expected = self.expected[name]
            good = landing.received == expected and landing.misrouted == 0
            ok &= good
            verdict = "OK" if good else "MISMATCH"
            print(
                f"  {name:<4} forwarded={forwarded:<8} landed={landing.received:<8} expected={expected:<8} "
                f"assets={len(landing.assets):<6} misrouted={landing.misrouted}  {verdict}"
            )
        print(
            "result: OK, every message landed on the cluster its asset hashes to"
            if ok
            else "result: MISMATCH"
        )
        return 0 if ok else 1


# --------------------------------------------------------------------------- producer


def run_producer(args: argparse.Namespace) -> int:
    return _run_loop(_produce(args))


async def _produce(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await nats.connect(args.servers.split(","), name="asset-producer", max_reconnect_attempts=-1)
    if args.jetstream_stream:
        js = nc.jetstream()
        with contextlib.suppress(nats.js.errors.BadRequestError):
            await js.add_stream(name=args.jetstream_stream, subjects=[f"{args.subject_prefix}.>"])
    traffic = AssetTraffic(args.assets, args.payload_size, prefix=args.subject_prefix)
    print(f"produce: {len(traffic.assets)} assets at {args.rate:g}/s", flush=True)
    sent = await pace(traffic.messages(), nc, rate=args.rate, limit=args.messages or None, stop=stop)
    print(f"produce: sent {sent}", flush=True)
    await nc.drain()
    return 0
