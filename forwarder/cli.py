"""``forwarder``: run, demo, route, check-config, produce.

A thin layer: it maps options onto the config and hands over to the server, the
demo or the ring. Exit codes: 0 success, 2 usage or config error (one line on
stderr naming the file and key), 1 anything else that failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import IO, NoReturn

from . import __version__
from .config import ConfigError, Settings, load_config
from .hashring import CachedRing, build_ring

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
    settings = _load(args, require_files=False)
    ring = build_ring(
        settings.routing.hashing.algorithm,
        {c.name: c.weight for c in settings.clusters},
        replicas=settings.routing.hashing.replicas,
    )
    if args.stdin:
        return route_stream(
            CachedRing(ring, settings.routing.cache_size), sys.stdin.buffer, sys.stdout.buffer
        )
    if not args.assets:
        _fail("route: name at least one ASSET, or use --stdin")
    for asset in args.assets:
        print(f"{asset}\t{ring.cluster_for(asset)}")
    return 0


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

    p = sub.add_parser("demo", help="run the forwarder on embedded NATS servers with synthetic assets")
    p.add_argument("--config", default=None, help="demo config (default: config/demo.yaml)")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
