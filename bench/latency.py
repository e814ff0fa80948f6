"""The latency probe: subscribes on every target to a sample of the assets and records, for
each message it sees, its arrival time minus the send stamp in the payload.

It also subscribes on the source to the same assets (``--source``): the latency a
subscriber there sees is what the producer, the source server and this machine add
before any relay is involved (``source_*``). Each message's two arrivals, paired by
subject and stamp, give the relay hop alone (``relay_hop_*``: target minus source; it
can be slightly negative where the source server wrote to the relay before the probe).

Arrival is when the message reached the probe's socket: the kernel's receive timestamp
(``SO_TIMESTAMPNS``) of the read that completed it. The time the probe itself then took
to be scheduled and to parse is not the forwarder's, and on a busy 2-core machine it is
the largest part of the tail: it is recorded apart (``app_*``: the time the probe's
code saw the message, what a subscriber written in Python would see). Reads are small
(a few KiB), so the timestamp of a read is that of the server's write the message came in.

Plain sockets and ``select``, no nats-py and no asyncio: at a sample of every Nth
asset this costs a few percent of a core. Run as
``python -m bench.latency --target URL ... --asset ID ...``; prints ``ready`` once
subscribed; when its stdin closes it prints one JSON line (count and percentiles in
milliseconds) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.load import STAMP_AT, STAMP_LEN, complete_msgs

READ_SIZE = 4096  # small reads: the timestamp of each is that of (nearly) one server write
TIMESPEC = struct.Struct("@ll")  # struct timespec: tv_sec, tv_nsec
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def summary(latencies_ns: list[int], prefix: str = "") -> dict[str, Any]:
    values = sorted(latencies_ns)
    ms = 1e6
    return {
        f"{prefix}count": len(values),
        f"{prefix}p50_ms": percentile(values, 0.50) / ms,
        f"{prefix}p90_ms": percentile(values, 0.90) / ms,
        f"{prefix}p99_ms": percentile(values, 0.99) / ms,
        f"{prefix}max_ms": (values[-1] / ms) if values else float("nan"),
    }


def realtime_to_monotonic_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC now (the kernel stamps in the first, the producer in
    the second); the closest of a few tries."""
    best = None
    for _ in range(5):
        a = time.monotonic_ns()
        r = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, r - (a + b) // 2)
    assert best is not None
    return best[1]


Arrival = Callable[[tuple[bytes, int], int], None]  # (subject, stamp), socket arrival (ns)


class HopPairs:
    """Each sampled message's arrival on the source and on its target, paired as they come in
    (either socket may be read first); a pair, once met, is dropped: a soak stays small."""

    def __init__(self) -> None:
        self._waiting: tuple[dict[tuple[bytes, int], int], dict[tuple[bytes, int], int]] = ({}, {})
        self.hops: list[int] = []  # target arrival minus source arrival, ns

    def at_source(self, key: tuple[bytes, int], arrived: int) -> None:
        self._meet(key, arrived, side=0)

    def at_target(self, key: tuple[bytes, int], arrived: int) -> None:
        self._meet(key, arrived, side=1)

    def _meet(self, key: tuple[bytes, int], arrived: int, side: int) -> None:
        """Wait on ``side`` for the other arrival, or pair with it if it came first."""
        other = self._waiting[1 - side].pop(key, None)
        if other is None:
            self._waiting[side][key] = arrived
        else:
            self.hops.append(arrived - other if side else other - arrived)


class Subscriber:
    """One raw NATS connection with subscriptions; parses ``MSG`` frames as they complete."""

    def __init__(
        self,
        url: str,
        subjects: list[str],
        arrivals: list[int],
        seen: list[int],
        arrived_at: Arrival | None = None,
    ) -> None:
        self.arrivals = arrivals
        self.seen = seen
        self.arrived_at = arrived_at
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.buf = b""
        connect = json.dumps({"verbose": False, "pedantic": False, "name": "bench-latency-probe"})
        subs = "".join(f"SUB {s} {sid}\r\n" for sid, s in enumerate(subjects, 1))
        self.sock.sendall(f"CONNECT {connect}\r\n{subs}PING\r\n".encode())
        while b"PONG\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"{url} closed the connection")
            self.buf += chunk
        self.buf = b""  # INFO and the PONG: nothing was published to us yet
        self.sock.setblocking(False)

    def read(self) -> None:
        """Whatever the socket holds: for each complete message, its socket arrival and the time
        the probe saw it, minus its stamp (ns)."""
        offset = realtime_to_monotonic_ns()
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(READ_SIZE, 256)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionError("a target closed the probe's connection")
            now = time.monotonic_ns()
            arrived = now
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = TIMESPEC.unpack(value[: TIMESPEC.size])
                    arrived = sec * 1_000_000_000 + nsec - offset
            self.buf += data
            self._parse(arrived, now)

    def _parse(self, arrived: int, now: int) -> None:
        buf = self.buf
        msgs, used, ping = complete_msgs(buf)
        if ping:
            self.sock.sendall(b"PONG\r\n")
        note = self.arrived_at
        for subject, start, _end in msgs:
            stamp = int(buf[start + STAMP_AT : start + STAMP_AT + STAMP_LEN])
            self.arrivals.append(arrived - stamp)
            self.seen.append(now - stamp)
            if note is not None:
                note((subject, stamp), arrived)
        self.buf = buf[used:]


def run(args: argparse.Namespace) -> int:
    subjects = [f"{args.prefix}.{asset}.>" for asset in args.asset]
    arrivals: list[int] = []
    seen: list[int] = []
    at_source: list[int] = []
    pairs = HopPairs() if args.source else None
    on_target = pairs.at_target if pairs is not None else None
    subscribers = [Subscriber(url, subjects, arrivals, seen, on_target) for url in args.target]
    if pairs is not None:
        subscribers.append(Subscriber(args.source, subjects, at_source, [], pairs.at_source))
    by_fd = {sub.sock.fileno(): sub for sub in subscribers}
    print("ready", flush=True)
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin, *by_fd], [], [])
        for fd in ready:
            if fd == stdin:
                if not os.read(stdin, 4096):  # the bench closed our stdin: report
                    for sub in subscribers:  # what already arrived
                        sub.read()
                    report = summary(arrivals) | summary(seen, "app_") | summary(at_source, "source_")
                    report |= summary(pairs.hops if pairs is not None else [], "relay_hop_")
                    print(json.dumps(report), flush=True)
                    return 0
            else:
                by_fd[fd].read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latency")
    p.add_argument("--target", action="append", required=True)
    p.add_argument("--asset", action="append", required=True)
    p.add_argument("--source", help="also subscribe here: the latency before any relay")
    p.add_argument("--prefix", default="assets")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
