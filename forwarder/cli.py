"""``forwarder``: run, demo, route, check-config, produce, watch.

A thin layer: it maps options onto the config and hands over to the server, the
demo or the ring. Exit codes: 0 success, 2 usage or config error (one line on
stderr naming the file and key), 1 anything else that failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import IO, Any, NoReturn

from . import __version__
from .config import ConfigError, Settings, load_config
from .hashring import CachedRing

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """argparse's usage errors, as one line and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _fail(message: str) -> NoReturn:
    print(f"forwarder: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _load(args: argparse.Namespace, *, require_files: bool = True) -> Settings:
    path = args.config or os.environ.get("FORWARDER_CONFIG")
    if not path:
        _fail("no config file: pass -c FILE or set FORWARDER_CONFIG")
    try:
        return load_config(path, require_files=require_files)
    except ConfigError as exc:
        _fail(str(exc))


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs
    from .workers import Supervisor, worker_identity

    settings = _load(args)
    logs.configure(settings.log.level, settings.log.format, secrets=settings.secrets())
    worker = worker_identity()
    count = args.workers or settings.workers
    if worker is None and count > 1:
        return Supervisor(settings, args.config or os.environ["FORWARDER_CONFIG"], count).run()
    from .service import Server

    if worker is None:
        return Server(settings).run()
    logs.bind(worker=worker.index)
    return Server(worker.apply(settings), http_socket=worker.http_socket).run()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args, require_files=False)
    source = settings.source
    mode = f"jetstream {source.jetstream.stream}/{source.jetstream.durable}" if source.jetstream else "core"
    print(
        f"{settings.file}: OK: source {source.subject} ({mode}), "
        f"{len(settings.clusters)} clusters ({', '.join(c.name for c in settings.clusters)}), "
        f"algorithm {settings.routing.hashing.algorithm}"
    )
    for ref in settings.missing_files():
        print(f"note: {ref.key}: {ref.path} is not readable here (it must exist where the forwarder runs)")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Routes by the topology the forwarder follows: the bucket's when one is configured."""
    settings = _load(args, require_files=False)
    if not args.stdin and not args.assets:
        _fail("route: name at least one ASSET, or use --stdin")

    async def route(store: Any) -> int:
        topology, _ = await _current(settings, store)
        ring = topology.ring
        if args.stdin:
            return route_stream(
                CachedRing(ring, settings.routing.cache_size), sys.stdin.buffer, sys.stdout.buffer
            )
        bad = 0
        for asset in args.assets:
            try:
                asset.encode("utf-8")
            except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
                bad += 1
                shown = asset.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                print(f"forwarder: {shown}: asset id is not valid UTF-8, skipped", file=sys.stderr)
                continue
            print(f"{asset}\t{ring.cluster_for(asset)}")
        return 1 if bad else 0

    return _run_topology(settings, route)


def route_stream(ring: CachedRing, lines: IO[bytes], out: IO[bytes]) -> int:
    """One asset id a line in, ``asset<TAB>cluster`` a line out; written in large chunks."""
    cluster_for = ring.cluster_for
    chunk: list[bytes] = []
    bad = 0
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip(b"\r\n")
        if not line:
            continue
        try:
            asset = line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
            print(f"forwarder: line {number}: asset id is not valid UTF-8, skipped", file=sys.stderr)
            continue
        chunk.append(b"%s\t%s\n" % (line, cluster_for(asset).encode()))
        if len(chunk) >= 8192:
            out.write(b"".join(chunk))
            chunk.clear()
    out.write(b"".join(chunk))
    out.flush()
    return 1 if bad else 0


# --------------------------------------------------------------------------- topology


def _new_topology(path: str, current: Any) -> Any:
    """A topology file (algorithm, replicas, clusters) or a forwarder config, as the next version."""
    import yaml

    from .topology import Topology, TopologyError

    try:
        with open(path, "rb") as fh:
            doc = yaml.safe_load(fh.read(1024 * 1024 + 1))
    except OSError as exc:
        _fail(f"{path}: cannot read the file ({exc.strerror or exc})")
    except yaml.YAMLError as exc:
        _fail(f"{path}: YAML error: {str(exc).splitlines()[0]}")
    if isinstance(doc, dict) and "source" in doc:
        try:
            return Topology.from_settings(load_config(path, require_files=False), version=current.version + 1)
        except ConfigError as exc:
            _fail(str(exc))
    if isinstance(doc, dict) and isinstance(doc.get("routing"), dict) and "clusters" in doc:
        hashing = doc["routing"].get("hashing") or {}
        doc = {
            "clusters": doc["clusters"],
            **{k: hashing[k] for k in ("algorithm", "replicas") if k in hashing},
        }
    if not isinstance(doc, dict):
        _fail(f"{path}: a topology file is a mapping with clusters (and algorithm, replicas)")
    doc = {k: v for k, v in doc.items() if k != "version"}
    try:
        return Topology.from_mapping(doc, version=current.version + 1)
    except TopologyError as exc:
        _fail(f"{path}: {exc}")


async def _with_store(settings: Settings, action: Any) -> int:
    """Run ``action(store)`` on the topology bucket over the source connection (one attempt)."""
    from nats.aio.client import Client

    from .natsconn import ConnectionEvents, ConnectionStats, connect_options
    from .topology_store import StoreError, TopologyStore

    assert settings.topology.kv_bucket is not None
    events = ConnectionEvents(ConnectionStats("source"), kind="connection")
    opts = connect_options(settings.source.connection, events)
    opts.update(allow_reconnect=False, max_reconnect_attempts=0)

    async def quiet(*_: Any) -> None:
        """The CLI reports failures in one line itself; connection events are not news here."""

    opts.update(error_cb=quiet, disconnected_cb=quiet, reconnected_cb=quiet, closed_cb=quiet)
    nc = Client()
    try:
        await nc.connect(**opts)
    except Exception as exc:
        _fail(f"{settings.file}: source.servers: cannot connect to the source ({type(exc).__name__})")
    try:
        return int(await action(TopologyStore(nc, settings.topology.kv_bucket)))
    except StoreError as exc:
        _fail(f"{settings.file}: topology.kv_bucket: {exc}")
    finally:
        await nc.close()


async def _current(settings: Settings, store: Any) -> tuple[Any, int | None]:
    """The topology routing follows now: the bucket's (with its revision) or the file's."""
    from .topology import Topology

    if store is None:
        return Topology.from_settings(settings), None
    stored = await store.read()
    if stored is None:
        return Topology.from_settings(settings), 0
    return stored.topology, stored.revision


def _run_topology(settings: Settings, action: Any) -> int:
    import asyncio

    if settings.topology.kv_bucket is None:
        return int(asyncio.run(action(None)))
    return asyncio.run(_with_store(settings, action))


def cmd_topology_show(args: argparse.Namespace) -> int:
    settings = _load(args, require_files=False)

    async def show(store: Any) -> int:
        topology, revision = await _current(settings, store)
        where = f"bucket {settings.topology.kv_bucket}" if store is not None else f"file {settings.file}"
        if revision == 0:
            where += " (empty: the forwarder writes the file's topology at start)"
        if args.json:
            print(json.dumps({**topology.to_mapping(), "from": where, "revision": revision}, indent=2))
            return 0
        print(f"topology version {topology.version} ({topology.algorithm}) from {where}")
        shares = topology.ring.shares()
        for name, spec in sorted(topology.clusters.items()):
            js = " jetstream" if spec.jetstream else ""
            servers = ", ".join(spec.servers)
            print(f"  {name:<10} weight {spec.weight:<6g} share {shares[name]:7.2%}{js}  {servers}")
        return 0

    return _run_topology(settings, show)


def cmd_topology_plan(args: argparse.Namespace) -> int:
    from .topology import plan, render_plan

    settings = _load(args, require_files=False)
    assets = _read_assets(args.assets) if args.assets else None

    async def show_plan(store: Any) -> int:
        current, _ = await _current(settings, store)
        new = _new_topology(args.new, current)
        p = plan(current, new, assets)
        print(json.dumps(p.to_mapping(), indent=2) if args.json else render_plan(p, current, new))
        return 0

    return _run_topology(settings, show_plan)


def cmd_topology_apply(args: argparse.Namespace) -> int:
    from .topology import plan, render_plan
    from .topology_store import ConflictError

    settings = _load(args, require_files=False)
    if settings.topology.kv_bucket is None:
        _fail(f"{settings.file}: topology.kv_bucket: is not set; apply needs the bucket (else edit the file)")

    async def apply(store: Any) -> int:
        current, revision = await _current(settings, store)
        if not revision:
            _fail(
                f"{settings.file}: topology.kv_bucket: {store.bucket} has no topology yet (start a forwarder)"
            )
        new = _new_topology(args.new, current)
        try:
            new_revision = await store.apply(new, revision)
        except ConflictError as exc:
            print(f"forwarder: topology not applied: {exc}", file=sys.stderr)
            return 1
        print(render_plan(plan(current, new), current, new))
        print(f"\napplied: version {new.version} (bucket revision {new_revision})")
        return 0

    return _run_topology(settings, apply)


def _read_assets(path: str) -> list[str]:
    try:
        fh = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
        with fh:
            return [line.decode("utf-8", "replace").strip() for line in fh if line.strip()]
    except OSError as exc:
        _fail(f"{path}: cannot read the file ({exc.strerror or exc})")


def cmd_watch(args: argparse.Namespace) -> int:
    from .client import run_watch

    return run_watch(_load(args, require_files=False), args.asset, args.subject)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def cmd_produce(args: argparse.Namespace) -> int:
    from .demo import run_producer

    return run_producer(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="forwarder", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"asset-forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("-c", "--config", help="the YAML config file (default: $FORWARDER_CONFIG)")

    p = sub.add_parser("run", help="run the forwarder")
    with_config(p)
    p.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="forwarder processes under one supervisor (overrides the config's workers)",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file without connecting")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("route", help="print the cluster that owns each asset")
    with_config(p)
    p.add_argument("assets", nargs="*", metavar="ASSET")
    p.add_argument("--stdin", action="store_true", help="read asset ids from standard input, one a line")
    p.set_defaults(func=cmd_route)

    p = sub.add_parser("topology", help="show, plan or apply the live topology")
    topo = p.add_subparsers(dest="topology_command", required=True, parser_class=_Parser)
    t = topo.add_parser("show", help="the current topology and its version (the bucket's, or the file's)")
    with_config(t)
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_topology_show)
    t = topo.add_parser("plan", help="what a new topology would move (no change is made)")
    with_config(t)
    t.add_argument("new", metavar="NEW.yaml", help="the new topology (or a forwarder config)")
    t.add_argument(
        "--assets", metavar="FILE", help="asset ids, one a line ('-': stdin): list exactly which move"
    )
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_topology_plan)
    t = topo.add_parser(
        "apply", help="write a new topology to the bucket (compare-and-set) and print the plan"
    )
    with_config(t)
    t.add_argument("new", metavar="NEW.yaml", help="the new topology (or a forwarder config)")
    t.set_defaults(func=cmd_topology_apply)
    p = sub.add_parser("watch", help="print an asset's messages as they arrive, following moves")
    with_config(p)
    p.add_argument("asset", metavar="ASSET")
    p.add_argument("--subject", default=None, help="subject to read (default: derived from the config)")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("demo", help="run the forwarder on embedded NATS servers with synthetic assets")
    p.add_argument("--config", default=None, help="demo config (default: the packaged forwarder/demo.yaml)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds")
    p.add_argument("--messages", type=int, default=None, help="stop after N messages")
    p.add_argument("--assets", type=int, default=2000, help="distinct assets (default 2000)")
    p.add_argument("--rate", type=float, default=5000.0, help="messages a second (default 5000)")
    p.add_argument("--payload-size", type=int, default=256, help="payload bytes (default 256)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("produce", help="publish synthetic asset messages (for compose and load tests)")
    p.add_argument("--servers", required=True, help="comma-separated NATS URLs")
    p.add_argument("--subject-prefix", default="assets")
    p.add_argument("--assets", type=int, default=2000)
    p.add_argument("--rate", type=float, default=1000.0, help="messages a second (0: as fast as possible)")
    p.add_argument("--messages", type=int, default=0, help="stop after N messages (0: forever)")
    p.add_argument("--payload-size", type=int, default=256)
    p.add_argument("--jetstream-stream", default=None, help="create this stream on the subjects if missing")
    p.set_defaults(func=cmd_produce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``forwarder route --stdin ... | head``): stop quietly, and
        # point stdout at /dev/null so that the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
