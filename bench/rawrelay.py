"""The ceiling: a relay with almost no cost of its own, to show what the servers and the kernel
of this machine can move at all.

Plain sockets, no nats-py, no asyncio, no routing: every ``MSG`` read from a queue
subscription on the source is re-framed as a ``PUB`` to one target, in large writes.
When a relay's figure is close to this one, the machine (servers, producer, other
load), not the relay, sets the limit. Not a yardstick: it does no routing.

Run as ``python -m bench.rawrelay --source URL --target URL``; prints ``ready``; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys

from bench.load import complete_msgs


def connect(url: str, subscribe: str | None = None) -> socket.socket:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    while b"\r\n" not in buf:
        buf += sock.recv(65536)
    connect = json.dumps({"verbose": False, "pedantic": False, "name": "bench-rawrelay", "protocol": 1})
    sock.sendall(f"CONNECT {connect}\r\n{subscribe or ''}PING\r\n".encode())
    buf = b""
    while b"PONG\r\n" not in buf:
        buf += sock.recv(65536)
    return sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rawrelay")
    p.add_argument("--source", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--subject", default="assets.>")
    args = p.parse_args(argv)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    dst = connect(args.target)
    src = connect(args.source, f"SUB {args.subject} bench-raw 1\r\n")
    src.settimeout(0.2)
    print("ready", flush=True)
    buf = b""
    while not stopping:
        try:
            data = src.recv(1 << 20)
        except TimeoutError:
            continue
        except InterruptedError:
            continue
        if not data:
            return 1
        buf += data
        msgs, pos, ping = complete_msgs(buf)
        if ping:
            src.sendall(b"PONG\r\n")
        if msgs:
            dst.sendall(b"".join([b"PUB %s %d\r\n%s\r\n" % (s, e - b, buf[b:e]) for s, b, e in msgs]))
        buf = buf[pos:]
    dst.sendall(b"PING\r\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
