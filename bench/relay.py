"""The yardsticks: the simplest relays one could write with nats-py alone.

``core``: a queue-group subscription on the source; the target is picked from a
precomputed asset -> cluster dict (the forwarder's own rendezvous ring, so every
message lands where the forwarder would put it); ``publish`` into nats-py's buffered
writer; uvloop. The picked connection is remembered per subject, as the forwarder
remembers its routes: no tricks the forwarder could not use, no handicaps either.

``jetstream``: a durable push consumer with a deliver group, flow control and idle
heartbeats (the forwarder's consumer settings). Each message is published to its
target and kept; one task confirms what was published so far with a flush of every
target (one round trip each, concurrently) and then acknowledges the whole batch in
one buffered write on the source connection (the same write the forwarder's
``publish_many`` does): at-least-once, never one round trip per message.

``jetstream-pull`` (not a yardstick; for the pull-versus-push note): a durable pull
consumer, ``fetch()`` in batches, publish, flush every target, then ``msg.ack()`` for
each message: nats-py's documented pull path.

Run as ``python -m bench.relay core|jetstream|jetstream-pull --source URL --target NAME=URL ...``;
prints ``ready`` once consuming; SIGTERM stops it (the JetStream relay confirms and
acknowledges what is in flight first).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import nats
import uvloop
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from forwarder.hashring import RendezvousRing


def routes(targets: dict[str, Any], assets: list[str]) -> dict[str, Any]:
    """asset -> target connection, computed once with the forwarder's ring (weights 1)."""
    ring = RendezvousRing(dict.fromkeys(targets, 1.0))
    return {a: targets[ring.cluster_for(a)] for a in assets}


async def connect_targets(spec: list[str]) -> dict[str, Any]:
    out = {}
    for item in spec:
        name, url = item.split("=", 1)
        out[name] = await nats.connect(url, name=f"bench-relay-{name}", skip_subject_validation=True)
    return out


async def run(args: argparse.Namespace) -> int:
    from forwarder.demo import AssetTraffic

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    targets = await connect_targets(args.target)
    by_asset = routes(targets, AssetTraffic(args.assets, 16).assets)
    by_subject: dict[str, Any] = {}

    def pick(subject: str) -> Any:
        nc = by_subject[subject] = by_asset[subject.split(".")[1]]
        return nc

    src = await nats.connect(args.source, name="bench-relay-source", skip_subject_validation=True)
    if args.mode == "core":

        async def relay(msg: Any) -> None:
            subject = msg.subject
            nc = by_subject.get(subject) or pick(subject)
            await nc.publish(subject, msg.data, headers=msg.headers)

        sub = await src.subscribe(args.subject, queue="bench-relay", cb=relay)
        confirmer = None
    elif args.mode == "jetstream-pull":
        psub = await src.jetstream().pull_subscribe(
            args.subject,
            durable=args.durable,
            stream=args.stream,
            config=ConsumerConfig(ack_wait=30, max_ack_pending=args.max_ack_pending),
        )
        conns = list(targets.values())

        async def pull() -> None:
            while not stop.is_set():
                try:
                    msgs = await psub.fetch(batch=500, timeout=0.5)
                except TimeoutError:  # nats-py raises its own or, past a deadline, the builtin one
                    continue
                for msg in msgs:
                    subject = msg.subject
                    nc = by_subject.get(subject) or pick(subject)
                    await nc.publish(subject, msg.data, headers=msg.headers)
                await asyncio.gather(*(nc.flush(timeout=5) for nc in conns))
                for msg in msgs:
                    await msg.ack()

        sub = psub
        confirmer = loop.create_task(pull())
    else:
        published: list[Any] = []
        wakeup = asyncio.Event()

        async def relay(msg: Any) -> None:
            subject = msg.subject
            nc = by_subject.get(subject) or pick(subject)
            await nc.publish(subject, msg.data, headers=msg.headers)
            published.append(msg)
            if len(published) == 1:
                wakeup.set()

        async def confirm() -> None:
            nonlocal published
            conns = list(targets.values())
            while True:
                if not published:
                    if stop.is_set():
                        return
                    await wakeup.wait()
                    wakeup.clear()
                    continue
                batch, published = published, []
                await asyncio.gather(*(nc.flush(timeout=5) for nc in conns))
                # Acks in one write: "PUB <reply> 0" each (an empty payload is an ack).
                await src._send_command(b"".join(b"PUB %s 0\r\n\r\n" % m.reply.encode() for m in batch))
                await src._flush_pending()

        config = ConsumerConfig(
            durable_name=args.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=args.max_ack_pending,
            deliver_policy=DeliverPolicy.ALL,
        )
        sub = await src.jetstream().subscribe(
            args.subject,
            queue=args.durable,
            durable=args.durable,
            stream=args.stream,
            cb=relay,
            manual_ack=True,
            flow_control=True,
            idle_heartbeat=5.0,
            config=config,
        )
        confirmer = loop.create_task(confirm())
    print("ready", flush=True)
    await stop.wait()
    if args.mode == "jetstream-pull":
        await asyncio.wait_for(confirmer, 10)  # ends after its current batch
    await sub.unsubscribe()
    if args.mode == "jetstream":
        wakeup.set()
        await asyncio.wait_for(confirmer, 10)
    await src.drain()
    for nc in targets.values():
        await nc.drain()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.relay")
    p.add_argument("mode", choices=("core", "jetstream", "jetstream-pull"))
    p.add_argument("--source", required=True)
    p.add_argument("--target", action="append", required=True, metavar="NAME=URL")
    p.add_argument("--subject", default="assets.>")
    p.add_argument("--assets", type=int, default=2000)
    p.add_argument("--stream", default="ASSETS")
    p.add_argument("--durable", default="bench-relay")
    p.add_argument("--max-ack-pending", type=int, default=20000)
    args = p.parse_args(argv)
    return int(uvloop.run(run(args)))


if __name__ == "__main__":
    sys.exit(main())
