"""Publish as fast as one process can, over a raw socket: the load for the observability tests.

Run as ``python -m tests.integration.flood HOST PORT SECONDS [ASSETS] [PREFIX]``. Pre-built
batches of ``PUB`` commands keep the publisher's own cost per message far below the
forwarder's, so the forwarder, not this process, is the bottleneck. At the end a PING/PONG
round trip makes sure the server has read everything; the number of messages sent is
printed on stdout.
"""

from __future__ import annotations

import socket
import sys
import time

PAYLOAD = b"x" * 200
BATCH = 1000


def _until_pong(sock: socket.socket) -> None:
    seen = b""
    while b"PONG\r\n" not in seen:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        seen = seen[-16:] + chunk


def flood(host: str, port: int, seconds: float, assets: int = 1000, prefix: str = "assets") -> int:
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"flood"}\r\nPING\r\n')
        _until_pong(sock)
        batch = b"".join(
            b"PUB %s.asset-%05d.value %d\r\n%s\r\n" % (prefix.encode(), i % assets, len(PAYLOAD), PAYLOAD)
            for i in range(BATCH)
        )
        sent = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock.sendall(batch)
            sent += BATCH
        sock.sendall(b"PING\r\n")
        _until_pong(sock)
    return sent


if __name__ == "__main__":
    args = sys.argv[1:]
    extra = (int(args[3]),) if len(args) > 3 else ()
    prefix = (args[4],) if len(args) > 4 else ()
    print(flood(args[0], int(args[1]), float(args[2]), *extra, *prefix), flush=True)
