"""The load side of the benchmark: a raw-socket publisher and an arrival counter.

The publisher speaks the NATS text protocol on a plain socket and sends pre-built
batches (one ``sendall`` per thousand messages), so producing costs a few percent of
a core and never competes with the relay under test the way a Python client would.

Arrivals are counted where they land: the sum of each target server's ``/varz``
``in_msgs``, polled over kept-alive HTTP connections. No subscriber runs on the
targets during a throughput run (its CPU would pollute the figure).

Every payload starts with ``{"t":<19 digits>,`` : the sender's ``time.monotonic_ns()``
(CLOCK_MONOTONIC is one clock for every process on the host), so a subscriber can
compute the forward latency of each message it sees.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from forwarder.demo import AssetTraffic

STAMP_AT = 5  # payload[5:24] is the send time in ns
STAMP_LEN = 19
BATCH = 1000  # messages per sendall


def payload_template(size: int) -> tuple[bytes, bytes]:
    """(prefix, suffix): a payload is prefix + 19-digit stamp + suffix, ``size`` bytes in all."""
    prefix = b'{"t":'
    head = b',"pad":"'
    tail = b'"}'
    pad = max(0, size - len(prefix) - STAMP_LEN - len(head) - len(tail))
    return prefix, head + b"x" * pad + tail


def stamp_of(payload: bytes) -> int:
    return int(payload[STAMP_AT : STAMP_AT + STAMP_LEN])


class Traffic:
    """The bench's messages: ``assets.<uuid>.<item>`` (forwarder.demo.AssetTraffic's subjects)."""

    def __init__(self, assets: int, payload_size: int) -> None:
        self.traffic = AssetTraffic(assets, payload_size)
        self.assets = self.traffic.assets
        self.subjects = self.traffic.subjects
        count = len(self.subjects)
        # The demo's order: a stride coprime with the count spreads consecutive messages over assets.
        self.order = [(n * 7919) % count for n in range(count)]
        self.prefix, self.suffix = payload_template(payload_size)
        self.payload_size = len(self.prefix) + STAMP_LEN + len(self.suffix)
        self._heads = [b"PUB %s %d\r\n" % (s.encode(), self.payload_size) for s in self.subjects]

    def message(self, index: int, stamp: int) -> bytes:
        return b"%s%s%019d%s\r\n" % (self._heads[index], self.prefix, stamp, self.suffix)

    def batches(self, size: int = BATCH) -> list[tuple[bytes, int]]:
        """Pre-built (batch, message count) covering every subject once (stamp 0: throughput runs
        only count)."""
        msgs = [self.message(i, 0) for i in self.order]
        return [(b"".join(msgs[i : i + size]), len(msgs[i : i + size])) for i in range(0, len(msgs), size)]

    def stamped(self, start: int, count: int, stamp: int) -> bytes:
        """``count`` messages from position ``start`` of the cycle, all stamped ``stamp``."""
        order, n = self.order, len(self.order)
        return b"".join([self.message(order[(start + k) % n], stamp) for k in range(count)])

    def probe_assets(self, every: int) -> list[str]:
        """Every ``every``-th asset: the latency subscriber listens to these only."""
        return self.assets[::every]


class RawPublisher:
    """A NATS connection on a plain socket: CONNECT, PING/PONG, then raw PUB batches."""

    def __init__(self, url: str, name: str = "bench-producer") -> None:
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""
        info = self._line()
        if not info.startswith(b"INFO"):
            raise ConnectionError(f"expected INFO from {url}, got {info[:80]!r}")
        connect = {"verbose": False, "pedantic": False, "name": name, "protocol": 1, "headers": True}
        self.sock.sendall(b"CONNECT %s\r\nPING\r\n" % json.dumps(connect).encode())
        self._until_pong()
        self.sock.setblocking(True)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _until_pong(self) -> None:
        while True:
            line = self._line()
            if line == b"PONG":
                return
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise ConnectionError(line.decode(errors="replace"))

    def service(self) -> None:
        """Answer the server's PINGs and surface its errors, without blocking."""
        while select.select([self.sock], [], [], 0)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the producer connection")
            self._buf += chunk
            while b"\r\n" in self._buf:
                line, self._buf = self._buf.split(b"\r\n", 1)
                if line == b"PING":
                    self.sock.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    raise ConnectionError(line.decode(errors="replace"))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def flush(self) -> None:
        """One round trip: the server has read everything sent before."""
        self.sock.sendall(b"PING\r\n")
        self._until_pong()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class VarzCounter:
    """Sum of ``/varz`` ``in_msgs`` over some servers, over kept-alive HTTP connections."""

    def __init__(self, http_ports: Sequence[int]) -> None:
        self.ports = list(http_ports)
        self._conns: dict[int, http.client.HTTPConnection] = {}

    def _get(self, port: int) -> dict[str, object]:
        for attempt in (1, 2):
            conn = self._conns.get(port)
            if conn is None:
                conn = self._conns[port] = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/varz")
                resp = conn.getresponse()
                body = resp.read()
                return json.loads(body)  # type: ignore[no-any-return]
            except (OSError, http.client.HTTPException):
                conn.close()
                self._conns.pop(port, None)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def in_msgs(self) -> int:
        return sum(int(self._get(p)["in_msgs"]) for p in self.ports)  # type: ignore[call-overload]

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


@dataclass
class Sample:
    t: float  # time.monotonic()
    arrived: int  # messages arrived at the targets since the run began
    cpu: float  # CPU seconds of the relay's process tree
    busy: float = 0.0  # CPU seconds the whole machine was busy (all cores, every process)


def cycle(batches: list[tuple[bytes, int]]) -> Iterator[tuple[bytes, int]]:
    while True:
        yield from batches


def steady_slice(
    samples: list[Sample], total: int, lo: float = 0.1, hi: float = 0.9
) -> tuple[Sample, Sample]:
    """The first sample at or past ``lo`` of ``total`` and the last at or below ``hi``: start-up and
    the tail (the last partial polls) stay out of the figures."""
    a = next((s for s in samples if s.arrived >= lo * total), samples[0])
    b = next((s for s in reversed(samples) if s.arrived <= hi * total), samples[-1])
    if b.t <= a.t:  # a very short run: fall back to everything
        a, b = samples[0], samples[-1]
    return a, b


def complete_msgs(buf: bytes) -> tuple[list[tuple[bytes, int, int]], int, bool]:
    """The complete ``MSG`` frames at the front of ``buf`` (what the server sends a plain
    subscriber): (subject, payload start, payload end) of each, how many bytes they and the
    control lines between them took, and whether a ``PING`` was among those lines (answer it).
    A ``-ERR`` raises."""
    msgs: list[tuple[bytes, int, int]] = []
    ping = False
    pos = 0
    end = len(buf)
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            break
        if buf.startswith(b"MSG ", pos):
            parts = buf[pos + 4 : eol].split(b" ")
            start = eol + 2
            stop = start + int(parts[-1])
            if stop + 2 > end:
                break
            msgs.append((parts[0], start, stop))
            pos = stop + 2
        else:
            if buf.startswith(b"PING", pos):
                ping = True
            elif buf.startswith(b"-ERR", pos):
                raise ConnectionError(buf[pos:eol].decode(errors="replace"))
            pos = eol + 2
    return msgs, pos, ping


def monotonic_ns() -> int:
    return time.monotonic_ns()
